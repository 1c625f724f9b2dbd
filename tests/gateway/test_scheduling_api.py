"""The scheduler on the request path, in process over the fake backend (capacity chosen here).

What the queue decides (order, limits, timeouts, disconnects) and what a client sees
(statuses, Retry-After, the queued-time header, metrics). The real engine and Redis
are in tests/integration/test_scheduling.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.settings import Settings
from gateway.tenancy.keys import key_hash, new_key

HEAVY, LIGHT, BATCH = new_key(), new_key(), new_key()
SLOT_HOLD = 0.05  # seconds per word of the slow fake


def settings(tmp_path: Path, **scheduler: Any) -> Settings:
    def tenant(tid: str, key: str, **fields: Any) -> dict[str, Any]:
        return {"id": tid, "keys": [{"id": f"{tid}-key", "hash": key_hash(key)}], **fields}

    return Settings(
        models=[{"name": "slow", "max_n": 2}],
        auth={"database": str(tmp_path / "lockgate.db")},
        tenants=[
            tenant("heavy", HEAVY),
            tenant("light", LIGHT),
            tenant("nightly", BATCH, priority="batch"),
        ],
        scheduler=scheduler,
    )


MakeApp = Callable[..., FastAPI]


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend("slow", delay=SLOT_HOLD, capacity=1)


@pytest.fixture
async def gateway(tmp_path: Path, fake: FakeBackend) -> AsyncIterator[Callable[..., Any]]:
    """``await gateway(**scheduler_settings)`` → base URL of the app over real HTTP."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(**scheduler: Any) -> str:
        app = create_app(settings(tmp_path, **scheduler), backends={"slow": fake})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        servers.append((server, asyncio.create_task(server.serve())))
        while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
            await asyncio.sleep(0.01)
        await fake.start()
        return f"http://127.0.0.1:{port}"

    yield start
    for server, task in servers:
        server.should_exit = True
        await task


def chat(words: int, **extra: Any) -> dict[str, Any]:
    text = " ".join(f"w{i}" for i in range(words))
    return {"model": "slow", "messages": [{"role": "user", "content": text}], **extra}


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


async def metric(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def wait_queued(http: httpx.AsyncClient, depth: int) -> None:
    for _ in range(200):
        if await metric(http, "lockgate_queue_depth") == depth:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"queue depth never reached {depth}")


def start(
    http: httpx.AsyncClient, body: dict[str, Any], key: str, **headers: str
) -> asyncio.Task[httpx.Response]:
    """Send a chat in the background (it may queue)."""
    request = http.post("/v1/chat/completions", json=body, headers=auth(key, **headers))
    return asyncio.create_task(request)


def served_order(fake: FakeBackend) -> list[str]:
    """Who reached the engine, in order (the first word of each prompt names the request)."""
    return [r.messages[-1].content.split()[0] for r in fake.seen if r.messages]


def tagged(tag: str, words: int) -> dict[str, Any]:
    body = chat(words)
    body["messages"][0]["content"] = tag + " " + body["messages"][0]["content"]
    return body


async def test_a_light_tenant_is_served_before_the_heavy_tenants_queue(
    gateway: Callable[..., Any], fake: FakeBackend
) -> None:
    url = await gateway()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        running = start(http, tagged("h0", 10), HEAVY)
        await asyncio.sleep(0.1)  # h0 holds the only slot and keeps producing tokens
        heavy = []
        for i in range(1, 4):
            body = tagged(f"h{i}", 3)
            heavy.append(start(http, body, HEAVY))
            await wait_queued(http, i)
        light = await http.post("/v1/chat/completions", json=tagged("l1", 3), headers=auth(LIGHT))
        assert light.status_code == 200
        assert float(light.headers["x-lockgate-queued-ms"]) > 50
        for r in [await running, *await asyncio.gather(*heavy)]:
            assert r.status_code == 200
    assert served_order(fake) == ["h0", "l1", "h1", "h2", "h3"]


