"""Every request is counted in ``lockgate_requests_total`` and gets one access-log line.

In process over the fake backend, with keys on (a real SQLite store).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.settings import Settings
from tests.gateway.test_tenancy_api import ADMIN, Keys, auth, chat, tenants


def _app_settings(tmp_path: Path, access_log: str = "text") -> Settings:
    return Settings(
        server={"access_log": access_log, "max_body_bytes": 4096},
        auth={"admin_key": ADMIN, "database": str(tmp_path / "lockgate.db")},
        tenants=tenants(),
    )


async def _client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    fakes = {"echo": FakeBackend("echo"), "slow": FakeBackend("slow", delay=0.01)}
    app = create_app(settings, backends=fakes)
    async with app.router.lifespan_context(app):
        for backend in fakes.values():
            await backend.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(_app_settings(tmp_path)):
        yield c


@pytest.fixture
async def json_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(_app_settings(tmp_path, "json")):
        yield c


def requests_total(text: str) -> dict[tuple[str, str, str], float]:
    found = {}
    for m in re.finditer(
        r'^lockgate_requests_total\{endpoint="([^"]*)",model="([^"]*)",status="(\d+)"\} (\S+)$',
        text,
        re.M,
    ):
        found[(m.group(2), m.group(1), m.group(3))] = float(m.group(4))
    return found


async def test_refusals_before_a_model_is_resolved_are_counted(
    client: httpx.AsyncClient,
) -> None:
    ok = auth(Keys.team_a)
    sent = [
        ("/v1/chat/completions", b"{not json", ok, 400),
        ("/v1/chat/completions", json.dumps({"model": "echo"}).encode(), ok, 400),
        ("/v1/chat/completions", json.dumps(chat(model="no-such")).encode(), ok, 404),
        ("/v1/chat/completions", json.dumps(chat()).encode(), {}, 401),
        ("/v1/chat/completions", json.dumps(chat(model="slow")).encode(), auth(Keys.limited), 403),
        ("/v1/chat/completions", b"x" * 5000, ok, 413),
        ("/api/chat", json.dumps({**chat(model="nope"), "stream": False}).encode(), ok, 404),
        ("/v1/nowhere", b"{}", ok, 404),
    ]
    for path, body, headers, status in sent:
        r = await client.post(path, content=body, headers=headers)
        assert r.status_code == status, (path, r.text)
    for _ in range(4):  # "limited" may send 3 a minute: the 4th is a 429
        r = await client.post("/v1/chat/completions", json=chat(), headers=auth(Keys.limited))
    assert r.status_code == 429
    counted = requests_total((await client.get("/metrics")).text)
    assert counted[("-", "chat", "400")] == 2
    assert counted[("-", "chat", "404")] == 1
    assert counted[("-", "chat", "401")] == 1
    assert counted[("-", "chat", "403")] == 1
    assert counted[("-", "chat", "413")] == 1  # the size guard answered: no endpoint ran
    assert counted[("-", "ollama_chat", "404")] == 1
    assert counted[("-", "other", "404")] == 1
    assert counted[("echo", "chat", "200")] == 3
    assert counted[("echo", "chat", "429")] == 1  # the model was known: it keeps its label
    assert not any(model in ("no-such", "nope") for model, _, _ in counted)
    # Each request once: the service's and the access layer's counts do not overlap.
    assert sum(v for (_, e, _), v in counted.items() if e in ("chat", "ollama_chat")) == 11


async def test_one_access_line_per_request_without_the_key(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lockgate.access"):
        r = await client.post("/v1/chat/completions", json=chat(), headers=auth(Keys.team_a))
        assert r.status_code == 200
        await client.post("/v1/chat/completions", json=chat(), headers=auth(Keys.team_a + "x"))
        await client.get("/health/live")  # at debug: probes do not fill the log
    lines = [r.getMessage() for r in caplog.records if r.name == "lockgate.access"]
    assert len(lines) == 2
    ok, refused = lines
    rid = r.json()["id"]
    assert ok.startswith("POST /v1/chat/completions 200 outcome=200 ")
    for part in ("tenant=team-a", "model=echo", "endpoint=chat", f"request_id={rid}", "bytes="):
        assert part in ok
    assert re.search(r" \d+\.\dms ", ok)
    assert refused.startswith("POST /v1/chat/completions 401 ") and "tenant=-" in refused
    assert all(Keys.team_a not in line for line in lines)


async def test_a_stream_the_client_left_is_logged_with_its_outcome(tmp_path: Path) -> None:
    """Over real HTTP, so that the hang-up is real."""
    fakes = {"slow": FakeBackend("slow", delay=0.02)}
    app = create_app(_app_settings(tmp_path), backends=fakes)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
        await asyncio.sleep(0.01)
    await fakes["slow"].start()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    access = logging.getLogger("lockgate.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        body = chat(" ".join(["word"] * 50), model="slow", stream=True)
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
            http.stream("POST", "/v1/chat/completions", json=body, headers=auth(Keys.team_a)) as r,
        ):
            async for _ in r.aiter_lines():
                break
        for _ in range(200):
            if records:
                break
            await asyncio.sleep(0.01)
    finally:
        access.removeHandler(handler)
        access.setLevel(logging.NOTSET)
        server.should_exit = True
        await task
    (line,) = [r.getMessage() for r in records]
    assert line.startswith("POST /v1/chat/completions 200 outcome=499 ")


async def test_json_lines_and_escaped_client_strings(
    json_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lockgate.access"):
        await json_client.post(
            "/v1/chat/completions", json=chat(model="x\ny"), headers=auth(Keys.team_a)
        )
    (record,) = [r for r in caplog.records if r.name == "lockgate.access"]
    line: dict[str, Any] = json.loads(record.getMessage())
    assert "\n" not in record.getMessage()
    assert line["status"] == 404 and line["model"] == "x\ny" and line["tenant"] == "team-a"
    assert set(line) == {
        "method", "path", "status", "outcome", "ms", "tenant", "model", "endpoint",
        "request_id", "bytes",
    }  # fmt: skip
