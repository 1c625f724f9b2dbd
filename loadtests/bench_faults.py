"""10,000 clients that hang up at random points: does anything leak?

``lockgate serve`` in front of the embedded engine, a real llama-server and the fake backend
(few slots each, so requests also queue). 16 clients run ``--requests`` requests between
them, each leaving at a seeded random point: while queued, before the first token, after
some streamed chunks, or never. Afterwards: slots in use, queued requests and engine
sequences (all must return to 0), requests finished by status, completion tokens billed
against those the clients received. Table and JSON (the make-test version of this is
tests/integration/test_faults.py, with 1,000).

    python loadtests/bench_faults.py --requests 10000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
from harness import (
    default_model,
    find_llama_server,
    free_port,
    gateway_env,
    git_revision,
    spawned,
    wait_http,
)

HERE = Path(__file__).resolve().parent
CLIENTS = 16
NO_EOG = {"1": -100, "106": -100}
MODELS = ("gemma", "remote", *["slow"] * 14)
LEAVES = ("queued", "before_first", "mid_stream", "mid_stream", "never")
CONFIG = """server: {{port: {port}, log_level: warning}}
models:
  - {{name: gemma, n_ctx: 512, max_sequences: 4}}
  - {{name: slow, backend: fake, delay: 0.002, capacity: 4}}
  - {{name: remote, backend: llamacpp, base_url: "{upstream}", upstream_model: gemma,
      concurrency: 4}}
scheduler: {{max_wait: 60}}
"""


async def one(http: httpx.AsyncClient, rng: random.Random, leaves: Counter[str]) -> int:
    model = rng.choice(MODELS)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story " * rng.randint(1, 4)}],
        "max_tokens": rng.randint(2, 12) if model != "slow" else rng.randint(4, 24),
        "stream": True,
        "logit_bias": NO_EOG if model != "slow" else None,
    }
    leave = rng.choice(LEAVES)
    leaves[leave] += 1
    received = 0
    try:
        async with asyncio.timeout(rng.uniform(0.001, 0.03) if leave == "queued" else 120):
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if leave == "before_first":
                    return 0
                keep = rng.randint(1, 12) if leave == "mid_stream" else 10**9
                async for line in response.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        received += 1
                        if received >= keep:
                            break
    except TimeoutError:
        pass
    return received


def metrics(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def hang_up(base: str, requests: int) -> tuple[int, Counter[str]]:
    leaves: Counter[str] = Counter()
    rng = random.Random(1234)
    per_client = [requests // CLIENTS + (i < requests % CLIENTS) for i in range(CLIENTS)]
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as http:

        async def client(n: int, seed: int) -> int:
            mine = random.Random(seed)
            return sum([await one(http, mine, leaves) for _ in range(n)])

        totals = await asyncio.gather(*(client(n, rng.randrange(1 << 30)) for n in per_client))
    return sum(totals), leaves


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--llama-server", help="path to llama-server (default: make's build)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_faults.json")
    args = parser.parse_args()
    binary = find_llama_server(args.llama_server)
    if binary is None:
        raise SystemExit("llama-server not found: run `make llama-server`")
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="bench-faults-"))
        up = free_port()
        cmd = [binary, "-m", str(default_model()), "--host", "127.0.0.1", "--port", str(up)]
        cmd += ["-np", "4", "-c", "2048", "-t", "2", "--alias", "gemma", "--metrics"]
        upstream = stack.enter_context(spawned(cmd, root / "llama-server.log"))
        wait_http(f"http://127.0.0.1:{up}/health", upstream)
        port = free_port()
        (root / "config.yaml").write_text(
            CONFIG.format(port=port, upstream=f"http://127.0.0.1:{up}")
        )
        gw = [sys.executable, "-m", "gateway", "serve", "--config", str(root / "config.yaml")]
        proc = stack.enter_context(spawned(gw, root / "lockgate.log", gateway_env(root)))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health/ready", proc)
        started = time.monotonic()
        received, leaves = asyncio.run(hang_up(base, args.requests))
        seconds = time.monotonic() - started
        settle = time.monotonic()
        while True:
            m = metrics(base)
            busy = {
                k: v
                for k, v in m.items()
                if v
                and re.match(r"lockgate_(slots_used|queue_depth|engine_running_sequences)\{", k)
            }
            if not busy or time.monotonic() - settle > 60:
                break
            time.sleep(0.2)
        drained_s = time.monotonic() - settle
    statuses: Counter[str] = Counter()
    for k, v in m.items():
        # The chats only: probes and scrapes are counted too (endpoint "health", "metrics").
        found = re.match(r'lockgate_requests_total\{endpoint="chat",.*status="(\d+)"', k)
        if found:
            statuses[found.group(1)] += int(v)
    billed = sum(v for k, v in m.items() if k.startswith("lockgate_completion_tokens_total{"))
    report = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
        "requests": args.requests,
        "clients": CLIENTS,
        "seconds": round(seconds, 1),
        "leaves": dict(leaves),
        "finished_by_status": dict(statuses),
        "left_busy": busy,
        "drained_in_s": round(drained_s, 2),
        "completion_tokens_billed": int(billed),
        "content_chunks_received": received,
    }
    print("\n| what | value |\n|---|---:|")
    for key in ("requests", "seconds", "drained_in_s", "completion_tokens_billed",
                "content_chunks_received"):  # fmt: skip
        print(f"| {key} | {report[key]} |")
    print(f"| finished by status | {dict(statuses)} |")
    print(f"| left busy | {busy or 'nothing'} |")
    print(f"| hang-ups by point | {dict(leaves)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if busy:
        raise SystemExit(f"leaked: {busy}")


if __name__ == "__main__":
    main()