async def test_priority_class_and_the_header_that_lowers_it(
    gateway: Callable[..., Any], fake: FakeBackend
) -> None:
    url = await gateway()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        bad = await http.post(
            "/v1/chat/completions",
            json=chat(2),
            headers=auth(LIGHT, **{"x-lockgate-priority": "vip"}),
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "x-lockgate-priority"
        running = start(http, tagged("run", 6), HEAVY)
        await asyncio.sleep(0.1)
        queued = [
            # a batch tenant cannot raise itself; an interactive one may lower itself
            ("nightly", BATCH, "interactive"),
            ("lowered", LIGHT, "batch"),
            ("chat", HEAVY, None),
        ]
        tasks = []
        for depth, (tag, key, header) in enumerate(queued, start=1):
            headers = {} if header is None else {"x-lockgate-priority": header}
            tasks.append(start(http, tagged(tag, 2), key, **headers))
            await wait_queued(http, depth)
        assert all(r.status_code == 200 for r in [await running, *await asyncio.gather(*tasks)])
    assert served_order(fake)[1:] == ["chat", "nightly", "lowered"]


async def test_queue_limits_timeout_and_context_length_statuses(
    gateway: Callable[..., Any], fake: FakeBackend
) -> None:
    url = await gateway(max_queue=2, max_queue_per_tenant=1, max_wait=0.6)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        running = start(http, chat(30), HEAVY)
        await asyncio.sleep(0.1)
        # can never run: refused at once, not after queueing
        too_long = await http.post(
            "/v1/chat/completions", json=chat(3, max_tokens=5000), headers=auth(LIGHT)
        )
        assert too_long.status_code == 400
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        first = start(http, chat(2), HEAVY)
        await wait_queued(http, 1)
        mine = await http.post("/v1/chat/completions", json=chat(2), headers=auth(HEAVY))
        assert mine.status_code == 429
        assert mine.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(mine.headers["retry-after"]) >= 1
        second = start(http, chat(2), LIGHT)
        await wait_queued(http, 2)
        full = await http.post("/v1/chat/completions", json=chat(2), headers=auth(BATCH))
        assert full.status_code == 503
        assert full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        for late in await asyncio.gather(first, second):  # the slot is busy for 1.5 s
            assert late.status_code == 503
            assert late.json()["error"]["code"] == "queue_timeout"
            assert int(late.headers["retry-after"]) >= 1
        assert (await running).status_code == 200
        assert await metric(http, "lockgate_slots_used") == 0
        assert await metric(http, "lockgate_queue_depth") == 0
        text = (await http.get("/metrics")).text
        for outcome, count in [
            ("granted", 1),
            ("rejected_tenant", 1),
            ("rejected_full", 1),
            ("expired", 2),
        ]:
            assert (
                f'lockgate_queue_requests_total{{model="slow",outcome="{outcome}"}} {count}.0'
                in text
            )


async def test_a_client_leaving_the_queue_frees_its_place_at_once(
    gateway: Callable[..., Any], fake: FakeBackend
) -> None:
    url = await gateway()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        running = start(http, tagged("run", 10), HEAVY)
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=url, timeout=30) as leaver:
            gone = start(leaver, tagged("gone", 2), LIGHT)
            await wait_queued(http, 1)
            gone.cancel()  # closes the connection
            await asyncio.gather(gone, return_exceptions=True)
        await wait_queued(http, 0)  # left the queue, long before the slot frees
        assert not running.done()
        assert (await running).status_code == 200
        assert await metric(http, "lockgate_slots_used") == 0
        assert 'outcome="cancelled"} 1.0' in (await http.get("/metrics")).text
        after = await http.post(
            "/v1/chat/completions", json=tagged("after", 2), headers=auth(LIGHT)
        )
        assert after.status_code == 200
    assert "gone" not in served_order(fake)


async def test_n_choices_take_n_slots_and_streams_report_their_queue_time(
    gateway: Callable[..., Any], fake: FakeBackend
) -> None:
    fake.capacity = 2
    url = await gateway()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        one = start(http, chat(6), HEAVY)
        await asyncio.sleep(0.1)
        assert await metric(http, "lockgate_slots_used") == 1
        assert await metric(http, "lockgate_slots_capacity") == 2
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat(2, n=2, stream=True), headers=auth(LIGHT)
        ) as stream:
            assert stream.status_code == 200
            assert one.done()  # two slots: it waited for the first request to finish
            assert float(stream.headers["x-lockgate-queued-ms"]) > 100
            assert await metric(http, "lockgate_slots_used") == 2
            await stream.aread()
        assert (await one).status_code == 200
        assert await metric(http, "lockgate_slots_used") == 0


def asgi_chat(body: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], Any]]:
    """The ASGI scope and ``receive`` of a chat sent straight to the app (no server)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {LIGHT}".encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "state": {},
    }
    messages = [{"type": "http.request", "body": orjson.dumps(body), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # never: the request is fully read
        raise AssertionError

    return scope, receive


async def test_a_stream_whose_client_left_before_the_status_line_frees_its_slot(
    tmp_path: Path, fake: FakeBackend
) -> None:
    """The status line cannot be sent (the connection is gone): the body never starts,
    yet the request must end, billed and with its slot released."""
    app = create_app(settings(tmp_path), backends={"slow": fake})
    scope, receive = asgi_chat({**chat(3), "stream": True})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            raise OSError("connection reset")

    async with app.router.lifespan_context(app):
        await fake.start()
        with contextlib.suppress(Exception):
            await app(scope, receive, send)  # type: ignore[arg-type]
        served = app.state.service.registry.instances()[0]
        assert served.scheduler.load(served.pool).running == 0
        metrics = app.state.metrics.render().decode()
        assert 'lockgate_requests_total{endpoint="chat",model="slow",status="499"} 1.0' in metrics


async def test_a_request_cancelled_by_a_shutdown_frees_its_slot(
    tmp_path: Path, fake: FakeBackend
) -> None:
    """Not the client leaving: the server cancelling the request's task. It must end too."""
    app = create_app(settings(tmp_path), backends={"slow": fake})
    scope, receive = asgi_chat(chat(40))

    async def send(message: dict[str, Any]) -> None:
        pass

    async with app.router.lifespan_context(app):
        await fake.start()
        served = app.state.service.registry.instances()[0]
        task = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
        for _ in range(200):  # until it holds the slot and generates
            if served.scheduler.load(served.pool).running:
                break
            await asyncio.sleep(0.01)
        assert served.scheduler.load(served.pool).running == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert served.scheduler.load(served.pool).running == 0
        metrics = app.state.metrics.render().decode()
        assert 'lockgate_requests_total{endpoint="chat",model="slow",status="499"} 1.0' in metrics
