"""Cost of auth and limits: Lockgate's request rate with them off and on (memory, Redis).

Arms, all served at the same time and loaded one at a time:

    off     no tenants, so auth is off (the baseline)
    memory  one tenant and key, all five limits too high to refuse; SQLite, in-process counters
    redis   the same tenant with ``redis_url``: store and counters in a private redis-server
    direct  loadtests/mock_upstream.py without Lockgate (the floor), for context

A point is a closed loop of ``c`` aiohttp clients sending non-streamed chat
completions for 1 s (discarded) and then ``--seconds``; every round visits the
arms in a random order at each concurrency. Reported: medians over rounds of
requests/s, p50/p99 latency and the gateway's CPU ms per request (from /proc;
the least noisy number), and ratios to ``off``: medians of per-round ratios.

    python loadtests/bench_auth.py --rounds 5 --seconds 4 --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import uvloop
from harness import (
    LIMITS,
    Pinning,
    busy_seconds,
    cpu_seconds,
    free_port,
    gateway_env,
    git_revision,
    mock_model,
    new_key,
    spawned,
    wait_http,
    wait_redis,
    write_lockgate_config,
)

HERE = Path(__file__).resolve().parent
BODY = json.dumps(
    {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
).encode()
JSON = {"Content-Type": "application/json"}
WARMUP_S = 1.0
ARMS = ["off", "memory", "redis", "direct"]


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: dict[str, float]  # CPU ms per request, by process name
    # CPUs busy with anything but this arm's processes and the client (0-2): other
    # load on the machine, which makes a point's request rate unreliable.
    other_cpus: float

    @property
    def gateway_cpu_ms(self) -> float | None:
        return self.cpu_ms.get("gateway")


@dataclass(frozen=True)
class Arm:
    url: str
    headers: dict[str, str]
    pids: dict[str, int]  # the processes whose CPU time is charged to this arm


def write_config(workdir: Path, *, mock_port: int, key_hash: str | None, redis: str | None) -> int:
    # concurrency 64 > the largest client count: the arms differ only in auth and limits.
    models = [mock_model("mock", mock_port, concurrency=64)]
    return write_lockgate_config(workdir, models=models, key_hash=key_hash, redis=redis)[1]


async def drive(
    session: aiohttp.ClientSession, arm: Arm, concurrency: int, seconds: float
) -> tuple[list[float], Counter[int]]:
    """Latencies (s) and non-200 statuses of ``concurrency`` closed-loop clients."""
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    errors: Counter[int] = Counter()

    async def client() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            async with session.post(arm.url, data=BODY, headers=arm.headers) as response:
                await response.read()
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                errors[response.status] += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors


async def measure(arm: Arm, concurrency: int, seconds: float) -> Sample:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await drive(session, arm, concurrency, WARMUP_S)  # connections, caches, key lookup
        pids = arm.pids | {"client": os.getpid()}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        busy, started = busy_seconds(), time.perf_counter()
        latencies, errors = await drive(session, arm, concurrency, seconds)
        wall = time.perf_counter() - started
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        other = busy_seconds() - busy - sum(used.values())
    if errors:
        # A 429 means the limits above are too low for this machine; any error makes
        # the rate meaningless.
        raise SystemExit(f"{arm.url}: non-200 responses {dict(errors)} at c={concurrency}")
    cuts = statistics.quantiles(latencies, n=100)
    return Sample(
        rps=len(latencies) / wall,
        p50_ms=cuts[49] * 1000,
        p99_ms=cuts[98] * 1000,
        cpu_ms={name: s * 1000 / len(latencies) for name, s in used.items()},
        other_cpus=max(other, 0.0) / wall,
    )


def start_gateway(
    stack: contextlib.ExitStack,
    workdir: Path,
    cmd: list[str],
    *,
    mock_port: int,
    key_hash: str | None,
    redis: str | None,
) -> tuple[subprocess.Popen[bytes], str]:
    workdir.mkdir()
    port = write_config(workdir, mock_port=mock_port, key_hash=key_hash, redis=redis)
    cmd = [*cmd, "--config", str(workdir / "lockgate.yaml")]
    proc = stack.enter_context(spawned(cmd, workdir / "lockgate.log", gateway_env(workdir)))
    return proc, f"http://127.0.0.1:{port}"


def start_all(stack: contextlib.ExitStack, root: Path, pin: Pinning) -> dict[str, Arm]:
    """Every server once, kept up across rounds.

    Restarting per round would add seconds of startup and a cold process to every
    point for no gain: only one arm is loaded at a time, the idle ones wake once a
    second at most (usage flush), and each point starts with a warm-up.
    """
    mock_port, redis_port = free_port(), free_port()
    mock = [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock_port)]
    mock_proc = stack.enter_context(
        spawned([*pin.helpers, *mock, "--chunks", "8", "--gap-ms", "0"], root / "mock.log")
    )
    redis = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]
    redis_pid = stack.enter_context(spawned([*pin.helpers, *redis], root / "redis.log")).pid
    wait_http(f"http://127.0.0.1:{mock_port}/health", mock_proc)
    wait_redis(redis_port)
    key, key_hash = new_key()
    variants = {
        "off": (None, None),
        "memory": (key_hash, None),
        "redis": (key_hash, f"redis://127.0.0.1:{redis_port}/0"),
    }
    chat = "/v1/chat/completions"
    arms = {"direct": Arm(f"http://127.0.0.1:{mock_port}{chat}", JSON, {"mock": mock_proc.pid})}
    gateway = [*pin.gateway, sys.executable, "-m", "gateway", "serve"]
    started = {}
    for name, (hash_, redis_url) in variants.items():
        proc, base = start_gateway(
            stack, root / name, gateway, mock_port=mock_port, key_hash=hash_, redis=redis_url
        )
        started[name] = (proc, base)
        pids = {"gateway": proc.pid, "mock": mock_proc.pid}
        if redis_url:
            pids["redis"] = redis_pid
        headers = JSON | ({"Authorization": f"Bearer {key}"} if hash_ else {})
        arms[name] = Arm(base + chat, headers, pids)
    for proc, base in started.values():  # started together, so their imports overlap
        wait_http(f"{base}/health/ready", proc)
    check_auth(arms)
    return arms


def check_auth(arms: dict[str, Arm]) -> None:
    """Without a key, ``off`` must answer and the others refuse: each arm is what it says."""
    for name, arm in arms.items():
        status = httpx.post(arm.url, content=BODY, headers=JSON).status_code
        if status != (401 if "Authorization" in arm.headers else 200):
            raise SystemExit(f"{name}: {status} without a key; is auth configured as meant?")


def paired_ratio(points: list[Sample], offs: list[Sample], metric: str) -> float | None:
    """Median of per-round ratios to ``off``: points seconds apart share a shared VM's drift."""
    values = [(getattr(p, metric), getattr(o, metric)) for p, o in zip(points, offs, strict=True)]
    return statistics.median(a / b for a, b in values) if values[0][0] is not None else None


