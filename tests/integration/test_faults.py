"""Clients that hang up at random points leak nothing, on every kind of backend.

Runs ``loadtests/bench_faults.py`` with 1,000 requests (the benchmark's default is 10,000):
a ``lockgate serve`` in front of the embedded engine, a real llama-server and the fake
backend, few slots each so that requests also queue; 16 clients, each request leaving at a
seeded random point (while queued, before the first token, after some streamed chunks, or
never; about 60 requests on each real engine, as they share 2 cores). Afterwards every slot
is free, every queue empty, no engine runs a sequence, and what was billed covers what the
clients received.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, llama_server_binary

pytestmark = pytest.mark.integration


def test_random_hangups_leak_no_slot_and_bill_what_was_received(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    cmd = [sys.executable, str(REPO / "loadtests" / "bench_faults.py"), "--requests", "1000"]
    cmd += ["--llama-server", str(llama_server_binary()), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["left_busy"] == {}
    finished = sum(report["finished_by_status"].values())
    assert 800 < finished <= 1000  # some left before their body was even sent
    assert report["completion_tokens_billed"] >= report["content_chunks_received"]
    assert report["finished_by_status"].get("499", 0) > 250  # they really did hang up
    assert set(report["finished_by_status"]) <= {"200", "499"}
