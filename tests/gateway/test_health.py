"""Readiness means the gateway, not every upstream: in process, with real sockets for the
upstream that is down (a closed port) and for Redis (a real redis-server, then stopped)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import Settings
from tests.redis_server import RedisServer


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def started(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            for _ in range(500):  # the backends start in the background
                body = (await c.get("/health/ready")).json()
                states = [s for m in body["models"].values() for s in m["backends"].values()]
                if "loading" not in states:
                    break
                await asyncio.sleep(0.01)
            yield c


def models(upstream: int) -> list[dict[str, Any]]:
    return [
        {"name": "echo", "backend": "fake"},
        {"name": "far", "backend": "llamacpp", "base_url": f"http://127.0.0.1:{upstream}"},
    ]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(models=models(closed_port()), auth={"database": str(tmp_path / "db")})
    async for c in started(create_app(settings)):
        yield c


async def test_a_remote_upstream_down_leaves_the_gateway_ready(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/health/ready")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "ready",
        "redis": "off",
        "models": {
            "echo": {"ready": True, "backends": {"fake": "ready"}},
            "far": {"ready": False, "backends": {"llamacpp-0": "unreachable"}},
        },
    }
    one = await client.get("/health/ready", params={"model": "far"})
    assert one.status_code == 503
    assert one.json() == {
        "status": "not_ready", "model": "far", "backends": {"llamacpp-0": "unreachable"},
    }  # fmt: skip
    assert (await client.get("/health/ready", params={"model": "echo"})).status_code == 200
    assert (await client.get("/health/ready", params={"model": "nope"})).status_code == 404
    served = await client.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "a"}]},
    )
    assert served.status_code == 200


async def test_an_unreachable_upstream_is_logged_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    settings = Settings(models=models(port), auth={"database": str(tmp_path / "db")})
    with caplog.at_level(logging.INFO):
        async for _ in started(create_app(settings)):
            pass
    text = caplog.text
    assert f"upstream http://127.0.0.1:{port} is not reachable at start-up" in text
    assert "model far (llamacpp-0) started, not ready yet" in text
    assert "model far (llamacpp-0) ready" not in text


@pytest.mark.parametrize(("policy", "status"), [("fail_closed", 503), ("fail_open", 200)])
async def test_redis_down_makes_the_gateway_unready_when_limits_need_it(
    own_redis: RedisServer, policy: str, status: int
) -> None:
    settings = Settings(
        models=[{"name": "echo", "backend": "fake"}],
        redis_url=own_redis.url,
        auth={"limits_on_redis_outage": policy},
    )
    async for client in started(create_app(settings)):
        r = await client.get("/health/ready")
        assert (r.status_code, r.json()["redis"]) == (200, "up")
        own_redis.stop()
        r = await client.get("/health/ready")
        assert (r.status_code, r.json()["redis"]) == (status, "down")
