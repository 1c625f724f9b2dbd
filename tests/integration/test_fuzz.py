"""Schemathesis against the gateway's own OpenAPI description of every route.

A real ``lockgate serve`` with fake-backend models (``backend: fake``: no model is needed
to fuzz the HTTP surface) and the admin API on; every operation of ``app.openapi()``,
a fixed seed (derandomized) and at most 25 examples each, valid and invalid. Checked: no
response is a 5xx, whatever the input.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.settings import Settings
from gateway.tenancy.keys import key_hash, new_key
from tests.integration.conftest import Server, lockgate, stop

pytestmark = pytest.mark.integration

ADMIN = "fuzz-admin-" + "k" * 32
CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  log_level: warning
models:
  - name: echo
    backend: fake
  - name: fail_mid_stream
    backend: fake
auth:
  admin_key: ADMIN
  database: DATABASE
tenants:
  - id: fuzz
    keys:
      - id: fuzz-key
        hash: "HASH"
"""
KEY = new_key()

# The document describes routes, not models: the app it comes from needs no backend started.
DOCUMENT = create_app(Settings(), backends={"echo": FakeBackend()}).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    config = CONFIG.replace("ADMIN", ADMIN).replace("DATABASE", str(root / "fuzz.db"))
    config = config.replace("HASH", key_hash(KEY))
    server = lockgate(config, root)
    yield server
    stop(server)


@schema.parametrize()
@settings(max_examples=25, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error(case: schemathesis.Case, fuzzed: Server) -> None:
    key = ADMIN if case.path.startswith("/admin") else KEY
    case.call_and_validate(
        base_url=fuzzed.base_url,
        headers={"Authorization": f"Bearer {key}"},
        checks=[not_a_server_error],
        timeout=30,
    )
