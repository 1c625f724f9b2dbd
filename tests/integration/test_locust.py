"""`make locust`'s locustfile, run headless by real locust against a real gateway.

The gateway serves the fake backend's ``slow`` model (one word every 50 ms), so that a
stream lasts much longer than its response headers take. Locust's rows must each be
timed to the end of what they name, ``Aggregated`` must sum only real requests, and the
stream figures (TTFT, tokens/s) must come in a table of their own.
"""

from __future__ import annotations

import csv
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, Server, lockgate, stop

pytestmark = pytest.mark.integration

LOCUST = Path.home() / ".cache/lockgate/locust-venv/bin/locust"
CONFIG = """
server: {{port: {port}, log_level: warning}}
models:
  - {{name: slow, backend: fake, delay: 0.05, capacity: 8}}
auth: {{database: DB}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("locust")
    server = lockgate(CONFIG.replace("DB", str(root / "lockgate.db")), root)
    yield server
    stop(server)


def test_rows_are_what_they_say_and_the_aggregate_sums_only_requests(
    gateway: Server, tmp_path: Path
) -> None:
    if not LOCUST.exists():
        pytest.fail("locust is not installed; `make test` installs it (target $(LOCUST))")
    streams = tmp_path / "streams.csv"
    env = {
        **os.environ,
        "LOCKGATE_MODEL": "slow",
        "LOCKGATE_MAX_TOKENS": "8",
        "LOCKGATE_STREAM_CSV": str(streams),
    }
    cmd = [
        str(LOCUST), "-f", str(REPO / "loadtests" / "locustfile.py"), "--headless",
        "-u", "4", "-r", "4", "-t", "8s", "--host", gateway.base_url, "--only-summary",
        "--csv", str(tmp_path / "run"),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with (tmp_path / "run_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"chat", "chat stream (whole stream)", "completion", "Aggregated"}
    assert all(row["Type"] in ("POST", "") for row in rows.values())  # no METRIC rows
    requests = sum(int(rows[n]["Request Count"]) for n in rows if n != "Aggregated")
    assert int(rows["Aggregated"]["Request Count"]) == requests
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    # "Name three rivers in Europe." and the like: 4-8 words of 50 ms each, streamed.
    stream = float(rows["chat stream (whole stream)"]["Median Response Time"])
    assert stream >= 180  # the whole stream, not its headers (a few ms)
    with streams.open() as f:
        figures = {row["figure"]: row for row in csv.DictReader(f)}
    assert set(figures) == {"ttft_ms", "tokens_per_s"}
    assert float(figures["ttft_ms"]["p50"]) < stream
    assert 5 < float(figures["tokens_per_s"]["p50"]) < 40  # ~20 words/s from the fake
    assert "stream figure" in done.stdout + done.stderr
