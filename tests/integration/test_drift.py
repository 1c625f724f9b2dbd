"""`lockgate drift report` against a real `lockgate serve` with the real model.

Twenty chats of one prompt: ten answers cut at 4 tokens, then ten at 40. The report
reads the shift in completion tokens (and none in prompt tokens or finish reasons) off
the gateway, prints the table and writes the PNG; the gauges say the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.tenancy.keys import key_hash, new_key
from tests.integration.conftest import NO_EOG, Server, lockgate, stop

pytestmark = pytest.mark.integration

ADMIN = "admin-" + "d" * 40
KEY = new_key()
CONFIG = """
server: {{host: 127.0.0.1, port: {port}, log_level: warning}}
models:
  - {{name: gemma, n_ctx: 512, max_sequences: 2}}
tenants:
  - {{id: team, keys: [{{id: team-key, hash: 'HASH'}}]}}
drift: {{reference: 10, window: 10, min_requests: 10}}
auth: {{database: 'DB'}}
""".replace("HASH", key_hash(KEY))


def drift_psi(gateway: Server, feature: str) -> float:
    prefix = f'lockgate_drift_psi{{feature="{feature}",model="gemma"}} '
    text = httpx.get(f"{gateway.base_url}/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(prefix)).split()[-1])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("drift")
    # Its own tenant store: the session's shared one must stay without tenants.
    server = lockgate(CONFIG.replace("DB", str(root / "lockgate.db")), root, admin_key=ADMIN)
    yield server
    stop(server)


def test_drift_report_reads_a_shift_off_a_real_gateway(gateway: Server, tmp_path: Path) -> None:
    with openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0) as c:
        for max_tokens in [4] * 10 + [40] * 10:
            c.chat.completions.create(
                model="gemma", max_tokens=max_tokens, logit_bias=NO_EOG,  # type: ignore[arg-type]
                messages=[{"role": "user", "content": "Tell me about the sea."}],
            )  # fmt: skip
    png = tmp_path / "drift.png"
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "drift", "report", "--model", "gemma",
         "--png", str(png), "--url", gateway.base_url],
        env={**os.environ, "LOCKGATE_AUTH__ADMIN_KEY": ADMIN},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    print(done.stdout)  # the README quotes this run's table
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert rows["completion_tokens"][1:4:2] == ["psi", "significant"]
    assert rows["finish_reason"][1:4:2] == ["js", "stable"]  # "length", before and after
    assert rows["prompt_tokens"][3] == "stable"  # the same prompt
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert drift_psi(gateway, "completion_tokens") > 0.25
