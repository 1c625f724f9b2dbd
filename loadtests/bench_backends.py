"""Remote-backend overhead: Lockgate in front of llama-server vs llama-server directly.

One llama-server (8 slots) serves both arms; Lockgate reaches it through the
``llamacpp`` backend. Same streaming clients, prompts (unique per request),
sampler settings and token counts; every round visits the arms in a random
order at each concurrency. Reported: aggregate end-to-end tok/s per arm, their
ratio, and the TTFT Lockgate adds (median of round medians).

    python loadtests/bench_backends.py --concurrency 1,4,8 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

from harness import (
    Point,
    Workload,
    default_model,
    find_llama_server,
    http_wave,
    start_llama_server,
    start_lockgate,
)

HERE = Path(__file__).resolve().parent
SLOTS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_backends.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    work = Workload(default_model(), args.tokens, args.threads, 40, args.rounds)
    binary = find_llama_server(args.llama_server)
    if binary is None:
        raise SystemExit("llama-server not found; `make llama-server` builds it")
    workdir = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    samples: dict[tuple[str, int], list[Point]] = {}
    with contextlib.ExitStack() as stack:
        direct = stack.enter_context(start_llama_server(binary, work, SLOTS, workdir))
        upstream = direct.removesuffix("/v1/completions")
        models = (
            f"  - {{name: bench, backend: llamacpp, base_url: '{upstream}', "
            f"upstream_model: bench, concurrency: {SLOTS}}}\n"
        )
        urls = {"direct": direct, "lockgate": stack.enter_context(start_lockgate(models, workdir))}
        for round_no in range(work.rounds):
            for n in levels:
                order = list(urls)
                random.shuffle(order)
                for arm in order:
                    point = asyncio.run(http_wave(urls[arm], work, n))
                    point.arm = arm
                    samples.setdefault((arm, n), []).append(point)
                    print(
                        f"  round {round_no + 1} {arm:8s} c={n:<2d} e2e {point.e2e_tok_s:6.1f} "
                        f"tok/s, TTFT {point.ttft_s * 1000:6.1f} ms",
                        flush=True,
                    )

    rows = []
    print(
        f"\n{'c':>3s} {'direct tok/s':>13s} {'lockgate tok/s':>15s} {'ratio':>6s} "
        f"{'direct TTFT':>12s} {'added TTFT':>11s}"
    )
    for n in levels:
        d, g = samples[("direct", n)], samples[("lockgate", n)]
        d_tps = statistics.median(p.e2e_tok_s for p in d)
        g_tps = statistics.median(p.e2e_tok_s for p in g)
        d_ttft = statistics.median(p.ttft_s for p in d)
        added = statistics.median(p.ttft_s for p in g) - d_ttft
        rows.append(
            {
                "concurrency": n,
                "direct_tok_s": d_tps,
                "lockgate_tok_s": g_tps,
                "ratio": g_tps / d_tps,
                "direct_ttft_ms": d_ttft * 1000,
                "added_ttft_ms": added * 1000,
            }
        )
        print(
            f"{n:3d} {d_tps:13.1f} {g_tps:15.1f} {g_tps / d_tps:6.3f} "
            f"{d_ttft * 1000:10.1f}ms {added * 1000:9.1f}ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"rounds": work.rounds, "tokens": work.tokens, "slots": SLOTS, "rows": rows}, indent=2
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
