"""A platform admin's day one: `lockgate tenants create` → a key → the OpenAI SDK → usage.

One real gateway (SQLite store, the real model) driven by the CLI as a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.conftest import Server, free_port, lockgate, stop

pytestmark = pytest.mark.integration

ADMIN = "admin-" + "c" * 40

CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  log_level: warning
auth:
  database: DB
models:
  - name: gemma
    n_ctx: 512
    max_sequences: 2
  - name: gemma-other
    n_ctx: 256
    max_sequences: 1
"""


def cli(*args: str, url: str | None = None, check: bool = True) -> Any:
    env = {**os.environ, "LOCKGATE_AUTH__ADMIN_KEY": ADMIN}
    cmd = [sys.executable, "-m", "gateway", *args]
    if url is not None:
        cmd += ["--url", url]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    return done


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("tenancy-cli")
    os.environ["LOCKGATE_AUTH__ADMIN_KEY"] = ADMIN
    try:
        server = lockgate(CONFIG.replace("DB", str(root / "lockgate.db")), root)
    finally:
        del os.environ["LOCKGATE_AUTH__ADMIN_KEY"]
    yield server
    stop(server)


def test_one_command_makes_a_tenant_whose_key_works_with_the_sdk(gateway: Server) -> None:
    made = cli(
        "tenants", "create", "team-a", "--models", "gemma", "--rpm", "2", "--with-key",
        url=gateway.base_url,
    )  # fmt: skip
    key = made["key"]["key"]
    assert key.startswith("lg-")
    with openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0) as sdk:
        reply = sdk.chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.usage is not None
        assert [m.id for m in sdk.models.list()] == ["gemma"]
        with pytest.raises(openai.PermissionDeniedError):
            sdk.chat.completions.create(
                model="gemma-other", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
        sdk.completions.create(model="gemma", prompt="Hi", max_tokens=2)
        with pytest.raises(openai.RateLimitError) as limited:
            sdk.completions.create(model="gemma", prompt="Hi", max_tokens=2)
        assert limited.value.response.headers["x-ratelimit-limit-requests"] == "2"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{gateway.base_url}/v1", api_key="lg-wrong", max_retries=0
        ).models.list()
    time.sleep(1.2)  # the ledger writes once a second
    usage = cli("usage", "--tenant", "team-a", url=gateway.base_url)
    assert usage["totals"]["requests"] == 2  # admitted ones; refusals are counted in metrics
    assert usage["totals"]["completion_tokens"] == reply.usage.completion_tokens + 2

    updated = cli("tenants", "update", "team-a", "--tpm", "5000", url=gateway.base_url)
    assert updated["limits"]["requests_per_minute"] == 2  # kept
    assert updated["limits"]["tokens_per_minute"] == 5000
    listed = cli("keys", "list", "team-a", url=gateway.base_url)
    assert [k["id"] for k in listed] == [made["key"]["id"]]
    assert "key" not in listed[0]
    cli("keys", "revoke", made["key"]["id"], url=gateway.base_url)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0).models.list()
    cli("tenants", "delete", "team-a", url=gateway.base_url)
    assert cli("tenants", "list", url=gateway.base_url) == []


def test_cli_errors_are_short_and_keyless(gateway: Server) -> None:
    done = cli("tenants", "show", "nobody", url=gateway.base_url, check=False)
    assert done.returncode == 1
    assert "404" in done.stderr
    assert ADMIN not in done.stderr + done.stdout
    generated = cli("keys", "generate")
    assert generated["hash"].startswith("sha256:")


def raw_get(server: Server, target: str, host: str) -> tuple[int, bytes]:
    """Send the request line exactly as given (no client-side normalisation)."""
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models",
        "//v1/models",
        "/v1//models",
        "/v1/../v1/models",
        "/./v1/models",
        "/v1%2Fmodels",
        "/v1/%6Dodels",
        "/v1/models/",
        "/v1/models/gemma",
        "/V1/models",
        "/admin/../v1/models",
        "/health/../v1/models",
        "/metrics/../v1/models",
        "http://127.0.0.1/v1/models",
        "/admin/tenants",
        "/admin//tenants",
        "/ADMIN/tenants",
    ],
)
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:1", "evil.example", "127.0.0.1\t"])
def test_path_and_host_variants_never_bypass_auth(gateway: Server, target: str, host: str) -> None:
    status, data = raw_get(gateway, target, host)
    assert status in (400, 401, 404, 405), (target, host, data[:200])
    assert b'"gemma"' not in data


def test_no_tenants_on_a_public_address_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.replace("DB", str(tmp_path / "db")).format(port=free_port()))
    env = {k: v for k, v in os.environ.items() if k != "LOCKGATE_AUTH__ADMIN_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "-c", str(config), "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in done.stderr
    assert "LOCKGATE_AUTH__ADMIN_KEY" in done.stderr
