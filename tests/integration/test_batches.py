"""Offline batches on the real model, through the real OpenAI SDK, surviving ``kill -9``.

A gateway replica is killed with SIGKILL in the middle of a batch; another one (the same
one restarted on the same SQLite file, or a second replica on the same real Redis)
claims the batch once the lease lapses and finishes it. Every ``custom_id`` is then in
the output exactly once, and ``request_counts.total == completed + failed``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import NO_EOG, Server, lockgate, stop

pytestmark = pytest.mark.integration

LINES = 48
CONFIG = """
server:
  host: 127.0.0.1
  port: {{port}}
  log_level: warning
models:
  - name: gemma
    n_ctx: 256
    max_sequences: 4
batches:
  database: {root}/batches.db
  files_dir: {files}
  lease_seconds: 2
  poll_seconds: 0.2
  interactive_reserve: 1
auth:
  database: {root}/lockgate.db
{redis}
"""


def config(root: Path, redis_url: str | None = None, files: Path | None = None) -> str:
    redis = f"redis_url: {redis_url}" if redis_url else ""
    return CONFIG.format(root=root, files=files or root / "files", redis=redis)


def lines_run(server: Server) -> float:
    """Batch lines this replica finished (its /metrics)."""
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lockgate_batch_lines_total{")
    )


def lines(n: int) -> bytes:
    body = {"model": "gemma", "max_tokens": 6, "logit_bias": NO_EOG, "temperature": 0}
    return "\n".join(
        json.dumps(
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {**body, "messages": [{"role": "user", "content": f"Count to {i}."}]},
            }
        )
        for i in range(n)
    ).encode()


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(api_key="none", base_url=f"{server.base_url}/v1", max_retries=0)


def wait_for(client: openai.OpenAI, batch_id: str, check: Any, within: float = 240) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if check(batch):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id}: {batch.status}, {batch.request_counts}")


def kill(server: Server) -> None:
    os.killpg(os.getpgid(server.process.pid), signal.SIGKILL)
    server.process.wait()


def check_output(client: openai.OpenAI, batch: Any) -> None:
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert counts.total == counts.completed + counts.failed == LINES
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    errors = []
    if batch.error_file_id:
        text = client.files.content(batch.error_file_id).text
        errors = [json.loads(x) for x in text.splitlines()]
    ids = [x["custom_id"] for x in out + errors]
    assert sorted(ids) == sorted(f"q{i}" for i in range(LINES))  # each exactly once
    assert counts.completed == len(out) and counts.failed == len(errors)
    for o in out:
        body = o["response"]["body"]
        assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["message"]["content"]
    assert batch.usage.output_tokens == 6 * counts.completed


@pytest.fixture
def replicas() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        stop(s)


def test_a_batch_survives_its_replica_being_killed_and_restarted(
    tmp_path: Path, replicas: list[Server]
) -> None:
    replicas.append(lockgate(config(tmp_path), tmp_path))
    client = sdk(replicas[0])
    uploaded = client.files.create(file=("in.jsonl", lines(LINES)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 8)
    kill(replicas[0])
    replicas.append(lockgate(config(tmp_path), tmp_path))  # same files, same SQLite
    client = sdk(replicas[1])
    done = wait_for(client, batch.id, lambda b: b.status not in ("in_progress", "finalizing"))
    check_output(client, done)


def test_a_second_replica_on_redis_resumes_a_killed_ones_batch(
    tmp_path: Path, redis_url: str, replicas: list[Server]
) -> None:
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        replicas.append(lockgate(config(root, redis_url, tmp_path / "files"), root))
    first, second = sdk(replicas[0]), sdk(replicas[1])
    uploaded = first.files.create(file=("in.jsonl", lines(LINES)), purpose="batch")
    batch = first.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # Whichever replica claimed it dies; the other resumes once the lease lapses.
    wait_for(second, batch.id, lambda b: b.request_counts.completed >= 8)
    victim = 0 if lines_run(replicas[0]) > 0 else 1
    assert lines_run(replicas[victim]) > 0 and lines_run(replicas[1 - victim]) == 0
    kill(replicas[victim])
    survivor = sdk(replicas[1 - victim])
    done = wait_for(survivor, batch.id, lambda b: b.status not in ("in_progress", "finalizing"))
    check_output(survivor, done)


def test_the_cli_submits_watches_lists_and_downloads(
    tmp_path: Path, replicas: list[Server]
) -> None:
    replicas.append(lockgate(config(tmp_path), tmp_path))
    url = replicas[0].base_url
    source = tmp_path / "in.jsonl"
    source.write_bytes(lines(4))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "gateway", "batch", *args, "--url", url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)

    submitted = cli("submit", str(source), "--wait")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.splitlines()[0]
    assert "completed: 4 completed, 0 failed" in submitted.stdout
    assert "line" in submitted.stderr  # the progress bar
    listed = cli("list")
    assert batch_id in listed.stdout and "4/4 done" in listed.stdout
    answers = tmp_path / "out.jsonl"
    assert cli("download", batch_id, "-o", str(answers)).returncode == 0
    assert sorted(json.loads(x)["custom_id"] for x in answers.read_text().splitlines()) == [
        f"q{i}" for i in range(4)
    ]
    refused = cli("cancel", batch_id)
    assert refused.returncode == 1 and "completed cannot be cancelled" in refused.stderr
