"""Tiny random-weight GGUF models of the Llama and Qwen2 architectures, made at test time.

The project ships only Gemma weights; these files prove that the embedded llama.cpp engine
loads, tokenizes for and batches the two other families it has built-in chat templates for
(``llama3`` and ``chatml``), with nothing downloaded. Each file is well under a megabyte:
2 layers, hidden size 64, 4 query heads sharing 2 KV heads (GQA), F32 tensors.

The vocabulary is the real thing in miniature: GPT-2's 256 byte-level tokens (token id =
byte value), a few dozen BPE merges of words that chats are made of (``user``,
``assistant``, ``\\n\\n``...), then the family's special tokens with their real types, so
that the tokenizer's special-token parsing, pre-tokenizer and merges are all exercised.

The weights are random (seeded, small normal), so the models' output is meaningless text;
only its shape (how many tokens, which sequences were batched together) is worth testing.
Writing needs the ``gguf`` package (llama.cpp's own GGUF writer).

    >>> path = write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", seed=0)
    >>> LlamaModel(path).architecture
    'llama'
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

Architecture = Literal["llama", "qwen2"]

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
CONTEXT_LENGTH = 4096  # the engine's per-sequence default (2048) must fit in it
HEAD_DIM = N_EMBD // N_HEAD

# Words that BPE merges into one token each (in byte-level text "\n\n" is "ĊĊ").
MERGED_WORDS = (
    "\n\n", " the", "ing", "user", "assistant", "system", "name", "arguments",
    "Hello", " world", " you", " are", " is",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Family:
    pre: str  # tokenizer.ggml.pre: which pre-tokenizer regex llama.cpp splits text with
    specials: tuple[tuple[str, TokenType], ...]
    bos: str
    eos: str
    add_bos: bool
    rms_eps: float
    rope_base: float
    qkv_bias: bool


_C, _U = TokenType.CONTROL, TokenType.USER_DEFINED
_FAMILIES: dict[Architecture, _Family] = {
    # Llama 3 Instruct: <|eot_id|> is both EOS and EOT; every prompt starts with the BOS.
    "llama": _Family(
        pre="llama-bpe",
        specials=(
            ("<|begin_of_text|>", _C), ("<|end_of_text|>", _C), ("<|start_header_id|>", _C),
            ("<|end_header_id|>", _C), ("<|eot_id|>", _C), ("<|eom_id|>", _C),
            ("<|python_tag|>", _C),
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        add_bos=True,
        rms_eps=1e-5,
        rope_base=500000.0,
        qkv_bias=False,
    ),
    # Qwen2.5 Instruct: a BOS id is declared but never added; the tool-call tags are
    # user-defined (matched in any text), the chat markers control tokens.
    "qwen2": _Family(
        pre="qwen2",
        specials=(
            ("<|endoftext|>", _C), ("<|im_start|>", _C), ("<|im_end|>", _C),
            ("<tool_call>", _U), ("</tool_call>", _U),
        ),
        bos="<|endoftext|>",
        eos="<|im_end|>",
        add_bos=False,
        rms_eps=1e-6,
        rope_base=1000000.0,
        qkv_bias=True,
    ),
}  # fmt: skip


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte, by byte value.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, 0x7F-0xA0,
    0xAD) are moved, in order, to U+0100 onwards, so that a space is "Ġ" and "\\n" is "Ċ".
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, moved = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(0x100 + moved))
            moved += 1
    return alphabet


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE: merge the adjacent pair of lowest rank until no pair has one."""
    while len(symbols) > 1:
        pairs = [
            (ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(symbols))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _vocabulary(family: _Family) -> tuple[list[str], list[TokenType], list[str]]:
    """Tokens, their types and the merges: bytes, then merged words, then specials.

    A word's new merges join what the earlier merges leave of it, left to right, so that
    rank-ordered BPE (the qwen2 pre-tokenizer's) makes it one token, as a lookup of the
    whole word (llama-bpe's) does; earlier words are unaffected, as their merges rank lower.
    """
    alphabet = byte_alphabet()
    tokens = list(alphabet)
    ranks: dict[tuple[str, str], int] = {}
    for word in MERGED_WORDS:
        pieces = _apply_merges([alphabet[b] for b in word.encode("utf-8")], ranks)
        while len(pieces) > 1:
            ranks[pieces[0], pieces[1]] = len(ranks)
            pieces[:2] = [pieces[0] + pieces[1]]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    merges = [f"{a} {b}" for a, b in ranks]  # dicts keep insertion order: by rank
    types = [TokenType.NORMAL] * len(tokens)
    for text, kind in family.specials:
        tokens.append(text)
        types.append(kind)
    return tokens, types, merges


def write_tiny_gguf(path: Path, arch: Architecture, *, seed: int = 0) -> Path:
    """Write a tiny random ``arch`` model to ``path`` and return ``path``.

    The same ``arch`` and ``seed`` give the same bytes. No chat template is written, so
    the engine picks its built-in one by architecture (llama → llama3, qwen2 → chatml).
    """
    family = _FAMILIES[arch]
    tokens, types, merges = _vocabulary(family)
    rng = np.random.RandomState(seed)

    def normal(*shape: int) -> np.ndarray[tuple[int, ...], np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    n_kv = N_HEAD_KV * HEAD_DIM

    writer = GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(family.rms_eps)
    writer.add_rope_freq_base(family.rope_base)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(family.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(family.bos))
    writer.add_eos_token_id(tokens.index(family.eos))
    writer.add_add_bos_token(family.add_bos)
    if arch == "llama":
        writer.add_eot_token_id(tokens.index("<|eot_id|>"))
        writer.add_eom_token_id(tokens.index("<|eom_id|>"))
    else:
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))

    # numpy shapes are (rows, columns); GGUF stores them reversed, as llama.cpp expects.
    writer.add_tensor("token_embd.weight", normal(len(tokens), N_EMBD))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", normal(len(tokens), N_EMBD))
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones)
        writer.add_tensor(f"{blk}.attn_q.weight", normal(N_HEAD * HEAD_DIM, N_EMBD))
        writer.add_tensor(f"{blk}.attn_k.weight", normal(n_kv, N_EMBD))
        writer.add_tensor(f"{blk}.attn_v.weight", normal(n_kv, N_EMBD))
        if family.qkv_bias:
            writer.add_tensor(f"{blk}.attn_q.bias", normal(N_HEAD * HEAD_DIM))
            writer.add_tensor(f"{blk}.attn_k.bias", normal(n_kv))
            writer.add_tensor(f"{blk}.attn_v.bias", normal(n_kv))
        writer.add_tensor(f"{blk}.attn_output.weight", normal(N_EMBD, N_HEAD * HEAD_DIM))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones)
        writer.add_tensor(f"{blk}.ffn_gate.weight", normal(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", normal(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", normal(N_EMBD, N_FF))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
