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

from gateway import cli as cli_app
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
    server = lockgate(CONFIG.replace("DB", str(root / "lockgate.db")), root, admin_key=ADMIN)
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


def test_every_change_can_be_undone(gateway: Server) -> None:
    url = gateway.base_url
    made = cli("tenants", "create", "undo", "--models", "gemma", "--rpm", "5", url=url)
    assert made["tenant"]["models"] == ["gemma"]
    assert cli("tenants", "update", "undo", "--all-models", url=url)["models"] is None
    cleared = cli("tenants", "update", "undo", "--rpm", "none", "--tpm", "900", url=url)
    assert cleared["limits"]["requests_per_minute"] is None  # removed, not zero
    assert cleared["limits"]["tokens_per_minute"] == 900
    empty = cli("tenants", "update", "undo", "--models", "", url=url, check=False)
    assert empty.returncode == 2 and "--all-models" in empty.stderr  # not "forbid everything"
    unknown = cli("tenants", "update", "undo", "--models", "gemma,nope", url=url, check=False)
    assert unknown.returncode == 1
    assert "serves no model named 'nope'; it serves gemma, gemma-other" in unknown.stderr
    bad = cli("tenants", "update", "undo", "--rpm", "lots", url=url, check=False)
    assert bad.returncode == 2 and "--rpm must be a whole number, or none" in bad.stderr
    cli("tenants", "delete", "undo", url=url)


def test_every_tenant_field_has_a_flag(gateway: Server) -> None:
    url = gateway.base_url
    made = cli(
        "tenants", "create", "flags", "--log-requests", "--priority", "batch", "--weight", "2",
        "--model-limit", "gemma:rpm=3,tpm=100", url=url,
    )["tenant"]  # fmt: skip
    assert (made["log_requests"], made["priority"], made["weight"]) == (True, "batch", 2.0)
    assert made["model_limits"]["gemma"]["requests_per_minute"] == 3
    changed = cli(
        "tenants", "update", "flags", "--no-log-requests", "--no-spillover",
        "--model-limit", "gemma:tpm=none",
        "--model-limit", "gemma-other:concurrency=1", url=url,
    )  # fmt: skip
    assert changed["log_requests"] is False and changed["spillover"] is False
    assert changed["model_limits"]["gemma"]["requests_per_minute"] == 3  # kept
    assert changed["model_limits"]["gemma"]["tokens_per_minute"] is None
    assert changed["model_limits"]["gemma-other"]["max_concurrent"] == 1
    removed = cli("tenants", "update", "flags", "--model-limit", "gemma:none", url=url)
    assert set(removed["model_limits"]) == {"gemma-other"}
    cli("tenants", "delete", "flags", url=url)


def test_keys_take_human_durations_and_rotation_keeps_the_expiry(gateway: Server) -> None:
    url = gateway.base_url
    cli("tenants", "create", "durations", url=url)
    key = cli("keys", "create", "durations", "--expires-in", "30d", url=url)
    assert abs(key["expires_at"] - (time.time() + 30 * 86400)) < 60
    rotated = cli("keys", "rotate", key["id"], "--grace", "12h", url=url)
    assert rotated["expires_at"] == key["expires_at"]  # rotating is not extending
    (old,) = [k for k in cli("keys", "list", "durations", url=url) if k["id"] == key["id"]]
    assert abs(old["expires_at"] - (time.time() + 12 * 3600)) < 60
    wrong = cli("keys", "rotate", rotated["id"], "--grace", "12x", url=url, check=False)
    assert wrong.returncode == 2 and "--grace must be a duration" in wrong.stderr
    never = cli("keys", "create", "durations", "--expires-in", "0", url=url, check=False)
    assert never.returncode == 1
    assert "--expires-in" in never.stderr and "expires_in" not in never.stderr  # the flag
    cli("tenants", "delete", "durations", url=url)


def test_usage_of_an_unknown_tenant_is_an_error(gateway: Server) -> None:
    done = cli("usage", "--tenant", "nobody-at-all", url=gateway.base_url, check=False)
    assert done.returncode == 1
    assert "No tenant 'nobody-at-all'" in done.stderr


def test_version_short_help_and_every_command_described() -> None:
    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, check=True
        )
        return done.stdout

    assert run("--version").startswith("lockgate 0.1.0")
    groups = [cli_app.app, *(g.typer_instance for g in cli_app.app.registered_groups)]
    for group in groups:
        assert group is not None
        for command in group.registered_commands:
            assert command.callback is not None
            assert (command.help or command.callback.__doc__ or "").strip(), command.callback
    for group in (("tenants",), ("keys",), ("usage",)):
        assert "LOCKGATE_AUTH__ADMIN_KEY" in " ".join(run(*group, "-h").split())


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
