"""Convert the project's Gemma 3 GGUF into a Hugging Face directory that vLLM can serve.

    python -m quantization.gguf_to_hf --gguf PATH --out DIR [--dtype float32] [--force]

Runs inside the vLLM virtualenv (needs ``gguf``, ``numpy``, ``torch``, ``safetensors``,
``tokenizers`` and ``transformers``). It is idempotent: ``DIR/lockgate-conversion.json`` records
the GGUF's SHA-256, the converter version and the dtype, and a later run with the same inputs
does nothing.

What the conversion does, and why (each point mirrors llama.cpp's ``convert_hf_to_gguf.py`` in
reverse, so that the result computes what llama.cpp computes from the same file):

* Weights: every tensor is dequantized with the ``gguf`` package's reference dequantizers to
  float32 (exactly the values llama.cpp multiplies with) and stored as ``--dtype``. float32 keeps
  them exact; bfloat16 halves the size but rounds them.
* Gemma's RMSNorm scales by ``1 + weight``; the GGUF stores ``weight + 1`` (llama.cpp's RMSNorm
  only multiplies), so 1 is subtracted from every ``*norm.weight`` again.
* Gemma rotates Q/K NEOX-style, like transformers, so no Q/K permutation is undone.
* No ``output.weight`` in the file means the LM head is tied to the token embedding.
* Config: ``Gemma3ForCausalLM`` / ``gemma3_text`` with the shapes from the GGUF metadata plus the
  constants llama.cpp hard-codes for Gemma 3 (sliding-window pattern 6, local RoPE base 10000,
  attention scale 1/sqrt(head_dim), GELU-tanh, no logit soft-capping).
* Tokenizer: the GGUF holds a SentencePiece *BPE* vocabulary (pieces, scores, types) but no
  merges. llama.cpp tokenizes it by repeatedly merging the adjacent pair whose concatenation is
  the highest-scoring piece; a ``tokenizers`` BPE whose merges are every split of every piece,
  ranked by that piece's score, does the same. User-defined pieces (runs of spaces, newlines and
  tabs, HTML tags) are matched in the raw text first, as llama.cpp does, and control pieces
  (``<bos>``, ``<start_of_turn>``, ...) are special tokens. The file is loaded as a plain
  ``TokenizersBackend`` so that transformers uses it as written instead of rebuilding it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

CONVERTER_VERSION = 1
MARKER = "lockgate-conversion.json"
WEIGHTS = "model.safetensors"
DTYPES = ("float32", "bfloat16", "float16")

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# GGUF tensor name (inside blk.N.) -> transformers name (inside model.layers.N.)
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def log(message: str) -> None:
    print(f"[gguf_to_hf] {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def hf_tensor_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        if part not in _LAYER_TENSORS:
            raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
        return f"model.layers.{int(index)}.{_LAYER_TENSORS[part]}.{suffix}"
    if stem not in _GLOBAL_TENSORS:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"{_GLOBAL_TENSORS[stem]}.{suffix}"


class GGUFFile:
    """The parts of a GGUF this converter reads: metadata values and tensors."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        self.reader = gguf.GGUFReader(str(path))

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: metadata {key!r} missing")
        return value

    def tensors(self) -> Any:
        return self.reader.tensors


def dequantize_tensor(tensor: Any) -> Any:
    """float32 numpy array in transformers' (out_features, in_features) layout."""
    import numpy as np
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
    return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)


