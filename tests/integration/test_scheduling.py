"""The scheduler in front of the real embedded engine (Gemma 3 270M), over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.tenancy.keys import key_hash, new_key
from tests.integration.conftest import NO_EOG, Server, eventually, lockgate, stop

pytestmark = pytest.mark.integration

HEAVY, LIGHT = new_key(), new_key()


def config(root: Path) -> str:
    # A database of its own: tenants written to the session's shared one would turn auth
    # on for every other test server.
    return f"""
server:
  host: 127.0.0.1
  port: {{port}}
  log_level: warning
auth:
  database: {root / "lockgate.db"}
models:
  - name: gemma
    n_ctx: 512
    max_sequences: 1
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


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("scheduling")
    server = lockgate(config(root), root)
    yield server
    stop(server)


def chat(text: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "gemma",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "logit_bias": NO_EOG,
    }


async def depth(http: httpx.AsyncClient, expected: int) -> bool:
    text = (await http.get("/metrics")).text
    waiting = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lockgate_queue_depth{")
    )
    return waiting == expected


async def slots_used(http: httpx.AsyncClient) -> bool:
    text = (await http.get("/metrics")).text
    return 'lockgate_slots_used{backend_id="embedded",model="gemma"} 1.0' in text


async def test_a_light_tenant_overtakes_the_heavy_tenants_queue(gateway: Server) -> None:
    finished: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=120) as http:

        async def send(tag: str, key: str, tokens: int) -> httpx.Response:
            r = await http.post(
                "/v1/chat/completions",
                json=chat(f"Tell me a story about {tag}.", tokens),
                headers={"Authorization": f"Bearer {key}"},
            )
            finished[tag] = time.monotonic()
            return r

        # heavy holds the only sequence with a long generation, and queues three more
        running = asyncio.create_task(send("running", HEAVY, 120))
        await eventually(lambda: slots_used(http))
        queued = []
        for i in range(3):
            queued.append(asyncio.create_task(send(f"heavy{i}", HEAVY, 8)))
            await eventually(lambda i=i: depth(http, i + 1))  # type: ignore[misc]
        light = await send("light", LIGHT, 8)
        rest = await asyncio.gather(running, *queued)
    assert all(r.status_code == 200 for r in [light, *rest])
    assert float(light.headers["x-lockgate-queued-ms"]) > 0
    # the light request got the sequence as soon as it freed, ahead of all three
    assert finished["light"] < min(finished[f"heavy{i}"] for i in range(3)), finished
    assert finished["running"] < finished["light"]
