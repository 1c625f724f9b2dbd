"""Clients that hang up at random points leak nothing, on every kind of backend.

One ``lockgate serve`` in front of the embedded engine, a real llama-server and the fake
backend, each with few slots so that requests also queue. 16 clients run 1,000 requests
between them (about 60 on each real engine, short ones: they share 2 cores), each leaving
at a random point: while queued, before the first token, after some streamed chunks, or
not at all. Afterwards every slot is free, every queue is empty, the engines run nothing,
and what was billed covers what the clients received.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import NO_EOG, Server, lockgate, stop

pytestmark = pytest.mark.integration

REQUESTS = 1000
CLIENTS = 16
# Most of the volume on the fake backend: the two real engines share the machine's 2 cores
# with the gateway and these clients, and get about 60 requests each.
MODELS = ("gemma", "remote", *["slow"] * 14)
CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  log_level: warning
models:
  - name: gemma
    n_ctx: 512
    max_sequences: 4
  - name: slow
    backend: fake
    delay: 0.002
    capacity: 4
  - name: remote
    backend: llamacpp
    base_url: UPSTREAM
    upstream_model: gemma
    concurrency: 4
scheduler:
  max_wait: 60
auth:
  database: DATABASE
"""


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, llama_server: Server) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("faults")
    config = CONFIG.replace("UPSTREAM", llama_server.base_url)
    server = lockgate(config.replace("DATABASE", str(root / "faults.db")), root)
    yield server
    stop(server)


def metrics(server: Server) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def one(http: httpx.AsyncClient, rng: random.Random) -> int:
    """One request that leaves at a random point; the content chunks it received."""
    model = rng.choice(MODELS)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story " * rng.randint(1, 4)}],
        "max_tokens": rng.randint(2, 12) if model != "slow" else rng.randint(4, 24),
        "stream": True,
        "logit_bias": NO_EOG if model != "slow" else None,
    }
    leave = rng.choice(("queued", "before_first", "mid_stream", "mid_stream", "never"))
    received = 0
    try:
        async with asyncio.timeout(rng.uniform(0.001, 0.03) if leave == "queued" else 120):
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if leave == "before_first":
                    return 0  # the status line came: leave before reading any chunk
                keep = rng.randint(1, 12) if leave == "mid_stream" else 10**9
                async for line in response.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        received += 1
                        if received >= keep:
                            break
    except TimeoutError:
        pass  # left while queued (or while waiting for the status line)
    return received


def test_random_hangups_leak_no_slot_and_bill_what_was_received(faulty: Server) -> None:
    async def run() -> int:
        rng = random.Random(1234)  # the same schedule of hang-ups every run
        per_client = [REQUESTS // CLIENTS + (i < REQUESTS % CLIENTS) for i in range(CLIENTS)]
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=faulty.base_url, limits=limits, timeout=120) as http:

            async def client(n: int, seed: int) -> int:
                mine = random.Random(seed)
                return sum([await one(http, mine) for _ in range(n)])

            totals = await asyncio.gather(*(client(n, rng.randrange(1 << 30)) for n in per_client))
        return sum(totals)

    received = asyncio.run(run())
    deadline = time.monotonic() + 30
    while True:  # the last hang-ups are noticed within one decode step or probe
        m = metrics(faulty)
        busy = {
            k: v
            for k, v in m.items()
            if re.match(r"lockgate_(slots_used|queue_depth|engine_running_sequences)\{", k) and v
        }
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert busy == {}, busy
    # Every request the gateway saw finished once; some left before their body was sent.
    finished = sum(v for k, v in m.items() if k.startswith("lockgate_requests_total{"))
    assert REQUESTS * 0.8 < finished <= REQUESTS
    billed = sum(v for k, v in m.items() if k.startswith("lockgate_completion_tokens_total{"))
    assert billed >= received  # what reached a client was billed; so were tokens in flight
    client_gone = sum(
        v for k, v in m.items() if k.startswith("lockgate_requests_total{") and 'status="499"' in k
    )
    assert client_gone > REQUESTS // 4  # most of the schedule really did hang up