def build_config(gguf_file: GGUFFile, tied: bool, dtype: str) -> Any:
    from transformers import Gemma3TextConfig

    arch = gguf_file.require("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"only gemma3 GGUFs are supported, not {arch!r}")

    def meta(key: str) -> Any:
        return gguf_file.require(f"{arch}.{key}")

    head_dim = int(meta("attention.key_length"))
    if int(meta("attention.value_length")) != head_dim:
        raise ValueError("gemma3 needs key_length == value_length")
    tokens = gguf_file.require("tokenizer.ggml.tokens")
    n_layers = int(meta("block_count"))
    config = Gemma3TextConfig(
        vocab_size=len(tokens),
        hidden_size=int(meta("embedding_length")),
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=int(meta("attention.head_count")),
        num_key_value_heads=int(meta("attention.head_count_kv")),
        head_dim=head_dim,
        # llama.cpp scales queries by 1/sqrt(head_dim) for every Gemma 3 size but 27B.
        query_pre_attn_scalar=head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=int(meta("context_length")),
        # stored as float32 (9.99999997e-07): round back to the value the model was made with
        rms_norm_eps=float(f"{float(meta('attention.layer_norm_rms_epsilon')):.6g}"),
        sliding_window=int(meta("attention.sliding_window")),
        # llama.cpp: every 6th layer is global, the rest use the sliding window.
        layer_types=[
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)
        ],
        rope_parameters={
            "full_attention": {
                "rope_type": "default",
                "rope_theta": float(meta("rope.freq_base")),
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        attention_bias=False,
        tie_word_embeddings=tied,
        bos_token_id=int(gguf_file.require("tokenizer.ggml.bos_token_id")),
        eos_token_id=int(gguf_file.require("tokenizer.ggml.eos_token_id")),
        pad_token_id=int(gguf_file.get("tokenizer.ggml.padding_token_id", 0)),
    )
    config.architectures = ["Gemma3ForCausalLM"]
    config.dtype = dtype
    return config


def convert_weights(gguf_file: GGUFFile, dtype: str) -> dict[str, Any]:
    import torch

    target = getattr(torch, dtype)
    out: dict[str, Any] = {}
    for tensor in gguf_file.tensors():
        values = dequantize_tensor(tensor)
        if tensor.name.endswith("norm.weight"):
            values = values - 1.0  # GGUF stores Gemma's (1 + w) RMSNorm scale
        out[hf_tensor_name(tensor.name)] = torch.from_numpy(values).to(target).contiguous()
    return out


def build_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of every normal piece into two normal pieces, best-scoring piece first."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == _NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, index in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def build_tokenizer(gguf_file: GGUFFile) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    if gguf_file.require("tokenizer.ggml.model") != "llama":
        raise ValueError("only SentencePiece ('llama') GGUF vocabularies are supported")
    if gguf_file.get("tokenizer.ggml.add_space_prefix", False):
        raise ValueError("add_space_prefix=true is not supported (Gemma does not use it)")
    tokens = [str(t) for t in gguf_file.require("tokenizer.ggml.tokens")]
    scores = [float(s) for s in gguf_file.require("tokenizer.ggml.scores")]
    types = [int(t) for t in gguf_file.require("tokenizer.ggml.token_type")]
    if len(set(tokens)) != len(tokens):
        raise ValueError("duplicate pieces in the GGUF vocabulary")
    unk = tokens[int(gguf_file.require("tokenizer.ggml.unknown_token_id"))]
    bos_id = int(gguf_file.require("tokenizer.ggml.bos_token_id"))

    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=build_merges(tokens, scores, types),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Matched in the raw text before the BPE runs, like llama.cpp's special-token partition.
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind in (_CONTROL, _UNKNOWN)
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    for piece, kind in zip(tokens, types, strict=True):  # added tokens must keep their GGUF ids
        if (
            kind in (_CONTROL, _UNKNOWN, _USER_DEFINED)
            and tokenizer.token_to_id(piece) != vocab[piece]
        ):
            raise RuntimeError(f"added token {piece!r} got a different id")
    if gguf_file.get("tokenizer.ggml.add_bos_token", True):
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    return tokenizer


def write_tokenizer(gguf_file: GGUFFile, out: Path, chat_template: str | None) -> None:
    tokens = gguf_file.require("tokenizer.ggml.tokens")

    def piece(key: str) -> str | None:
        index = gguf_file.get(f"tokenizer.ggml.{key}")
        return None if index is None else str(tokens[int(index)])

    build_tokenizer(gguf_file).save(str(out / "tokenizer.json"))
    special = {
        "bos_token": piece("bos_token_id"),
        "eos_token": piece("eos_token_id"),
        "unk_token": piece("unknown_token_id"),
        "pad_token": piece("padding_token_id"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    tokenizer_config = {
        # Load tokenizer.json as written (GemmaTokenizer would rebuild the pipeline itself).
        "tokenizer_class": "TokenizersBackend",
        "add_bos_token": bool(gguf_file.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(gguf_file.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf_file.require("gemma3.context_length")),
        "padding_side": "left",
        **special,
    }
    # Base models ship no template; the caller passes the one the gateway uses for them.
    template = gguf_file.get("tokenizer.chat_template") or chat_template
    if template:
        tokenizer_config["chat_template"] = str(template)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_generation_config(gguf_file: GGUFFile, out: Path) -> None:
    tokens = list(gguf_file.require("tokenizer.ggml.tokens"))
    eos = [int(gguf_file.require("tokenizer.ggml.eos_token_id"))]
    if "<end_of_turn>" in tokens:  # llama.cpp treats it as end-of-generation too
        eos.append(tokens.index("<end_of_turn>"))
    # Only token ids: no sampling defaults, so vLLM applies exactly what a request asks for.
    generation = {
        "bos_token_id": int(gguf_file.require("tokenizer.ggml.bos_token_id")),
        "eos_token_id": eos,
        "pad_token_id": int(gguf_file.get("tokenizer.ggml.padding_token_id", 0)),
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def read_marker(out: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_converted(out: Path, gguf_sha256: str, dtype: str) -> bool:
    marker = read_marker(out)
    return (
        marker is not None
        and marker.get("gguf_sha256") == gguf_sha256
        and marker.get("converter_version") == CONVERTER_VERSION
        and marker.get("dtype") == dtype
        and all((out / name).is_file() for name in marker.get("files", []))
    )


def convert(
    gguf_path: Path,
    out: Path,
    dtype: str = "float32",
    force: bool = False,
    chat_template: str | None = None,
) -> bool:
    """Convert unless ``out`` already holds this conversion; True if it converted."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}")
    gguf_sha256 = sha256_file(gguf_path)
    if not force and is_converted(out, gguf_sha256, dtype):
        log(f"{out} already holds {gguf_path.name} (sha256 {gguf_sha256[:12]}…, {dtype}); skipping")
        return False
    if out.exists() and any(out.iterdir()) and read_marker(out) is None and not force:
        raise SystemExit(f"{out} exists and is not a conversion made by this tool (use --force)")

    started = time.monotonic()
    from safetensors.torch import save_file

    gguf_file = GGUFFile(gguf_path)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = convert_weights(gguf_file, dtype)
        tied = "lm_head.weight" not in weights
        config = build_config(gguf_file, tied, dtype)
        config.save_pretrained(str(tmp))
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        del weights
        write_generation_config(gguf_file, tmp)
        write_tokenizer(gguf_file, tmp, chat_template)
        files = sorted(p.name for p in tmp.iterdir())
        marker = {
            "gguf": str(gguf_path),
            "gguf_sha256": gguf_sha256,
            "converter_version": CONVERTER_VERSION,
            "dtype": dtype,
            "files": files,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted {gguf_path} -> {out} ({dtype}) in {time.monotonic() - started:.1f} s")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True, help="input GGUF file")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored weight dtype")
    parser.add_argument("--force", action="store_true", help="convert even if already done")
    parser.add_argument(
        "--chat-template", type=Path, help="Jinja template file, used when the GGUF has none"
    )
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        parser.error(f"no such file: {args.gguf}")
    template = args.chat_template.read_text() if args.chat_template else None
    convert(args.gguf, args.out, args.dtype, args.force, template)
    return 0


if __name__ == "__main__":
    sys.exit(main())
