"""Two real gateway processes sharing one queue through one real Redis.

The backend is ``loadtests/mock_upstream.py`` run as a real HTTP server: unlike
llama-server, which queues anything beyond its own slots, it accepts every request
and counts how many it holds at once, so oversubscription would be visible from the
backend side. The model is configured with ``concurrency: K``; both replicas' slots
for it live in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.tenancy.keys import key_hash, new_key
from tests.integration.conftest import (
    REPO,
    Server,
    eventually,
    free_port,
    lockgate,
    spawn,
    stop,
)
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

K = 3
LEASE = 2.0
HEAVY, LIGHT = new_key(), new_key()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    cmd = [
        sys.executable,
        str(REPO / "loadtests" / "mock_upstream.py"),
        "--port",
        str(port),
        "--gap-ms",
        "20",
        "--hold-ms",
        "15",
    ]
    server = spawn(cmd, f"http://127.0.0.1:{port}", "/health", tmp_path / "upstream.log")
    yield server
    stop(server)


def config(redis_url: str, upstream: str, root: Path, *, max_wait: float = 60) -> str:
    return f"""
server:
  host: 127.0.0.1
  port: {{port}}
  log_level: warning
redis_url: {redis_url}
auth:
  database: {root / "unused.db"}
models:
  - name: mock
    backend: openai
    base_url: "{upstream}"
    concurrency: {K}
scheduler:
  max_queue: 5000
  max_queue_per_tenant: 5000
  max_wait: {max_wait}
  lease_ttl: {LEASE}
tenants:
  - id: heavy
    keys:
      - id: heavy-key
        hash: "{key_hash(HEAVY)}"
  - id: light
    keys:
      - id: light-key
        hash: "{key_hash(LIGHT)}"