def summarise(samples: dict[tuple[str, int], list[Sample]]) -> list[dict[str, Any]]:
    """Medians over rounds per arm and concurrency, with ratios to ``off``."""
    rows: list[dict[str, Any]] = []
    for (arm, n), points in samples.items():
        offs = samples["off", n]
        rows.append(
            {
                "arm": arm,
                "concurrency": n,
                "rps": statistics.median(p.rps for p in points),
                "rps_ratio_vs_off": paired_ratio(points, offs, "rps"),
                "p50_ms": statistics.median(p.p50_ms for p in points),
                "p99_ms": statistics.median(p.p99_ms for p in points),
                "cpu_ms_per_request": {
                    k: statistics.median(p.cpu_ms[k] for p in points) for k in points[0].cpu_ms
                },
                "gateway_cpu_ratio_vs_off": paired_ratio(points, offs, "gateway_cpu_ms"),
                "other_cpus": statistics.median(p.other_cpus for p in points),
                "rounds": [asdict(p) for p in points],
            }
        )
    return sorted(rows, key=lambda r: (r["concurrency"], ARMS.index(r["arm"])))


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| c  | arm    |   req/s | vs off | p50 ms | p99 ms | gw CPU ms/req | vs off "
        "| redis CPU ms/req | other load |\n|----|--------|---------|--------|--------|--------|"
        "---------------|--------|------------------|------------|"
    )
    for r in rows:
        cpu = r["cpu_ms_per_request"]
        print(
            f"| {r['concurrency']:<2d} | {r['arm']:6s} | {r['rps']:7.0f} | "
            f"{r['rps_ratio_vs_off']:6.3f} | {r['p50_ms']:6.2f} | {r['p99_ms']:6.2f} | "
            f"{_cell(cpu.get('gateway'), 13, 3)} | {_cell(r['gateway_cpu_ratio_vs_off'], 6, 3)} "
            f"| {_cell(cpu.get('redis'), 16, 3)} | {r['other_cpus']:10.2f} |"
        )
    if max(r["other_cpus"] for r in rows) > 0.1:
        print("\nwarning: other processes kept the machine busy (other load, in CPUs); rerun")


def run_rounds(
    arms: dict[str, Arm], levels: list[int], rounds: int, seconds: float
) -> dict[tuple[str, int], list[Sample]]:
    samples: dict[tuple[str, int], list[Sample]] = {}
    for round_no in range(1, rounds + 1):
        for n in levels:
            for name in random.sample(list(arms), len(arms)):
                point = uvloop.run(measure(arms[name], n, seconds))
                samples.setdefault((name, n), []).append(point)
                print(
                    f"  round {round_no} c={n:<2d} {name:6s} {point.rps:7.0f} req/s  "
                    f"p50 {point.p50_ms:6.2f} ms  gateway CPU {point.gateway_cpu_ms or 0:.3f} "
                    f"ms/req  other load {point.other_cpus:.2f} CPUs",
                    flush=True,
                )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_auth.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    pin, revision = Pinning.detect(), git_revision()  # before start: the code they import
    with contextlib.ExitStack() as stack:
        arms = start_all(stack, Path(tempfile.mkdtemp(prefix="bench-auth-")), pin)
        if pin.client_cpus is not None:
            os.sched_setaffinity(0, pin.client_cpus)
        rows = summarise(run_rounds(arms, levels, args.rounds, args.seconds))
    print_table(rows)
    report = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": revision,
        "rounds": args.rounds,
        "seconds_per_point": args.seconds,
        "warmup_seconds": WARMUP_S,
        "concurrency": levels,
        "arms": ARMS,
        "request": json.loads(BODY),
        "limits": LIMITS,
        "pinning": pin.describe(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
