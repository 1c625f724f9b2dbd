"""Graceful drain: the app behind a real uvicorn (in this process), a slow fake backend.

``server.handle_exit(SIGTERM)`` is what uvicorn's signal handler calls; the signal
itself, on a real ``lockgate serve`` process with the real model, is in
tests/integration/test_drain.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.drain import Drain, DrainingServer
from gateway.settings import Settings

WORD_DELAY = 0.05


class Gateway:
    def __init__(self, server: DrainingServer, task: asyncio.Task[None], url: str) -> None:
        self.server, self.task, self.url = server, task, url

    def sigterm(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[[float], Awaitable[Gateway]]]:
    """``await start(drain_seconds)`` → the app behind uvicorn, one slot, a slow backend."""
    started: list[Gateway] = []

    async def run(seconds: float) -> Gateway:
        settings = Settings(
            models=[{"name": "slow", "max_sequences": 1}],
            auth={"database": str(tmp_path / "lockgate.db")},
            batches={"database": str(tmp_path / "b.db"), "files_dir": str(tmp_path / "files")},
        )
        fake = FakeBackend("slow", delay=WORD_DELAY, capacity=1)
        drain = Drain(seconds=seconds)
        app = create_app(settings, backends={"slow": fake}, drain=drain)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
        )  # as `lockgate serve` runs it
        server = DrainingServer(config, drain)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
            await asyncio.sleep(0.01)
        await fake.start()
        started.append(Gateway(server, task, f"http://127.0.0.1:{port}"))
        return started[-1]

    yield run
    for gateway in started:
        gateway.server.should_exit = True
        await asyncio.wait_for(gateway.task, 10)


def gauge(gateway: Gateway, name: str) -> float:
    """A series' value (summed over its labels), read from the app, not over HTTP."""
    text = gateway.server.config.app.state.metrics.render().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


async def until(check: Callable[[], bool]) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 10 s")


def requests(gateway: Gateway, status: str) -> float:
    """lockgate_requests_total of the chat door with ``status``, read from the app."""
    text = gateway.server.config.app.state.metrics.render().decode()
    prefix = f'lockgate_requests_total{{endpoint="chat",model="slow",status="{status}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


async def stream_through(gateway: Gateway, *, signals: int) -> list[str]:
    """Start a long stream, send ``signals`` SIGTERMs once it streams, return its events."""
    async with (
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=chat(400, stream=True)) as response,
    ):
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")  # streaming
        for _ in range(signals):
            gateway.sigterm()
        return [line async for line in lines if line.startswith("data: ")]


def chat(words: int, *, stream: bool = False) -> dict[str, Any]:
    text = " ".join(f"w{i}" for i in range(words))
    return {"model": "slow", "messages": [{"role": "user", "content": text}], "stream": stream}


async def test_draining_refuses_new_requests_in_each_doors_shape_and_turns_unready(
    start: Callable[[float], Awaitable[Gateway]],
) -> None:
    gateway = await start(30)  # a long drain: the one request inside holds it open
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        assert (await http.get("/health/ready")).status_code == 200
        inside = asyncio.create_task(http.post("/v1/chat/completions", json=chat(120)))
        await until(lambda: gauge(gateway, "lockgate_slots_used") == 1)  # generating
        gateway.sigterm()
        ready = await http.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        one = await http.get("/health/ready", params={"model": "slow"})
        assert one.status_code == 503 and one.json()["status"] == "draining"
        assert (await http.get("/health/live")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200

        refused = await http.post("/v1/chat/completions", json=chat(2))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "shutting_down"
        ollama = await http.post("/api/chat", json=chat(2))
        assert ollama.status_code == 503 and isinstance(ollama.json()["error"], str)
        assert (await http.get("/v1/models")).status_code == 503  # every door, not only chat
        assert not inside.done()  # all of that while the request inside still ran

        # The request that was inside is answered whole, and then the server stops.
        answered = await inside
        assert answered.status_code == 200
        assert answered.json()["choices"][0]["finish_reason"] == "stop"
    await asyncio.wait_for(gateway.task, 10)
    assert not gateway.server.drain.cut_off


async def test_a_stream_still_open_at_the_deadline_ends_with_an_error_event(
    start: Callable[[float], Awaitable[Gateway]],
) -> None:
    gateway = await start(1)
    events = await stream_through(gateway, signals=1)  # the stream ends cleanly
    assert events[-1] == "data: [DONE]" or "shutting_down" in events[-1]
    error = json.loads(next(e for e in events if "shutting_down" in e)[len("data: ") :])
    assert error["error"]["code"] == "shutting_down"
    assert len(events) < 400  # cut, not finished
    assert requests(gateway, "503") == 1
    await asyncio.wait_for(gateway.task, 5)  # and the server has stopped
    assert gateway.server.drain.cut_off


async def test_a_request_still_queued_at_the_deadline_gets_a_503(
    start: Callable[[float], Awaitable[Gateway]],
) -> None:
    gateway = await start(1)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        running = asyncio.create_task(http.post("/v1/chat/completions", json=chat(400)))
        await until(lambda: gauge(gateway, "lockgate_slots_used") == 1)
        queued = asyncio.create_task(http.post("/v1/chat/completions", json=chat(2)))
        await until(lambda: gauge(gateway, "lockgate_queue_depth") == 1)  # for the one slot
        gateway.sigterm()
        first, second = await running, await queued
    for response in (first, second):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "shutting_down"
    assert gateway.server.drain.cut_off
    # Counted as the server's 503s, not as clients that left (499).
    assert requests(gateway, "503") == 2 and requests(gateway, "499") == 0


async def test_with_nothing_inside_the_server_stops_at_once(
    start: Callable[[float], Awaitable[Gateway]],
) -> None:
    gateway = await start(30)
    gateway.sigterm()
    await asyncio.wait_for(gateway.task, 5)
    assert not gateway.server.drain.cut_off


async def test_a_second_signal_cuts_at_once(
    start: Callable[[float], Awaitable[Gateway]],
) -> None:
    gateway = await start(30)
    events = await stream_through(gateway, signals=2)  # not 30 s: now, with the error event
    assert any("shutting_down" in e for e in events)
    await asyncio.wait_for(gateway.task, 10)
    assert gateway.server.drain.cut_off
