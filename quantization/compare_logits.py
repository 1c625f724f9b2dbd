"""Check a converted model against llama.cpp: same tokens, same next-token logits.

    python -m quantization.compare_logits --gguf PATH --hf DIR \\
        [--llama-python /work/main/.venv/bin/python] \\
        [--hf-python ~/.cache/lockgate/vllm-venv/bin/python]

The two sides live in different virtualenvs (llama-cpp-python in the project's, torch and
transformers in vLLM's), so this runs each side as a subprocess of the interpreter that has it
(``--role llama`` / ``--role hf``) and compares what they write. Only the standard library and
numpy are needed by the process that compares.

Checks, each printed with its numbers; the exit status is 1 if any fails:

* tokenization: the converted tokenizer (``AutoTokenizer``, as vLLM loads it) gives the same ids
  as llama.cpp (``tokenize(add_bos=True, special=True)``) for every string of a small corpus;
* logits: both models get llama.cpp's ids for a few prompts; at the last position of every prompt
  the top-1 token must be the same and the top-10 sets must share at least ``--min-top10``
  tokens; over all positions the top-1 agreement and the mean top-10 overlap must reach
  ``--min-top1-rate`` / ``--min-top10-mean``. The KL divergence and the largest log-probability
  difference are reported too.

The reference is not exact: llama.cpp multiplies quantized weights with activations it quantizes
to 8 bits, while the converted model multiplies dequantized weights in float32, so logits differ
slightly and near-ties may swap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
DEFAULT_LLAMA_PYTHON = PROJECT / ".venv" / "bin" / "python"
DEFAULT_HF_PYTHON = Path.home() / ".cache" / "lockgate" / "vllm-venv" / "bin" / "python"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
    "Lighthouses were built to guide ships safely along dangerous coasts. The first ones were",
    "1, 2, 3, 5, 8, 13, 21,",
    "La tour Eiffel se trouve à Paris, la capitale de la",
    "Q: What is the boiling point of water at sea level?\nA:",
]

TOKENIZER_CORPUS = [
    *PROMPTS,
    "",
    " ",
    "  leading and trailing spaces  ",
    "multiple   spaces\tand\ttabs\t\t\tand\n\n\nnewlines\n",
    "Ünïcödé, 日本語のテキスト, 한국어, русский текст, العربية, emoji 🤖🎉👍🏽",
    "<table><tr><td>cell</td></tr></table> <b>bold</b>",
    "<bos>text with <start_of_turn> control <end_of_turn> tokens<eos>",
    "URLs: https://example.com/path?q=1&x=%20 and e-mail a.b@c.org",
    "Numbers 1234567890 3.14159 -42 1e-6 0x1F",
    "CamelCaseIdentifiers snake_case_names kebab-case SCREAMING",
    "    indented code:\n        return {'a': [1, 2, 3]}\n",
    "rare chars: \u2581 \u00a0 \u200b \x00 \x7f \ufffd \U0001f9ec",
    "a" * 300,
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
]


# ---------------------------------------------------------------------------- llama.cpp side


def run_llama(gguf: Path, out: Path) -> None:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=512,
        n_batch=512,
        n_threads=min(2, os.cpu_count() or 1),
        logits_all=True,
        verbose=False,
    )
    corpus = [llm.tokenize(s.encode(), add_bos=True, special=True) for s in TOKENIZER_CORPUS]
    arrays: dict[str, Any] = {}
    for i, prompt in enumerate(PROMPTS):
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.reset()  # type: ignore[no-untyped-call]
        llm.eval(ids)
        arrays[f"ids{i}"] = np.array(ids, dtype=np.int64)
        arrays[f"logits{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    np.savez(out, **arrays)
    out.with_suffix(".json").write_text(json.dumps({"corpus": corpus}))


# ---------------------------------------------------------------------------- transformers side


def run_hf(model_dir: Path, ids_file: Path, out: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    corpus = [tokenizer(s).input_ids for s in TOKENIZER_CORPUS]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    prompts = np.load(ids_file)
    arrays: dict[str, Any] = {}
    with torch.inference_mode():
        for i in range(len(PROMPTS)):
            ids = torch.from_numpy(prompts[f"ids{i}"]).unsqueeze(0)
            logits = model(input_ids=ids).logits[0].float().numpy()
            arrays[f"logits{i}"] = logits
    np.savez(out, **arrays)
    out.with_suffix(".json").write_text(json.dumps({"corpus": corpus}))


# ---------------------------------------------------------------------------- comparison


def log_softmax(x: Any) -> Any:
    import numpy as np

    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(
    llama_npz: Path, hf_npz: Path, min_top10: int, min_top1_rate: float, min_top10_mean: float
) -> bool:
    import numpy as np

    ok = True
    llama_corpus = json.loads(llama_npz.with_suffix(".json").read_text())["corpus"]
    hf_corpus = json.loads(hf_npz.with_suffix(".json").read_text())["corpus"]
    mismatched = [i for i, (a, b) in enumerate(zip(llama_corpus, hf_corpus, strict=True)) if a != b]
    print(
        f"tokenization: {len(TOKENIZER_CORPUS) - len(mismatched)}/{len(TOKENIZER_CORPUS)} "
        "strings give identical ids"
    )
    for i in mismatched:
        ok = False
        print(f"  MISMATCH {TOKENIZER_CORPUS[i][:60]!r}")
        print(f"    llama.cpp: {llama_corpus[i][:40]}")
        print(f"    converted: {hf_corpus[i][:40]}")

    ref, got = np.load(llama_npz), np.load(hf_npz)
    top1_hits = top1_total = 0
    overlaps: list[int] = []
    kls: list[float] = []
    max_dlogp = 0.0
    print(f"logits: {len(PROMPTS)} prompts (last position: top-1 llama/converted, top-10 overlap)")
    for i, prompt in enumerate(PROMPTS):
        a, b = ref[f"logits{i}"], got[f"logits{i}"]
        if a.shape != b.shape:
            print(f"  prompt {i}: shape {a.shape} vs {b.shape}")
            ok = False
            continue
        la, lb = log_softmax(a.astype(np.float64)), log_softmax(b.astype(np.float64))
        top_a = np.argsort(-a, axis=-1)[:, :10]
        top_b = np.argsort(-b, axis=-1)[:, :10]
        for pos in range(a.shape[0]):
            overlaps.append(len(set(top_a[pos]) & set(top_b[pos])))
            top1_hits += int(top_a[pos, 0] == top_b[pos, 0])
            top1_total += 1
            kls.append(float((np.exp(la[pos]) * (la[pos] - lb[pos])).sum()))
            max_dlogp = max(
                max_dlogp, float(np.abs(la[pos, top_a[pos]] - lb[pos, top_a[pos]]).max())
            )
        last_overlap = overlaps[-1]
        same = top_a[-1, 0] == top_b[-1, 0]
        if not same or last_overlap < min_top10:
            ok = False
        print(
            f"  {'ok ' if same and last_overlap >= min_top10 else 'BAD'} "
            f"{a.shape[0]:3d} tokens, top-1 {top_a[-1, 0]}/{top_b[-1, 0]}, "
            f"top-10 overlap {last_overlap}/10, KL {kls[-1]:.4f}  {prompt[:40]!r}"
        )
    rate = top1_hits / max(top1_total, 1)
    mean_overlap = sum(overlaps) / max(len(overlaps), 1)
    print(
        f"all {top1_total} positions: top-1 agreement {rate:.3f} (min {min_top1_rate}), "
        f"mean top-10 overlap {mean_overlap:.2f}/10 (min {min_top10_mean}), "
        f"min top-10 overlap {min(overlaps, default=0)}/10, "
        f"mean KL(llama||converted) {sum(kls) / max(len(kls), 1):.4f}, "
        f"max KL {max(kls, default=0):.4f}, "
        f"max |dlogp| on llama's top-10 {max_dlogp:.3f}"
    )
    if rate < min_top1_rate or mean_overlap < min_top10_mean:
        ok = False
    print("AGREE" if ok else "DISAGREE")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--hf", type=Path, required=True, help="converted model directory")
    parser.add_argument("--llama-python", type=Path, default=DEFAULT_LLAMA_PYTHON)
    parser.add_argument("--hf-python", type=Path, default=DEFAULT_HF_PYTHON)
    parser.add_argument("--min-top10", type=int, default=8, help="per prompt, last position")
    parser.add_argument("--min-top1-rate", type=float, default=0.9, help="over all positions")
    parser.add_argument("--min-top10-mean", type=float, default=8.5, help="over all positions")
    parser.add_argument("--role", choices=("compare", "llama", "hf"), default="compare")
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role == "llama":
        run_llama(args.gguf, args.dump)
        return 0
    if args.role == "hf":
        run_hf(args.hf, args.ids, args.dump)
        return 0

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
    }
    common = ["-m", "quantization.compare_logits", "--gguf", str(args.gguf), "--hf", str(args.hf)]
    with tempfile.TemporaryDirectory(prefix="compare-logits-") as tmp:
        llama_npz, hf_npz = Path(tmp) / "llama.npz", Path(tmp) / "hf.npz"
        subprocess.run(
            [str(args.llama_python), *common, "--role", "llama", "--dump", str(llama_npz)],
            check=True,
            env=env,
            cwd=PROJECT,
        )
        subprocess.run(
            [
                str(args.hf_python),
                *common,
                "--role",
                "hf",
                "--ids",
                str(llama_npz),
                "--dump",
                str(hf_npz),
            ],
            check=True,
            env=env,
            cwd=PROJECT,
        )
        agree = compare(llama_npz, hf_npz, args.min_top10, args.min_top1_rate, args.min_top10_mean)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
