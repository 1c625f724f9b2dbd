"""Engine benchmark: Lockgate over HTTP vs raw llama.cpp, llama-cpp-python and llama-server.

All arms run in one invocation, one after another, on the same model, prompt,
sampler settings (temperature 1, top-k 40, end-of-generation banned so every
sequence produces exactly --tokens tokens) and thread count:

* ``raw``         llama.cpp batched decoding through the C API, no server: the limit.
* ``lcpp-serial`` llama-cpp-python ``create_completion``, one request at a time.
* ``lockgate``    ``lockgate serve`` (embedded engine), N concurrent streaming clients.
* ``llama-server`` llama.cpp's C++ server with as many slots, same clients
  (skipped when no binary is found; see ``--llama-server``).

Reported per concurrency: aggregate decode tok/s (sum over clients of
(tokens-1)/(last-first token time)), end-to-end tok/s (all tokens / wall time)
and median TTFT. Prints a table, writes JSON and a PNG plot.

    python loadtests/bench_engine.py --concurrency 1,2,4,8,16 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from harness import (
    PROMPT,
    Point,
    Workload,
    default_model,
    embedded_model_yaml,
    find_llama_server,
    http_wave,
    median_point,
    start_llama_server,
    start_lockgate,
)

HERE = Path(__file__).resolve().parent


def run_baseline(mode: str, work: Workload, *extra: str) -> dict[str, float]:
    cmd = [sys.executable, str(HERE / "raw_llama.py"), mode, "--model", str(work.model)]
    cmd += ["--prompt", PROMPT, "--tokens", str(work.tokens), "--threads", str(work.threads)]
    cmd += ["--top-k", str(work.top_k), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def raw_point(work: Workload, concurrency: int) -> Point:
    r = run_baseline("batched", work, "--sequences", str(concurrency))
    return Point("raw", concurrency, r["decode_tok_s"], r["e2e_tok_s"], r["ttft_s"])


def serial_point(work: Workload) -> Point:
    r = run_baseline("serial", work, "--requests", "4")
    return Point("lcpp-serial", 1, r["e2e_tok_s"], r["e2e_tok_s"], r["ttft_s"])


def table(points: list[Point], levels: list[int]) -> str:
    arms = list(dict.fromkeys(p.arm for p in points))
    by = {(p.arm, p.concurrency): p for p in points}
    serial = next((p for p in points if p.arm == "lcpp-serial"), None)
    lines = ["decode tok/s (aggregate) | e2e tok/s | TTFT p50 ms", ""]
    header = f"{'arm':14s}" + "".join(f"{'c=' + str(n):>22s}" for n in levels)
    lines.append(header)
    for arm in arms:
        cells = []
        for n in levels:
            p = by.get((arm, n)) or (serial if arm == "lcpp-serial" else None)
            cells.append(
                f"{p.decode_tok_s:7.1f} {p.e2e_tok_s:6.1f} {p.ttft_s * 1000:6.0f}" if p else "-"
            )
        lines.append(f"{arm:14s}" + "".join(f"{c:>22s}" for c in cells))
    lines.append("")
    for n in levels:
        lg, raw = by.get(("lockgate", n)), by.get(("raw", n))
        ls = by.get(("llama-server", n))
        parts = [f"c={n:<3d}"]
        if lg and raw:
            parts.append(f"lockgate/raw decode {lg.decode_tok_s / raw.decode_tok_s:5.2f}")
        if lg and serial:
            parts.append(f"lockgate e2e/serial {lg.e2e_tok_s / serial.e2e_tok_s:5.2f}")
        if lg and ls:
            parts.append(f"lockgate/llama-server e2e {lg.e2e_tok_s / ls.e2e_tok_s:5.2f}")
        lines.append("  ".join(parts))
    return "\n".join(lines)


def plot(points: list[Point], levels: list[int], path: Path, work: Workload) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in dict.fromkeys(p.arm for p in points):
        mine = [p for p in points if p.arm == arm]
        if arm == "lcpp-serial":
            left.plot(levels, [mine[0].e2e_tok_s] * len(levels), "--", label=arm)
            continue
        left.plot([p.concurrency for p in mine], [p.e2e_tok_s for p in mine], "o-", label=arm)
        right.plot([p.concurrency for p in mine], [p.ttft_s * 1000 for p in mine], "o-", label=arm)
    left.set(xlabel="concurrent streams", ylabel="aggregate tok/s (end to end)", xscale="log")
    right.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", xscale="log")
    for ax in (left, right):
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"{work.model.name}: {work.tokens} tokens per stream, {work.threads} threads, "
        f"top-k {work.top_k or 'off'}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--top-k", type=int, default=40, help="40: llama.cpp's default; 0: the full vocabulary"
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--llama-server", default=None, help="path to llama-server")
    parser.add_argument("--arms", default="raw,lcpp-serial,lockgate,llama-server")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    arms = set(args.arms.split(","))
    slots = max(levels)
    work = Workload(
        args.model or default_model(), args.tokens, args.threads, args.top_k, args.rounds
    )
    out: Path = args.out or HERE / "results" / f"bench_engine_topk{work.top_k}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    server = find_llama_server(args.llama_server)
    if "llama-server" in arms and not server:
        print("  llama-server: no binary found (make llama-server builds one); arm skipped")
        arms.discard("llama-server")
    samples: dict[tuple[str, int], list[Point]] = {}

    with contextlib.ExitStack() as stack:
        # Both servers stay up for the whole run (idle, they cost nothing), so every round
        # can visit the arms in a fresh random order and slow drifts hit all arms alike.
        urls: dict[str, str] = {}
        if "lockgate" in arms:
            urls["lockgate"] = stack.enter_context(
                start_lockgate(embedded_model_yaml(work, slots), workdir)
            )
        if "llama-server" in arms and server:
            urls["llama-server"] = stack.enter_context(
                start_llama_server(server, work, slots, workdir)
            )
        for round_no in range(work.rounds):
            for n in levels:
                order = [a for a in ("raw", *urls) if a in arms]
                random.shuffle(order)
                for arm in order:
                    if arm == "raw":
                        point = raw_point(work, n)
                    else:
                        point = asyncio.run(http_wave(urls[arm], work, n))
                        point.arm = arm
                    samples.setdefault((arm, n), []).append(point)
                    print(
                        f"  round {round_no + 1} {arm:12s} c={n:<3d} "
                        f"decode {point.decode_tok_s:6.1f} tok/s",
                        flush=True,
                    )
    points = [median_point(group) for group in samples.values()]
    if "lcpp-serial" in arms:
        points.append(serial_point(work))

    report = table(points, levels)
    print()
    print(report)
    out.write_text(
        json.dumps(
            {
                "model": str(work.model),
                "tokens": work.tokens,
                "threads": work.threads,
                "rounds": work.rounds,
                "top_k": work.top_k,
                "points": [asdict(p) for p in points],
            },
            indent=2,
        )
    )
    png = out.with_suffix(".png")
    plot(points, levels, png, work)
    print(f"\nwrote {out} and {png}")


if __name__ == "__main__":
    main()
