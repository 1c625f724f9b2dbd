"""Auth, limits, budgets, the admin API and the ledger, in process over the fake backend.

The store is a real SQLite file; Redis-backed behaviour (several replicas, outages)
is in tests/integration/test_tenancy_redis.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute, Route

from backends.fake import FakeBackend
from gateway.api import openai
from gateway.api.endpoint import Endpoint
from gateway.app import create_app, require_guards
from gateway.settings import ConfigError, ServerSettings, Settings
from gateway.tenancy.admission import human_duration
from gateway.tenancy.keys import key_hash, new_key

ADMIN = "admin-" + "x" * 40


class Keys:
    team_a = new_key()  # every model, generous limits
    limited = new_key()  # only "echo", 3 requests a minute
    conc = new_key()  # one request at a time
    budget = new_key()  # 60 tokens a day
    tokens = new_key()  # 1000 tokens a minute
    logged = new_key()  # request bodies may be logged


def tenants() -> list[dict[str, Any]]:
    def one(tid: str, key: str, **fields: Any) -> dict[str, Any]:
        return {"id": tid, "keys": [{"id": f"{tid}-key", "hash": key_hash(key)}], **fields}

    return [
        one("team-a", Keys.team_a, limits={"requests_per_minute": 1000}),
        one("limited", Keys.limited, models=["echo"], limits={"requests_per_minute": 3}),
        one("conc", Keys.conc, limits={"max_concurrent": 1}),
        one("budget", Keys.budget, limits={"tokens_per_day": 60}),
        one("tokens", Keys.tokens, limits={"tokens_per_minute": 1000}),
        one("logged", Keys.logged, log_requests=True),
    ]


@pytest.fixture
def fakes() -> dict[str, FakeBackend]:
    return {
        "echo": FakeBackend("echo"),
        "slow": FakeBackend("slow", delay=0.05),
        "other": FakeBackend("echo"),
    }


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "auth": {"admin_key": ADMIN, "database": str(tmp_path / "lockgate.db")},
        "tenants": tenants(),
    }
    data.update(overrides)
    return Settings(**data)


@pytest.fixture
async def client(tmp_path: Path, fakes: dict[str, FakeBackend]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings(tmp_path), backends=fakes)
    async with app.router.lifespan_context(app):
        for backend in fakes.values():
            await backend.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


@pytest.fixture
async def served(tmp_path: Path, fakes: dict[str, FakeBackend]) -> AsyncIterator[str]:
    """The app behind real HTTP (uvicorn in this process): streams and disconnects are real."""
    app = create_app(settings(tmp_path), backends=fakes)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
        await asyncio.sleep(0.01)
    for backend in fakes.values():
        await backend.start()
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(text: str = "one two three", model: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def error(response: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert body["code"] == code
    assert set(body) == {"message", "type", "param", "code"}
    return body


ENDPOINTS = [
    ("POST", "/v1/chat/completions", chat()),
    ("POST", "/v1/completions", {"model": "echo", "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": "echo", "input": "hi"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/echo", None),
    ("POST", "/v1/responses", {"model": "echo", "input": "hi"}),
    ("POST", "/api/chat", {**chat(), "stream": False}),
    ("POST", "/api/generate", {"model": "echo", "prompt": "hi", "stream": False}),
    ("POST", "/api/embed", {"model": "echo", "input": "hi"}),
    ("POST", "/api/embeddings", {"model": "echo", "prompt": "hi"}),
    ("GET", "/api/tags", None),
    ("POST", "/api/show", {"model": "echo"}),
    ("GET", "/api/ps", None),
    ("GET", "/api/version", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
@pytest.mark.parametrize(
    "header",
    [
        None,
        "Basic dXNlcjpwYXNz",
        "Bearer ",
        f"Bearer {new_key()}",  # well formed, unknown
        "Bearer lg-' OR '1'='1' --",
        'Bearer lg-" OR 1=1; DROP TABLE keys; --',
        "Bearer lg-*1\r\n$8\r\nFLUSHALL",
        "Bearer lg-" + "A" * 65536,
        "Bearer " + "lg-" + "a" * 42 + "\x00",
    ],
)
async def test_every_endpoint_refuses_bad_keys_with_401(
    client: httpx.AsyncClient, method: str, path: str, body: Any, header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header.encode("latin-1")}
    r = await client.request(method, path, json=body, headers=headers)  # type: ignore[arg-type]
    if path.startswith("/api/"):  # Ollama's shape: {"error": "..."}
        assert r.status_code == 401
        assert set(r.json()) == {"error"} and "API key" in r.json()["error"]
    else:
        error(r, 401, "invalid_api_key")
    assert "data" not in r.json()


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
async def test_every_endpoint_works_with_a_valid_key(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    r = await client.request(method, path, json=body, headers=auth(Keys.team_a))
    assert r.status_code == 200, r.text


def test_a_route_without_a_guard_stops_the_app_from_starting() -> None:
    def app_with(*extra: BaseRoute) -> FastAPI:
        app = create_app(Settings(), backends={"echo": FakeBackend()})
        app.router.routes.extend(extra)
        return app

    loose = APIRouter(prefix="/v1")

    @loose.get("/secret")
    async def secret() -> dict[str, str]:
        return {"leak": "yes"}

    app = app_with()
    app.include_router(loose)
    with pytest.raises(RuntimeError, match="/v1/secret has no auth dependency"):
        require_guards(app)
    unguarded = Endpoint(
        openai.list_models,
        name="models",
        guard=lambda request: None,  # type: ignore[arg-type,return-value]
        errors=openai.OPENAI_ERRORS,
    )
    with pytest.raises(RuntimeError, match="/v1/plain has no auth guard"):
        require_guards(app_with(Route("/v1/plain", unguarded)))
    with pytest.raises(RuntimeError, match="neither"):
        require_guards(app_with(Route("/v1/bare", openai.list_models)))
    require_guards(app_with())


async def test_models_outside_the_tenants_list_are_403(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat(model="other"), headers=auth(Keys.limited)
    )
    assert error(r, 403, "permission_denied")["param"] == "model"
    error(
        await client.get("/v1/models/other", headers=auth(Keys.limited)), 403, "permission_denied"
    )
    listed = (await client.get("/v1/models", headers=auth(Keys.limited))).json()["data"]
    assert [m["id"] for m in listed] == ["echo"]
    everything = (await client.get("/v1/models", headers=auth(Keys.team_a))).json()["data"]
    assert {m["id"] for m in everything} == {"echo", "slow", "other"}


async def test_request_rate_limit_is_429_with_openai_headers(client: httpx.AsyncClient) -> None:
    ok = [
        await client.post("/v1/chat/completions", json=chat(), headers=auth(Keys.limited))
        for _ in range(3)
    ]
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "3"
    assert ok[0].headers["x-ratelimit-remaining-requests"] == "2"
    assert ok[2].headers["x-ratelimit-remaining-requests"] == "0"
    refused = await client.post("/v1/chat/completions", json=chat(), headers=auth(Keys.limited))
    body = error(refused, 429, "rate_limit_exceeded")
    assert body["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    # another tenant is unaffected
    assert (
        await client.post("/v1/chat/completions", json=chat(), headers=auth(Keys.team_a))
    ).status_code == 200


async def test_concurrency_limit_is_429_until_a_request_ends(served: str) -> None:
    body = chat("a b c d e f g h", model="slow", stream=True)
    async with httpx.AsyncClient(base_url=served, headers=auth(Keys.conc)) as c:
        async with c.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            second = await c.post("/v1/chat/completions", json=chat())
            error(second, 429, "rate_limit_exceeded")
            assert second.headers["retry-after"] == "1"
            await first.aread()
        await asyncio.sleep(0.05)  # the release runs as the stream closes
        assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200


async def test_spent_budget_is_429_insufficient_quota(client: httpx.AsyncClient) -> None:
    # 3 words of prompt (charged as ~5) + max_tokens 20 at admission; reconciled to 3 + 3.
    used = 0
    while used < 60:
        r = await client.post(
            "/v1/chat/completions", json=chat(max_tokens=20), headers=auth(Keys.budget)
        )
        if r.status_code != 200:
            break
        used += r.json()["usage"]["total_tokens"]
    body = error(r, 429, "insufficient_quota")
    assert body["type"] == "insufficient_quota"
    assert int(r.headers["retry-after"]) > 0
    assert used >= 60 - 25  # refunds let it run close to the budget
    # What was asked, what is left, and when it resets, in units a person reads.
    said = re.fullmatch(
        r"This request may use (\d+) tokens \(prompt \+ max_tokens\) and (\d+) of the daily"
        r" budget of 60 are left; it resets in (\d+ h( \d+ min)?|\d+ min( \d+ s)?|\d+ s)\.",
        body["message"],
    )
    assert said, body["message"]
    asked, left = int(said.group(1)), int(said.group(2))
    assert left == 60 - used and asked > left


async def test_a_request_larger_than_the_whole_budget_is_a_400(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat(max_tokens=100), headers=auth(Keys.budget)
    )
    body = error(r, 400, "exceeds_limit")  # it can never succeed: not a 429 to retry
    assert body["param"] == "max_tokens"
    assert "more than the whole daily budget of 60: it can never be admitted" in body["message"]
    r = await client.post(
        "/v1/chat/completions", json=chat(max_tokens=2000), headers=auth(Keys.tokens)
    )
    assert (
        "more than the limit of 1000 tokens per minute" in error(r, 400, "exceeds_limit")["message"]
    )


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(0.2, "1 s"), (45, "45 s"), (125, "2 min 5 s"), (725, "12 min"), (32280, "8 h 58 min"),
     (7200, "2 h"), (3 * 86400 + 4 * 3600 + 9, "3 d 4 h")],
)  # fmt: skip
def test_human_durations(seconds: float, said: str) -> None:
    assert human_duration(seconds) == said


async def test_token_rate_is_reconciled_with_real_usage(client: httpx.AsyncClient) -> None:
    first = await client.post(
        "/v1/chat/completions", json=chat(max_tokens=500), headers=auth(Keys.tokens)
    )
    assert first.status_code == 200
    charged = 1000 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert charged > 500  # prompt estimate + max_tokens
    await asyncio.sleep(0.05)
    second = await client.post(
        "/v1/chat/completions", json=chat(max_tokens=10), headers=auth(Keys.tokens)
    )
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    # After the refund only ~6 real tokens of the first request remain charged.
    assert remaining > 1000 - 6 - 30, remaining


async def usage(client: httpx.AsyncClient, tenant: str) -> dict[str, Any]:
    r = await client.get("/admin/usage", params={"tenant": tenant}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_a_cancelled_stream_is_billed_for_what_it_produced(served: str) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    body = chat(words, model="slow", stream=True, max_tokens=40)
    async with httpx.AsyncClient(base_url=served, headers=auth(Keys.tokens)) as c:
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                if '"content":" w' in line or '"content":"w' in line:
                    seen += 1
                    if seen == 4:
                        break  # leaving the block closes the connection
        await asyncio.sleep(0.3)  # > the fake's 50 ms per token: it would have gone on
        admin = httpx.AsyncClient(base_url=served, headers=auth(ADMIN))
        async with admin:
            totals = (await admin.get("/admin/usage", params={"tenant": "tokens"})).json()["totals"]
        assert totals["requests"] == 1
        assert 4 <= totals["completion_tokens"] <= 6  # what was produced, not max_tokens
        assert totals["prompt_tokens"] == 40
        follow = await c.post("/v1/chat/completions", json=chat(max_tokens=10))
        assert int(follow.headers["x-ratelimit-remaining-tokens"]) > 1000 - 50 - 30


async def test_usage_is_recorded_per_tenant_key_and_model(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        await client.post(
            "/v1/chat/completions", json=chat("a b c", max_tokens=2), headers=auth(Keys.team_a)
        )
    await client.post(
        "/v1/embeddings", json={"model": "other", "input": "x y"}, headers=auth(Keys.team_a)
    )
    out = await usage(client, "team-a")
    rows = {(row["model"], row["status"]): row for row in out["data"]}
    assert rows[("echo", 200)]["requests"] == 2
    assert rows[("echo", 200)]["completion_tokens"] == 4
    assert rows[("echo", 200)]["key_id"] == "team-a-key"
    assert rows[("echo", 200)]["backend"] == "injected"
    assert rows[("other", 200)]["prompt_tokens"] == 2
    assert out["totals"]["requests"] == 3
    metrics = (await client.get("/metrics")).text
    assert (
        'lockgate_tenant_requests_total{model="echo",status="200",tenant="team-a"} 2.0' in metrics
    )
    assert (
        'lockgate_tenant_tokens_total{kind="completion",model="echo",tenant="team-a"} 4.0'
        in metrics
    )


async def test_admin_api_manages_tenants_and_keys(client: httpx.AsyncClient) -> None:
    admin = auth(ADMIN)
    created = await client.post(
        "/admin/tenants", json={"id": "new", "limits": {"requests_per_minute": 2}}, headers=admin
    )
    assert created.status_code == 201, created.text
    error(await client.post("/admin/tenants", json={"id": "new"}, headers=admin), 409, "conflict")
    bad = await client.post(
        "/admin/tenants", json={"id": "x", "limits": {"requests_per_minute": -1}}, headers=admin
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "limits.requests_per_minute"
    made = (await client.post("/admin/tenants/new/keys", json={"name": "ci"}, headers=admin)).json()
    key = made["key"]
    assert key.startswith("lg-")
    assert "hash" not in made
    listed = (await client.get("/admin/tenants/new/keys", headers=admin)).json()["data"]
    assert [k["id"] for k in listed] == [made["id"]]
    assert "key" not in listed[0]
    assert "hash" not in listed[0]
    assert (await client.get("/v1/models", headers=auth(key))).status_code == 200

    patched = await client.patch("/admin/tenants/new", json={"models": ["echo"]}, headers=admin)
    assert patched.json()["models"] == ["echo"]
    assert patched.json()["limits"]["requests_per_minute"] == 2
    assert [
        m["id"] for m in (await client.get("/v1/models", headers=auth(key))).json()["data"]
    ] == ["echo"]

    rotated = (await client.post(f"/admin/keys/{made['id']}/rotate", json={}, headers=admin)).json()
    error(await client.get("/v1/models", headers=auth(key)), 401, "invalid_api_key")
    assert (await client.get("/v1/models", headers=auth(rotated["key"]))).status_code == 200

    graced = (
        await client.post(
            f"/admin/keys/{rotated['id']}/rotate", json={"grace_seconds": 60}, headers=admin
        )
    ).json()
    assert (await client.get("/v1/models", headers=auth(rotated["key"]))).status_code == 200
    assert (await client.get("/v1/models", headers=auth(graced["key"]))).status_code == 200

    assert (
        await client.post(f"/admin/keys/{graced['id']}/revoke", headers=admin)
    ).status_code == 200
    error(await client.get("/v1/models", headers=auth(graced["key"])), 401, "invalid_api_key")

    assert (await client.delete("/admin/tenants/new", headers=admin)).status_code == 200
    error(await client.get("/v1/models", headers=auth(rotated["key"])), 401, "invalid_api_key")
    error(await client.get("/admin/tenants/new", headers=admin), 404, "not_found")
    tenants_now = (await client.get("/admin/tenants", headers=admin)).json()["data"]
    assert "new" not in {t["id"] for t in tenants_now}


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("POST", "/admin/tenants", {"id": "typo", "limts": {}}, "limts"),
        ("PATCH", "/admin/tenants/team-a", {"limits": {"rpm": 5}}, "limits.rpm"),
        ("POST", "/admin/tenants/team-a/keys", {"nmae": "ci"}, "nmae"),
        ("POST", "/admin/keys/team-a-key/rotate", {"grace": 60}, "grace"),
    ],
)
async def test_admin_bodies_refuse_unknown_fields(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any], param: str
) -> None:
    r = await client.request(method, path, json=body, headers=auth(ADMIN))
    assert error(r, 400, None)["param"] == param


async def test_expiring_keys(client: httpx.AsyncClient) -> None:
    made = (
        await client.post(
            "/admin/tenants/team-a/keys", json={"expires_in": 0.3}, headers=auth(ADMIN)
        )
    ).json()
    assert (await client.get("/v1/models", headers=auth(made["key"]))).status_code == 200
    await asyncio.sleep(0.4)
    error(await client.get("/v1/models", headers=auth(made["key"])), 401, "invalid_api_key")


@pytest.mark.parametrize("key", [None, "wrong", Keys.team_a, ADMIN + "x"])
async def test_admin_api_needs_the_admin_key(client: httpx.AsyncClient, key: str | None) -> None:
    headers = {} if key is None else auth(key)
    error(await client.get("/admin/tenants", headers=headers), 401, "invalid_api_key")


async def test_admin_api_is_off_without_an_admin_key(tmp_path: Path) -> None:
    s = settings(tmp_path, auth={"database": str(tmp_path / "db")})
    app = create_app(s, backends={"echo": FakeBackend()})
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        error(await c.get("/admin/tenants", headers=auth(ADMIN)), 403, "permission_denied")
        error(await c.get("/v1/models"), 401, "invalid_api_key")  # tenants: auth is on


async def test_a_canary_key_never_appears_in_logs_metrics_or_bodies(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    canary = new_key()
    caplog.set_level(logging.DEBUG)
    bodies = []
    for key in (canary, canary[:-1] + "!", Keys.team_a):
        for method, path, body in ENDPOINTS:
            r = await client.request(method, path, json=body, headers=auth(key))
            bodies.append(r.text + str(r.headers))
    made = await client.post("/admin/tenants/team-a/keys", json={}, headers=auth(ADMIN))
    fresh = made.json()["key"]
    await client.post("/v1/chat/completions", json=chat(model="nope"), headers=auth(fresh))
    metrics = (await client.get("/metrics")).text
    listed = (await client.get("/admin/tenants/team-a/keys", headers=auth(ADMIN))).text
    for secret in (canary, Keys.team_a, fresh, ADMIN):
        assert secret not in caplog.text
        assert secret not in metrics
        assert secret not in listed
        assert all(secret not in b for b in bodies)


async def test_no_tenants_on_loopback_means_no_keys(tmp_path: Path) -> None:
    s = Settings(auth={"database": str(tmp_path / "db")})
    app = create_app(s, backends={"echo": FakeBackend()})
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        assert (await c.get("/v1/models")).status_code == 200


async def test_no_tenants_on_a_public_address_refuses_to_start(tmp_path: Path) -> None:
    s = Settings(auth={"database": str(tmp_path / "db")}, server=ServerSettings(host="0.0.0.0"))
    app = create_app(s, backends={"echo": FakeBackend()})
    with pytest.raises(ConfigError, match="LOCKGATE_AUTH__ADMIN_KEY"):
        async with app.router.lifespan_context(app):
            pass
    public = settings(tmp_path, server=ServerSettings(host="0.0.0.0"))
    app = create_app(public, backends={"echo": FakeBackend()})
    async with app.router.lifespan_context(app):
        pass


async def test_budgets_survive_a_restart_through_the_ledger(
    tmp_path: Path, fakes: dict[str, FakeBackend]
) -> None:
    """In-process counters start empty; the day's usage is re-read from the SQLite ledger."""
    for attempt in range(2):
        app = create_app(settings(tmp_path), backends=fakes)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
        ):
            for backend in fakes.values():
                await backend.start()
            words = " ".join(["w"] * 25)
            r = await c.post(
                "/v1/chat/completions", json=chat(words, max_tokens=20), headers=auth(Keys.budget)
            )
            if attempt == 0:
                assert r.status_code == 200  # 25 + 20 of 60 tokens today
            else:
                error(r, 429, "insufficient_quota")  # 45 already spent before the restart


