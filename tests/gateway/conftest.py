from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.settings import ModelSettings, Settings


@pytest.fixture
def fakes() -> dict[str, FakeBackend]:
    return {
        "echo": FakeBackend("echo", context_length=32),
        "echo-n": FakeBackend("echo", context_length=32),
        "overloaded": FakeBackend("overloaded"),
        "fail_before_first": FakeBackend("fail_before_first"),
        "fail_mid_stream": FakeBackend("fail_mid_stream"),
    }


@pytest.fixture
async def client(fakes: dict[str, FakeBackend]) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(models=[ModelSettings(name="echo-n", max_n=3)])
    app = create_app(settings, backends=fakes)
    async with app.router.lifespan_context(app):
        for backend in fakes.values():  # the lifespan loads in the background
            await backend.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c
