"""Hot reload in process: a config file rewritten, ``POST /admin/reload``, fake models.

The fake backend (``backend: fake``) stands in for the engines so that an instance can
be slow, and so that the test can see which backend object served and when it was
closed. A real ``lockgate serve`` with the real model, reloaded by SIGHUP and by the
admin API under streaming load, is in tests/integration/test_reload.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.fleet import Fleet
from gateway.reload import changed_keys
from gateway.settings import Settings, load_settings
from gateway.tenancy.keys import key_hash, new_key

ADMIN = "admin-" + "q" * 40
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
KEY, OTHER = new_key(), new_key()


def fake(id: str, behaviour: str = "echo", **kw: Any) -> dict[str, Any]:
    return {"name": "chat", "backend": "fake", "id": id, "behaviour": behaviour, **kw}


def config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "models": [fake("a", "slow", delay=0.02)],
        "auth": {"database": str(tmp_path / "db"), "admin_key": ADMIN},
        "batches": {"database": str(tmp_path / "b.db"), "files_dir": str(tmp_path / "files")},
        "tenants": [{"id": "t", "keys": [{"id": "k", "hash": key_hash(KEY)}]}],
        "routing": {"affinity": "none"},
    }
    data.update(overrides)
    return data


class Reloadable:
    def __init__(self, path: Path, app: FastAPI, client: httpx.AsyncClient) -> None:
        self.path, self.app, self.client = path, app, client

    def write(self, data: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(data))

    async def reload(self) -> httpx.Response:
        return await self.client.post("/admin/reload", headers=ADMIN_AUTH)

    @property
    def fleet(self) -> Fleet:
        fleet: Fleet = self.app.state.reloader._fleet
        return fleet

    def backends(self) -> dict[str, FakeBackend]:
        found = {}
        for m in self.fleet.registry.instances():
            assert isinstance(m.backend, FakeBackend)
            found[m.public_id] = m.backend
        return found

    async def chat(self, text: str = "one two three", key: str = KEY) -> httpx.Response:
        body = {"model": "chat", "messages": [{"role": "user", "content": text}]}
        return await self.client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    stack = contextlib.AsyncExitStack()

    async def start(data: dict[str, Any]) -> Reloadable:
        path = tmp_path / "lockgate.yaml"
        path.write_text(yaml.safe_dump(data))
        app = create_app(
            load_settings(path, environ={}), reload_from=lambda: load_settings(path, environ={})
        )
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30)
        )
        for _ in range(200):
            if (await client.get("/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        return Reloadable(path, app, client)

    async with stack:
        yield start


async def test_tenants_keys_and_limits_apply_at_once(
    gateway: Callable[..., Any], tmp_path: Path
) -> None:
    g: Reloadable = await gateway(config(tmp_path))
    assert (await g.chat(key=OTHER)).status_code == 401
    data = config(
        tmp_path,
        tenants=[
            {
                "id": "t",
                "limits": {"requests_per_minute": 1},
                "keys": [{"id": "k", "hash": key_hash(KEY)}],
            },
            {"id": "u", "keys": [{"id": "k2", "hash": key_hash(OTHER)}]},
        ],
    )
    g.write(data)
    answer = await g.reload()
    assert answer.status_code == 200, answer.text
    assert answer.json()["applied"] == ["tenants"]
    assert (await g.chat(key=OTHER)).status_code == 200  # the new key, without waiting
    assert (await g.chat()).status_code == 200
    assert (await g.chat()).status_code == 429  # the new limit
    # A key that leaves the file is revoked: its tenant's requests are refused at once.
    data["tenants"] = data["tenants"][:1]
    g.write(data)
    assert (await g.reload()).status_code == 200
    assert (await g.chat(key=OTHER)).status_code == 401


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d["models"][0].update(delay=-1), "models.0.delay"),
        (lambda d: d["tenants"].append({"id": "t"}), "tenant ids must be unique"),
        (lambda d: d["models"].append(fake("a")), "instance id 'a' is used twice"),
        (
            lambda d: d["models"].append({"name": "m", "path": "/nowhere/x.gguf"}),
            "models.1.path: model 'm': model file not found: /nowhere/x.gguf",
        ),
        (lambda d: d["routing"].update(retries="many"), "routing.retries"),
    ],
)
async def test_a_bad_file_is_refused_whole_and_the_old_one_serves(
    gateway: Callable[..., Any],
    tmp_path: Path,
    change: Callable[[dict[str, Any]], None],
    named: str,
) -> None:
    g: Reloadable = await gateway(config(tmp_path))
    before = g.backends()
    data = config(tmp_path)
    # A good change in the same file must not apply either.
    data["tenants"].append({"id": "u", "keys": [{"id": "k2", "hash": key_hash(OTHER)}]})
    change(data)
    g.write(data)
    answer = await g.reload()
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_config"
    assert named in error["message"]
    assert g.backends() == before
    assert (await g.chat(key=OTHER)).status_code == 401
    assert (await g.chat()).status_code == 200
    g.path.write_text("models: [unclosed\n")
    answer = await g.reload()
    assert answer.status_code == 422
    assert "not valid YAML" in answer.json()["error"]["message"]


async def test_an_instance_replaced_under_load_finishes_what_it_started(
    gateway: Callable[..., Any], tmp_path: Path
) -> None:
    g: Reloadable = await gateway(config(tmp_path))
    old = g.backends()["a"]
    text = " ".join(f"w{i}" for i in range(40))  # ~0.8 s at 0.02 s a word
    running = [asyncio.create_task(g.chat(text)) for _ in range(4)]
    while old.running < 4:  # noqa: ASYNC110 - the fake has no event for it
        await asyncio.sleep(0.01)
    g.write(config(tmp_path, models=[fake("a", "slow", delay=0.001)]))
    answer = await g.reload()
    assert answer.status_code == 200, answer.text
    assert answer.json()["models"]["replaced"] == ["chat/a"]
    new = g.backends()["a"]
    assert new is not old and new.ready
    assert not old.closed  # its requests are still running
    assert (await g.chat()).status_code == 200  # a new request goes to the new one
    assert new.seen and old.running == 4
    for done in await asyncio.gather(*running):
        assert done.status_code == 200
        assert done.json()["choices"][0]["message"]["content"] == text
    await asyncio.wait_for(g.fleet.retired(), 5)
    assert old.closed and not new.closed


async def test_instances_added_and_removed_and_weights(
    gateway: Callable[..., Any], tmp_path: Path
) -> None:
    g: Reloadable = await gateway(config(tmp_path, models=[fake("a")]))
    put = await g.client.put(
        "/admin/models/chat/instances/a/weight", json={"weight": 7}, headers=ADMIN_AUTH
    )
    assert put.status_code == 200
    g.write(config(tmp_path, models=[fake("a"), fake("b", weight=30)]))
    answer = (await g.reload()).json()
    assert answer["models"]["added"] == ["chat/b"]
    status = (await g.client.get("/admin/models", headers=ADMIN_AUTH)).json()["data"][0]
    weights = {i["id"]: i["weight"] for i in status["instances"]}
    assert weights == {"a": 7, "b": 30}  # a's run-time weight stays: its config did not change
    served = {(await g.chat()).headers["x-lockgate-backend"] for _ in range(40)}
    assert served == {"a", "b"}
    # A changed configured weight wins over the run-time one.
    g.write(config(tmp_path, models=[fake("a", weight=50), fake("b", weight=30)]))
    assert (await g.reload()).json()["models"]["replaced"] == ["chat/a"]
    status = (await g.client.get("/admin/models", headers=ADMIN_AUTH)).json()["data"][0]
    assert {i["id"]: i["weight"] for i in status["instances"]} == {"a": 50, "b": 30}
    removed = g.backends()["b"]
    g.write(config(tmp_path, models=[fake("a", weight=50)]))
    assert (await g.reload()).json()["models"]["removed"] == ["chat/b"]
    served = {(await g.chat()).headers["x-lockgate-backend"] for _ in range(10)}
    assert served == {"a"}
    await asyncio.wait_for(g.fleet.retired(), 5)
    assert removed.closed


async def test_a_model_name_added_and_removed(gateway: Callable[..., Any], tmp_path: Path) -> None:
    g: Reloadable = await gateway(config(tmp_path, models=[fake("a")]))
    g.write(config(tmp_path, models=[fake("a"), {"name": "other", "backend": "fake"}]))
    assert (await g.reload()).status_code == 200
    listed = await g.client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert {m["id"] for m in listed.json()["data"]} == {"chat", "other"}
    g.write(config(tmp_path, models=[{"name": "other", "backend": "fake"}]))
    assert (await g.reload()).json()["models"]["removed"] == ["chat/a"]
    gone = await g.chat()
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "model_not_found"


async def test_what_needs_a_restart_is_named_and_the_rest_applies(
    gateway: Callable[..., Any], tmp_path: Path
) -> None:
    g: Reloadable = await gateway(config(tmp_path))
    data = config(
        tmp_path,
        server={"port": 9999, "drain_seconds": 5},
        scheduler={"policy": "fcfs", "max_queue": 3},
        redis_url="redis://127.0.0.1:1",
    )
    g.write(data)
    answer = (await g.reload()).json()
    assert answer["restart_needed"] == ["server.port", "scheduler.policy", "redis_url"]
    assert answer["applied"] == ["server.drain_seconds", "scheduler.max_queue"]
    assert g.app.state.drain.seconds == 5
    reloader = g.app.state.reloader
    assert reloader.settings.scheduler.max_queue == 3
    # Nothing changed again: nothing to report.
    assert (await g.reload()).json()["applied"] == []


async def test_request_log_and_drift_settings_apply(
    gateway: Callable[..., Any], tmp_path: Path
) -> None:
    tenant = {"id": "t", "log_requests": True, "keys": [{"id": "k", "hash": key_hash(KEY)}]}
    g: Reloadable = await gateway(config(tmp_path, tenants=[tenant], models=[fake("a")]))
    assert (await g.chat()).status_code == 200  # no log configured: nothing written
    log = tmp_path / "requests.jsonl"
    g.write(
        config(
            tmp_path,
            tenants=[tenant],
            models=[fake("a")],
            request_log={"path": str(log)},
            drift={"enabled": False},
        )
    )
    assert (await g.reload()).json()["applied"] == ["request_log.path", "drift.enabled"]
    assert (await g.chat()).status_code == 200
    drift = await g.client.get("/admin/drift/chat", headers=ADMIN_AUTH)
    assert drift.status_code == 404 and "off" in drift.json()["error"]["message"]
    g.write(config(tmp_path, tenants=[tenant], models=[fake("a")]))
    assert (await g.reload()).status_code == 200  # the log closed: the line is on disk
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and '"tenant":"t"' in lines[0]


async def test_without_a_file_reload_is_refused(tmp_path: Path) -> None:
    settings = Settings(**config(tmp_path))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            answer = await c.post("/admin/reload", headers=ADMIN_AUTH)
    assert answer.status_code == 422
    assert "no file" in answer.json()["error"]["message"]


def test_changed_keys_name_keys_never_values() -> None:
    old = Settings(auth={"admin_key": "a" * 40}, redis_url="redis://:hunter2@h:1")
    new = Settings(auth={"admin_key": "b" * 40}, redis_url="redis://:other@h:1")
    keys = changed_keys(old, new)
    assert keys == ["auth.admin_key", "redis_url"]
    assert changed_keys(old, old) == []
