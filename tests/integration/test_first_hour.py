"""What a new user sees in the first minutes: `lockgate serve --model PATH` on the real model,
with the log at its default level (info).

The start-up log says which model is served and that it is a base model, where state
lives and whether auth is on and why; each request leaves one access line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from backends.model_store import default_model_path
from tests.integration.conftest import free_port, spawn, stop

pytestmark = pytest.mark.integration

ADMIN = "admin-" + "f" * 40


MODEL = "gemma-3-270m-q4_k_m"  # named after the file


def serve(root: Path, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Start, list the models, complete once, stop: the model ids and the whole log."""
    port = free_port()
    gguf = default_model_path(progress=False)
    cmd = [sys.executable, "-m", "gateway", "serve", "--model", str(gguf), "--port", str(port)]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")}
    environ |= {"XDG_STATE_HOME": str(root / "state"), **(env or {})}
    log = root / f"server-{port}.log"
    server = spawn(cmd, f"http://127.0.0.1:{port}", "/health/ready", log, env=environ)
    try:
        models = httpx.get(f"{server.base_url}/v1/models", timeout=10)
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3}
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    finally:
        stop(server)
    ids = [m["id"] for m in models.json().get("data", [])] if models.status_code == 200 else []
    return ids, log.read_text()


def test_the_start_up_log_says_what_is_served_and_why_auth_is_on_or_off(tmp_path: Path) -> None:
    ids, text = serve(tmp_path)
    assert ids == [MODEL]
    database = tmp_path / "state" / "lockgate" / "lockgate.db"
    assert f"auth off: no tenants in {database} and no admin key" in text
    ready = [line for line in text.splitlines() if f"model {MODEL} (embedded) ready" in line]
    assert ready, text
    assert "gemma3" in ready[0] and "Q4_K_M" in ready[0]
    assert "a base model (its GGUF has no chat template)" in ready[0]
    assert "lockgate serve --model PATH" in ready[0]
    access = [line for line in text.splitlines() if "lockgate.access" in line]
    assert any("POST /v1/completions 200 " in line for line in access), text

    # A tenant made once stays in the state directory: the next start says auth is on.
    created = subprocess.run(
        [sys.executable, "-c", _CREATE_TENANT, str(database)], capture_output=True, text=True
    )
    assert created.returncode == 0, created.stderr
    _, text = serve(tmp_path)
    assert f"auth on: 1 tenant in {database}" in text
    _, text = serve(tmp_path, env={"LOCKGATE_AUTH__ADMIN_KEY": ADMIN})
    assert "admin API on (LOCKGATE_AUTH__ADMIN_KEY is set)" in text
    assert ADMIN not in text


# A tenant written straight into the store, as `lockgate tenants create` would leave it.
_CREATE_TENANT = """
import asyncio, sys
from pathlib import Path
from gateway.tenancy.records import Tenant
from gateway.tenancy.store import SQLiteStore

async def main():
    store = SQLiteStore(Path(sys.argv[1]))
    await store.open()
    await store.put_tenant(Tenant(id="team-a"))
    await store.close()

asyncio.run(main())
"""
