"""Hot reload of a real `lockgate serve` with the real model, under streaming load.

Three clients stream chats (the OpenAI SDK) back to back for the whole test, while the
config file is rewritten and applied three times:

1. by SIGHUP: a second tenant and key, the embedded engine replaced (the same weights
   through another path, a shorter context: a new engine loads beside the old one), a
   second instance added;
2. by ``POST /admin/reload``: the second instance and the second tenant removed;
3. a bad file: refused whole with the key named, the old configuration serving.

No streamed request may fail or end short, and each retired engine is closed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from backends.model_store import default_model_path
from gateway.tenancy.keys import key_hash, new_key
from tests.integration.conftest import NO_EOG, Server, free_port, spawn, stop

pytestmark = pytest.mark.integration

ADMIN = "admin-" + "h" * 40
KEY_A, KEY_B = new_key(), new_key()
TOKENS = 24


def config(
    port: int,
    root: Path,
    *,
    path: str | None = None,
    n_ctx: int = 1024,
    second: bool,
    tenant_b: bool,
) -> str:
    model: dict[str, object] = {"name": "gemma", "n_ctx": n_ctx, "max_sequences": 4}
    if path is not None:
        model["path"] = path
    models = [model]
    if second:
        models.append({"name": "gemma", "id": "second", "n_ctx": 512, "max_sequences": 2})
    tenants = [{"id": "a", "keys": [{"id": "ka", "hash": key_hash(KEY_A)}]}]
    if tenant_b:
        tenants.append({"id": "b", "keys": [{"id": "kb", "hash": key_hash(KEY_B)}]})
    data = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "info"},
        "routing": {"affinity": "none"},
        # Its own tenant store: the session's default one is shared by servers without keys.
        "auth": {"database": str(root / "lockgate.db")},
        "models": models,
        "tenants": tenants,
    }
    return yaml.safe_dump(data)


class Load:
    """Clients streaming back to back until stopped; every failure is kept."""

    def __init__(self, server: Server, clients: int) -> None:
        self.server = server
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with openai.OpenAI(
            base_url=f"{self.server.base_url}/v1", api_key=KEY_A, max_retries=0, timeout=120
        ) as client:
            while not self._stop.is_set():
                try:
                    chunks = list(
                        client.chat.completions.create(
                            model="gemma",
                            messages=[{"role": "user", "content": "Tell me about the sea."}],
                            max_tokens=TOKENS,
                            stream=True,
                            stream_options={"include_usage": True},
                            logit_bias=NO_EOG,  # type: ignore[arg-type]
                        )
                    )
                    usage = chunks[-1].usage
                    if usage is None or usage.completion_tokens != TOKENS:
                        self.failures.append(f"ended short: {usage}")
                    else:
                        self.done += 1
                except Exception as exc:  # every failure counts: it is the test's result
                    self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)


def wait_for(check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def chat_status(server: Server, key: str) -> int:
    body = {"model": "gemma", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers,
                      timeout=120).status_code  # fmt: skip


def instances(server: Server) -> list[str]:
    answer = httpx.get(
        f"{server.base_url}/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    return [i["id"] for i in answer.json()["data"][0]["instances"]]


def test_reload_under_streaming_load_fails_no_request(tmp_path: Path) -> None:
    port, path = free_port(), tmp_path / "config.yaml"
    path.write_text(config(port, tmp_path, second=False, tenant_b=False))
    server = spawn(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        f"http://127.0.0.1:{port}",
        "/health/ready",
        tmp_path / "server.log",
        env={**os.environ, "LOCKGATE_AUTH__ADMIN_KEY": ADMIN},
    )
    link = tmp_path / "the-same-weights.gguf"
    link.symlink_to(default_model_path(progress=False))
    load = Load(server, clients=3)
    try:
        wait_for(lambda: load.done >= 3)
        assert chat_status(server, KEY_B) == 401

        # 1. SIGHUP: a tenant added, the engine replaced, an instance added.
        path.write_text(
            config(port, tmp_path, path=str(link), n_ctx=768, second=True, tenant_b=True)
        )
        os.killpg(os.getpgid(server.process.pid), signal.SIGHUP)
        wait_for(lambda: "reloaded:" in server.log.read_text())
        log = server.log.read_text()
        assert "replaced gemma/embedded" in log and "added gemma/second" in log, log
        assert instances(server) == ["embedded", "second"]
        assert chat_status(server, KEY_B) == 200
        wait_for(lambda: "instance embedded of model gemma retired and closed" in
                 server.log.read_text())  # fmt: skip
        done = load.done
        wait_for(lambda: load.done >= done + 6)  # on the new engines

        # 2. The admin API: the second instance and tenant b removed.
        path.write_text(
            config(port, tmp_path, path=str(link), n_ctx=768, second=False, tenant_b=False)
        )
        answer = httpx.post(
            f"{server.base_url}/admin/reload",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert report["models"]["removed"] == ["gemma/second"]
        assert report["applied"] == ["models", "tenants"]
        assert instances(server) == ["embedded"]
        assert chat_status(server, KEY_B) == 401

        # 3. A bad file: refused whole, and the old configuration goes on serving.
        path.write_text(config(port, tmp_path, n_ctx=8, second=True, tenant_b=True))
        refused = httpx.post(
            f"{server.base_url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert refused.status_code == 422
        assert "models.0.n_ctx" in refused.json()["error"]["message"]
        assert instances(server) == ["embedded"]
        assert chat_status(server, KEY_B) == 401
        done = load.done
        wait_for(lambda: load.done >= done + 3)
    finally:
        load.stop()
        log = server.log.read_text()
        stop(server)
    assert load.failures == [], load.failures
    assert load.done >= 12
    assert "instance second of model gemma retired and closed" in log
    assert "Traceback" not in log
