"""Remote-backend overhead: Lockgate in front of llama-server vs llama-server directly.

One llama-server (8 slots) serves both arms; Lockgate reaches it through the
``llamacpp`` backend. Same streaming clients, prompts (unique per request),
sampler settings and token counts; every round visits the arms in a random
order at each concurrency. Reported: aggregate end-to-end tok/s per arm, their
ratio, and the TTFT Lockgate adds (median of round medians).

llama-server's own prefill (~80 ms) hides a millisecond, so a second phase
measures the fixed cost precisely: one client, sequential streamed chat
requests (8 chunks, no pacing) to loadtests/mock_upstream.py, directly and
through Lockgate's ``openai`` backend; medians of TTFT and total time.

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
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import (
    Point,
    Workload,
    default_model,
    find_llama_server,
    free_port,
    http_wave,
    running,
    start_llama_server,
    start_lockgate,
)

HERE = Path(__file__).resolve().parent
SLOTS = 8


def _has_text(line: str) -> bool:
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def sequential_stream_times(url: str, requests: int) -> tuple[float, float]:
    """Median (TTFT, total) in ms of one client's sequential streamed chat requests."""
    body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ttft, total = [], []
    async with httpx.AsyncClient() as client:
        for i in range(requests + 20):  # the first 20 warm up
            started, first = time.perf_counter(), 0.0
            async with client.stream("POST", url, json=body) as response:
                async for line in response.aiter_lines():
                    if not first and line.startswith("data: {") and _has_text(line):
                        first = time.perf_counter()
            if i >= 20:
                ttft.append((first - started) * 1000)
                total.append((time.perf_counter() - started) * 1000)
    return statistics.median(ttft), statistics.median(total)


def fixed_overhead(workdir: Path, rounds: int) -> dict[str, float]:
    port = free_port()
    mock = [
        sys.executable,
        str(HERE / "mock_upstream.py"),
        "--port",
        str(port),
        "--chunks",
        "8",
        "--gap-ms",
        "0",
    ]
    direct = f"http://127.0.0.1:{port}/v1/chat/completions"
    models = (
        f"  - {{name: mock, backend: openai, base_url: 'http://127.0.0.1:{port}', "
        f"upstream_model: mock, health_interval: 60}}\n"
    )
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "lockgate": []}
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(mock, f"http://127.0.0.1:{port}/health", workdir / "mock.log"))
        gateway = stack.enter_context(start_lockgate(models, workdir)).replace(
            "/v1/completions", "/v1/chat/completions"
        )
        for _ in range(rounds):
            for arm, url in random.sample([("direct", direct), ("lockgate", gateway)], 2):
                results[arm].append(asyncio.run(sequential_stream_times(url, 300)))
    med = {
        arm: (statistics.median(t for t, _ in r), statistics.median(x for _, x in r))
        for arm, r in results.items()
    }
    return {
        "direct_ttft_ms": med["direct"][0],
        "lockgate_ttft_ms": med["lockgate"][0],
        "added_ttft_ms": med["lockgate"][0] - med["direct"][0],
        "added_total_ms": med["lockgate"][1] - med["direct"][1],
    }


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
    fixed = fixed_overhead(workdir, 3)
    print(
        f"\nfixed cost vs the mock upstream (1 client, streamed): TTFT "
        f"{fixed['direct_ttft_ms']:.2f} -> {fixed['lockgate_ttft_ms']:.2f} ms "
        f"(+{fixed['added_ttft_ms']:.2f} ms), whole request +{fixed['added_total_ms']:.2f} ms"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "rounds": work.rounds,
        "tokens": work.tokens,
        "slots": SLOTS,
        "rows": rows,
        "fixed_overhead": fixed,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
