"""Can one large prompt stall every other client? A probe's latency while it is refused.

Each arm is ``lockgate serve`` on the default model (n_ctx 2048). For each prompt size a
chat of that many characters is sent while a probe asks ``/health/live`` every 5 ms; the
probe's worst latency during the big request, and the big request's own time and status,
are recorded (medians over rounds, and the worst of all). Arms: this checkout, and with
``--baseline REV`` that revision (a git worktree), side by side in one run. Sizes run in a
random order each round.

    python loadtests/bench_stall.py --baseline 04e8c08 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from harness import (
    baseline_tree,
    free_port,
    gateway_env,
    git_revision,
    spawned,
    wait_http,
)

HERE = Path(__file__).resolve().parent
SIZES = (64 * 1024, 2 * 1024 * 1024, 10 * 1024 * 1024)
PROBE_EVERY = 0.005


async def one(base: str, size: int) -> dict[str, float | int]:
    """The big request's status and seconds, and the probe's latencies meanwhile."""
    words = ("lighthouse keeper " * (size // 18 + 1))[:size]
    body = {"model": "gemma", "messages": [{"role": "user", "content": words}], "max_tokens": 8}
    probes: list[float] = []
    done = asyncio.Event()
    async with aiohttp.ClientSession() as session:

        async def probe() -> None:
            while not done.is_set():
                started = time.perf_counter()
                async with session.get(f"{base}/health/live") as r:
                    await r.read()
                probes.append(time.perf_counter() - started)
                await asyncio.sleep(PROBE_EVERY)

        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        async with session.post(f"{base}/v1/chat/completions", json=body) as r:
            await r.read()
            status = r.status
        seconds = time.perf_counter() - started
        done.set()
        await prober
    return {
        "status": status,
        "request_ms": seconds * 1000,
        "probe_max_ms": max(probes) * 1000,
        "probes": len(probes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--baseline", help="a git revision to run beside this checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_stall.json")
    args = parser.parse_args()
    results: dict[str, dict[int, list[dict[str, float | int]]]] = {}
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="bench-stall-"))
        arms: dict[str, str] = {}
        trees = {"lockgate": HERE.parent}
        if args.baseline:
            trees["baseline"] = baseline_tree(stack, root, args.baseline)
        for name, tree in trees.items():
            port, workdir = free_port(), root / f"{name}-run"
            workdir.mkdir()
            config = workdir / "config.yaml"
            config.write_text(
                f"server: {{port: {port}, log_level: warning}}\n"
                "models:\n  - {name: gemma, n_ctx: 2048, max_sequences: 4}\n"
            )
            env = gateway_env(workdir) | {"PYTHONPATH": str(tree)}
            cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
            proc = stack.enter_context(spawned(cmd, workdir / "log.txt", env, cwd=tree))
            arms[name] = f"http://127.0.0.1:{port}"
            wait_http(f"{arms[name]}/health/ready", proc)
        for round_no in range(1, args.rounds + 1):
            for size in random.sample(SIZES, len(SIZES)):
                for name in random.sample(list(arms), len(arms)):
                    r = asyncio.run(one(arms[name], size))
                    results.setdefault(name, {}).setdefault(size, []).append(r)
                    print(f"  round {round_no} {name:9s} {size / 1e6:6.2f} MB  {r}", flush=True)
    rows = []
    for name, by_size in results.items():
        for size, runs in sorted(by_size.items()):
            rows.append(
                {
                    "arm": name,
                    "prompt_bytes": size,
                    "status": sorted({int(r["status"]) for r in runs}),
                    "request_ms": sorted(r["request_ms"] for r in runs)[len(runs) // 2],
                    "probe_max_ms": max(r["probe_max_ms"] for r in runs),
                    "probe_max_ms_median": sorted(r["probe_max_ms"] for r in runs)[len(runs) // 2],
                }
            )
    print("\n| arm | prompt | status | refused in (median) | /health/live worst | its median |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        size, worst, median = r["prompt_bytes"] / 1e6, r["probe_max_ms"], r["probe_max_ms_median"]
        print(
            f"| {r['arm']} | {size:.2f} MB | {r['status']} | {r['request_ms']:.0f} ms | "
            f"{worst:.1f} ms | {median:.1f} ms |"
        )
    report = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
        "baseline": args.baseline,
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