"""


@pytest.fixture
def pair(redis_url: str, upstream: Server, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    servers = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            text = config(redis_url, upstream.base_url, tmp_path)
            servers.append(lockgate(text, tmp_path / name))
        yield servers[0], servers[1]
    finally:
        for s in servers:
            stop(s)


def body(tag: str, *, tokens: int = 1, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "mock",
        "messages": [{"role": "user", "content": f"{tag} hello"}],
        "max_tokens": tokens,
        "stream": stream,
    }


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def stats(upstream: Server, *, reset: bool = False) -> dict[str, Any]:
    method = "POST" if reset else "GET"
    result: dict[str, Any] = httpx.request(method, f"{upstream.base_url}/stats").json()
    return result


def send(
    http: httpx.AsyncClient, key: str, tags: list[str], **shape: Any
) -> list[asyncio.Task[httpx.Response]]:
    """One request per tag, all at once; ``shape`` is passed to :func:`body`."""
    return [
        asyncio.create_task(
            http.post("/v1/chat/completions", json=body(tag, **shape), headers=auth(key))
        )
        for tag in tags
    ]


@contextlib.asynccontextmanager
async def clients(
    pair: tuple[Server, Server], **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """One HTTP client per replica."""
    async with (
        httpx.AsyncClient(base_url=pair[0].base_url, timeout=120, **options) as a,
        httpx.AsyncClient(base_url=pair[1].base_url, timeout=120, **options) as b,
    ):
        yield a, b


def queue_depth(server: Server) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lockgate_queue_depth{")
    )


async def test_a_thousand_requests_over_two_replicas_never_exceed_capacity(
    pair: tuple[Server, Server], upstream: Server
) -> None:
    stats(upstream, reset=True)
    rng = random.Random(5)
    tags = [f"r{i:04d}" for i in range(1000)]
    limits = httpx.Limits(max_connections=40)
    async with clients(pair, limits=limits) as (a, b):
        gate = asyncio.Semaphore(60)  # 60 clients: ~57 of them queued at any time

        async def one(tag: str) -> httpx.Response:
            async with gate:
                http = a if rng.random() < 0.5 else b
                key = HEAVY if tag[-1] in "02468" else LIGHT
                return await http.post("/v1/chat/completions", json=body(tag), headers=auth(key))

        responses = await asyncio.gather(*(one(t) for t in tags))
    assert [r.status_code for r in responses] == [200] * 1000
    seen = stats(upstream)
    assert seen["peak"] <= K, f"the backend held {seen['peak']} requests at once"
    assert seen["peak"] == K  # and the capacity was used
    assert sorted(seen["order"]) == tags  # each reached the backend exactly once
    queued = [float(r.headers["x-lockgate-queued-ms"]) for r in responses]
    assert max(queued) > 50  # they did wait in the shared queue
    # /metrics shows the shared queue as of each replica's last heartbeat (lease_ttl / 4)
    await eventually(lambda: queue_depth(pair[0]) == queue_depth(pair[1]) == 0, within=LEASE)


async def test_fairness_holds_across_replicas(
    pair: tuple[Server, Server], upstream: Server
) -> None:
    stats(upstream, reset=True)
    async with clients(pair) as (on_a, on_b):
        # heavy floods replica A with long streams (2 s, so light arrives while they run even
        # on a stalled machine): K run, the rest queue
        flood = send(on_a, HEAVY, [f"h{i:02d}" for i in range(3 * K)], tokens=100, stream=True)
        await eventually(lambda: stats(upstream)["in_flight"] == K)
        await asyncio.sleep(0.2)  # the running ones are producing (and charging) tokens
        light = send(on_b, LIGHT, ["l0", "l1"])
        done = await asyncio.gather(*flood, *light)
    assert all(r.status_code == 200 for r in done)
    order = stats(upstream)["order"]
    # the K running streams end together; light's two requests got two of the K slots
    # they freed, ahead of the heavy requests queued earlier on the other replica (FCFS
    # would have given all K to h03..h05). Replicas forward their grants independently,
    # so arrival order within the K may differ from grant order by a few milliseconds.
    assert {"l0", "l1"} <= set(order[K : 2 * K]), order


async def test_a_killed_replica_gives_back_its_slots_within_the_lease(
    pair: tuple[Server, Server], upstream: Server
) -> None:
    a = pair[0]
    stats(upstream, reset=True)
    async with clients(pair) as (on_a, on_b):
        # K hold every slot for ~10 s each, 2 wait in the shared queue
        doomed = send(on_a, HEAVY, [f"a{i}" for i in range(K + 2)], tokens=500, stream=True)
        await eventually(lambda: stats(upstream)["in_flight"] == K)
        survivors = send(on_b, LIGHT, [f"b{i}" for i in range(2 * K)])
        await asyncio.sleep(0.3)
        assert not any(t.done() for t in survivors)  # every slot is A's
        os.killpg(os.getpgid(a.process.pid), signal.SIGKILL)
        killed = time.monotonic()
        results = await asyncio.gather(*survivors)
        elapsed = time.monotonic() - killed
        await asyncio.gather(*doomed, return_exceptions=True)
    assert [r.status_code for r in results] == [200] * (2 * K)
    assert elapsed < LEASE + 2, f"B waited {elapsed:.1f}s for A's slots"
    order = stats(upstream)["order"]
    # A's two queued requests died with it: only the K it was running reached the backend
    assert len([o for o in order if o.startswith("a")]) == K, order
    assert sorted(o for o in order if o.startswith("b")) == [f"b{i}" for i in range(2 * K)]


async def test_with_redis_down_a_shared_queue_answers_503_and_recovers(
    own_redis: RedisServer, upstream: Server, tmp_path: Path
) -> None:
    gateway = lockgate(config(own_redis.url, upstream.base_url, tmp_path), tmp_path)
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:

            async def chat() -> httpx.Response:
                return await http.post("/v1/chat/completions", json=body("x"), headers=auth(LIGHT))

            assert (await chat()).status_code == 200  # the key is now cached (outage grace)
            own_redis.stop()
            down = await chat()
            assert down.status_code == 503, down.text
            assert down.headers["retry-after"] == "1"
            text = (await http.get("/metrics")).text
            assert 'lockgate_queue_requests_total{model="mock",outcome="unavailable"} 1.0' in text
            own_redis.start()  # same port; the link's probe notices within a second
            await eventually(lambda: _ok(chat), within=10)
    finally:
        stop(gateway)


async def _ok(send: Callable[[], Awaitable[httpx.Response]]) -> bool:
    return (await send()).status_code == 200


async def test_a_redis_restart_under_load_hangs_no_request_past_its_timeout(
    own_redis: RedisServer, upstream: Server, tmp_path: Path
) -> None:
    """8 clients in closed loops on 3 shared slots (so 5 queued at any time) while Redis
    stops for 1.5 s and comes back empty (no persistence): each request ends within its
    queue timeout, and once Redis is back the configured keys are written again and every
    request is served."""
    max_wait = 4.0
    gateway = lockgate(
        config(own_redis.url, upstream.base_url, tmp_path, max_wait=max_wait), tmp_path
    )
    outcomes: list[tuple[float, float, int]] = []  # (start, seconds, status)
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http:
            started = time.monotonic()

            async def client(i: int) -> None:
                while time.monotonic() - started < 10:
                    t0 = time.monotonic()
                    r = await http.post(
                        "/v1/chat/completions", json=body(f"c{i}"), headers=auth(LIGHT)
                    )
                    outcomes.append((t0 - started, time.monotonic() - t0, r.status_code))

            async def outage() -> None:
                await asyncio.sleep(2)
                own_redis.stop()
                await asyncio.sleep(1.5)
                own_redis.start()

            await asyncio.gather(outage(), *(client(i) for i in range(8)))
            text = (await http.get("/metrics")).text
    finally:
        stop(gateway)
    # 401 only while Redis is empty again and the configured keys are being written back.
    assert {status for _, _, status in outcomes} <= {200, 401, 503}
    assert max(seconds for _, seconds, _ in outcomes) < max_wait + 3
    assert any(status == 503 for _, _, status in outcomes)  # the outage was seen
    late = [status for start, _, status in outcomes if start > 8]
    assert late and set(late) == {200}  # and it recovered
    assert 'lockgate_slots_used{backend_id="' in text
