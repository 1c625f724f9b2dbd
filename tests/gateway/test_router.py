"""The router end to end in process: several fake instances behind one public name.

The fake backend (``backend: fake`` with a ``behaviour``) stands in for the engines:
an instance that fails before its first token, one that fails mid-stream, a slow one.
Real processes (two llama-servers, two gateways on one Redis) are in
tests/integration/test_routing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import ConfigError, Settings
from gateway.tenancy.keys import key_hash, new_key

ADMIN = "admin-" + "r" * 40


def fake(id: str, behaviour: str = "echo", **kw: Any) -> dict[str, Any]:
    return {"name": "chat", "backend": "fake", "id": id, "behaviour": behaviour, **kw}


@contextlib.asynccontextmanager
async def client_for(
    tmp_path: Path, models: list[dict[str, Any]], **extra: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        models=models,
        auth={"database": str(tmp_path / "db"), "admin_key": ADMIN},
        tenants=[
            {"id": "t", "keys": [{"id": "k", "hash": KEY_HASH}]},
            {"id": "stay", "spillover": False, "keys": [{"id": "k2", "hash": STAY_HASH}]},
        ],
        **extra,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            for _ in range(200):
                if (await c.get("/health/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            yield c


KEY, STAY = new_key(), new_key()
KEY_HASH, STAY_HASH = key_hash(KEY), key_hash(STAY)
AUTH = {"Authorization": f"Bearer {KEY}"}


def chat(text: str = "one two three", **extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": text}], **extra}


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
async def failover(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    models = [fake("broken", "fail_before_first"), fake("good")]
    async with client_for(tmp_path, models, routing={"affinity": "none"}) as c:
        yield c


async def test_a_failure_before_the_first_token_is_served_by_another_instance(
    failover: httpx.AsyncClient,
) -> None:
    served: Counter[str] = Counter()
    for i in range(30):
        r = await failover.post("/v1/chat/completions", json=chat(f"q {i}"), headers=AUTH)
        assert r.status_code == 200, r.text
        served[r.headers["x-lockgate-backend"]] += 1
    assert served == {"good": 30}
    text = (await failover.get("/metrics")).text
    retried = metric(text, "lockgate_retries_total", backend_id="broken")
    # Five failures in a row eject it; after that nothing is placed there at all.
    assert retried == 5
    assert metric(text, "lockgate_ejections_total", backend_id="broken") == 1
    assert metric(text, "lockgate_backend_ejected", backend_id="broken") == 1
    assert (
        'lockgate_backend_outcomes_total{backend_id="good",model="chat",outcome="ok"} 30.0' in text
    )


async def test_a_failure_after_the_first_token_is_never_retried(tmp_path: Path) -> None:
    models = [fake("midway", "fail_mid_stream"), fake("good")]
    async with client_for(tmp_path, models, routing={"affinity": "none"}) as c:
        outcomes: Counter[str] = Counter()
        for _ in range(20):
            body = chat("a b c d e f", stream=True)
            async with c.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            who = r.headers["x-lockgate-backend"]
            contents = "".join(re.findall(r'"content":"([^"]*)"', "\n".join(lines)))
            if who == "midway":
                assert any('"error"' in line for line in lines)  # in-band, then the end
                assert contents == "a b"  # what it produced, once: no replay on "good"
            else:
                assert contents == "a b c d e f"
            outcomes[who] += 1
        text = (await c.get("/metrics")).text
        assert metric(text, "lockgate_retries_total") == 0
        assert outcomes["midway"] >= 1


async def test_spillover_to_a_higher_tier_unless_the_tenant_forbids_it(tmp_path: Path) -> None:
    models = [
        fake("gpu", "slow", delay=0.05, capacity=1, tier=0),
        fake("cpu-twin", tier=1, capacity=8),
    ]
    routing = {"affinity": "none", "spill_after": 0.1}
    async with client_for(tmp_path, models, routing=routing) as c:

        async def one(headers: dict[str, str], c: httpx.AsyncClient = c) -> str:
            r = await c.post("/v1/chat/completions", json=chat("w " * 10), headers=headers)
            assert r.status_code == 200, r.text
            return r.headers["x-lockgate-backend"]

        served = Counter(await asyncio.gather(*(one(AUTH) for _ in range(8))))
        assert served["gpu"] >= 1 and served["cpu-twin"] >= 4, served
        stay = {"Authorization": f"Bearer {STAY}"}
        assert set(await asyncio.gather(*(one(stay) for _ in range(4)))) == {"gpu"}
        text = (await c.get("/metrics")).text
        assert (
            metric(text, "lockgate_spillovers_total", backend_id="cpu-twin") == served["cpu-twin"]
        )


async def test_a_worse_canary_is_rolled_back_and_a_weight_can_be_set_again(
    tmp_path: Path,
) -> None:
    models = [fake("stable"), fake("canary", "fail_before_first", canary=True, weight=50)]
    routing = {"affinity": "none", "canary_min_requests": 10, "eject_after": 1000}
    async with client_for(tmp_path, models, routing=routing) as c:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        # The canary is drawn with p = 1/3 and needs 10 outcomes: 60 requests fell short about
        # once in 850 runs, so send until it is rolled back (200 fall short with ~1e-23).
        for i in range(200):
            r = await c.post("/v1/chat/completions", json=chat(f"q {i}"), headers=AUTH)
            assert r.status_code == 200  # the failed tries went to "stable"
            (model,) = (await c.get("/admin/models", headers=admin)).json()["data"]
            canary = next(x for x in model["instances"] if x["id"] == "canary")
            if canary["weight"] == 0:
                break
        assert canary["weight"] == 0
        assert canary["rolled_back"].startswith("error rate 100% against 0%")
        text = (await c.get("/metrics")).text
        assert metric(text, "lockgate_canary_rollbacks_total", backend_id="canary") == 1
        assert metric(text, "lockgate_backend_weight", backend_id="canary") == 0
        tried = metric(text, "lockgate_retries_total", backend_id="canary")
        assert 10 <= tried <= 20  # rolled back soon after its tenth request
        r = await c.put(
            "/admin/models/chat/instances/canary/weight", json={"weight": 25}, headers=admin
        )
        assert r.status_code == 200, r.text
        canary = next(i for i in r.json()["instances"] if i["id"] == "canary")
        assert (canary["weight"], canary["rolled_back"]) == (25, None)
        r = await c.put(
            "/admin/models/chat/instances/nope/weight", json={"weight": 1}, headers=admin
        )
        assert r.status_code == 404


async def test_prefix_affinity_keeps_a_conversation_on_one_instance(tmp_path: Path) -> None:
    models = [fake("a"), fake("b"), fake("c")]
    async with client_for(tmp_path, models) as c:
        homes = {}
        for system in ("You are a pirate.", "You are a lawyer.", "You are a poet.", "Be brief."):
            seen = set()
            for turn in range(6):
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"turn {turn}"},
                ]
                r = await c.post(
                    "/v1/chat/completions",
                    json={"model": "chat", "messages": messages},
                    headers=AUTH,
                )
                seen.add(r.headers["x-lockgate-backend"])
            assert len(seen) == 1, (system, seen)
            homes[system] = seen.pop()
        assert len(set(homes.values())) >= 2  # different prefixes spread


async def test_session_affinity_follows_the_header(tmp_path: Path) -> None:
    models = [fake("a"), fake("b"), fake("c")]
    async with client_for(tmp_path, models, routing={"affinity": "session"}) as c:
        for session in ("s-1", "s-2", "s-3"):
            seen = {
                (
                    await c.post(
                        "/v1/chat/completions",
                        json=chat(f"q {i}"),
                        headers={**AUTH, "x-session-id": session},
                    )
                ).headers["x-lockgate-backend"]
                for i in range(5)
            }
            assert len(seen) == 1


async def test_a_retry_never_goes_back_to_the_instance_that_failed(tmp_path: Path) -> None:
    models = [fake("broken", "fail_before_first"), fake("twin", tier=1)]
    async with client_for(tmp_path, models, routing={"affinity": "none"}) as c:
        stay = {"Authorization": f"Bearer {STAY}"}  # may not spill to the twin
        r = await c.post("/v1/chat/completions", json=chat(), headers=stay)
        assert r.status_code == 503
        text = (await c.get("/metrics")).text
        tries = metric(text, "lockgate_backend_outcomes_total", backend_id="broken")
        assert tries == 1  # one try, not two on the same instance
        r = await c.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert (r.status_code, r.headers["x-lockgate-backend"]) == (200, "twin")


def test_a_configured_id_equal_to_a_generated_one_is_refused() -> None:
    settings = Settings(models=[fake("fake"), {"name": "chat", "backend": "fake"}])
    with pytest.raises(ConfigError, match="two instances would both be 'fake'"):
        create_app(settings)