async def test_config_keys_stay_revoked_across_restarts_and_leave_with_the_file(
    tmp_path: Path, fakes: dict[str, FakeBackend]
) -> None:
    async def models(config: Settings, key: str, revoke: str | None = None) -> int:
        app = create_app(config, backends=fakes)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
        ):
            if revoke is not None:
                r = await c.post(f"/admin/keys/{revoke}/revoke", headers=auth(ADMIN))
                assert r.status_code == 200
            return (await c.get("/v1/models", headers=auth(key))).status_code

    assert await models(settings(tmp_path), Keys.limited, revoke="limited-key") == 401
    assert await models(settings(tmp_path), Keys.limited) == 401  # the restart keeps it revoked
    assert await models(settings(tmp_path), Keys.team_a) == 200
    fewer = [t for t in tenants() if t["id"] != "team-a"]
    assert await models(settings(tmp_path, tenants=fewer), Keys.team_a) == 401  # left the file


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS[:3] + ENDPOINTS[6:8])
async def test_two_authorization_headers_are_a_400(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    headers = [("Authorization", f"Bearer {Keys.team_a}"), ("Authorization", "Bearer lg-other")]
    r = await client.request(method, path, json=body, headers=headers)
    assert r.status_code == 400, r.text
    assert "one Authorization header" in r.text


async def test_two_admin_authorization_headers_are_a_400(client: httpx.AsyncClient) -> None:
    headers = [("Authorization", f"Bearer {ADMIN}"), ("Authorization", f"Bearer {ADMIN}")]
    r = await client.get("/admin/tenants", headers=headers)
    assert r.status_code == 400


async def test_no_redirect_is_answered_before_authentication(client: httpx.AsyncClient) -> None:
    r = await client.get("/admin/tenants/")
    assert r.status_code in (401, 404)
    assert "location" not in r.headers


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**chat(), "max_tokens": "5"}),
        ("/v1/chat/completions", {**chat(), "stream": "yes"}),
        ("/v1/chat/completions", {**chat(), "n": "1"}),
        ("/v1/chat/completions", {**chat(), "temperature": "0.5"}),
        ("/v1/chat/completions", {**chat(), "stream": 1}),
        ("/v1/completions", {"model": "echo", "prompt": 5}),
        ("/v1/responses", {"model": "echo", "input": "x", "max_output_tokens": "5"}),
        ("/api/chat", {**chat(), "options": {"temperature": "0.5"}}),
        ("/api/generate", {"model": "echo", "prompt": "x", "stream": "false"}),
    ],
)
async def test_no_string_or_number_coercion(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    r = await client.post(path, json=body, headers=auth(Keys.team_a))
    assert r.status_code == 400, r.text
