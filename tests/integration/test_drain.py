"""SIGTERM on a real `lockgate serve` with the real model: streams finish, nothing is lost.

Two slots: a long stream and a short one run, a third request waits for a slot. On
SIGTERM readiness turns 503 at once and a new request is refused with 503; the short
stream and the queued request are answered whole; the long stream, still open at
``drain_seconds``, ends with an error event the OpenAI SDK raises; the process exits 0.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import NO_EOG, Server, lockgate, stop

pytestmark = pytest.mark.integration

DRAIN_SECONDS = 10  # as in CONFIG
CONFIG = """
server: {{host: 127.0.0.1, port: {port}, log_level: warning, drain_seconds: 10}}
models:
  - {{name: gemma, n_ctx: 2048, max_sequences: 2}}
"""
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60)


def stream_text(server: Server, max_tokens: int, started: list[str]) -> str:
    """A streamed chat read to its end; ``started`` gets an entry at its first chunk."""
    text = []
    with client(server) as c:
        chunks = c.chat.completions.create(
            model="gemma", messages=STORY, max_tokens=max_tokens, stream=True,  # type: ignore[arg-type]
            logit_bias=NO_EOG,
        )  # fmt: skip
        for chunk in chunks:
            if not text:
                started.append("yes")
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
    return "".join(text)


def queue_depth(server: Server) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{server.base_url}/metrics").text.splitlines()
        if line.startswith("lockgate_queue_depth{")
    )


def wait_for(check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_sigterm_drains_streams_answers_the_queue_and_exits(tmp_path: Path) -> None:
    server = lockgate(CONFIG, tmp_path)
    try:
        long_started: list[str] = []
        short_started: list[str] = []
        with ThreadPoolExecutor(3) as pool:
            long: Future[str] = pool.submit(stream_text, server, 1900, long_started)
            wait_for(lambda: long_started)
            short = pool.submit(stream_text, server, 48, short_started)
            wait_for(lambda: short_started)
            with client(server) as c:  # both slots busy: this one waits
                queued = pool.submit(
                    c.chat.completions.create,
                    model="gemma", messages=STORY, max_tokens=8,  # type: ignore[arg-type]
                )  # fmt: skip
                wait_for(lambda: queue_depth(server) == 1)

                os.killpg(os.getpgid(server.process.pid), signal.SIGTERM)
                signalled = time.monotonic()
                ready = httpx.get(f"{server.base_url}/health/ready")
                assert ready.status_code == 503 and ready.json()["status"] == "draining"
                with pytest.raises(openai.APIStatusError) as refused:
                    c.chat.completions.create(model="gemma", messages=STORY, max_tokens=4)  # type: ignore[arg-type]
                assert refused.value.status_code == 503
                assert refused.value.response.headers["retry-after"] == "1"

                assert short.result(timeout=60)  # finished whole, during the drain
                answer = queued.result(timeout=60)
                assert answer.choices[0].finish_reason == "length"
            with pytest.raises(openai.APIError, match="shutting down"):
                long.result(timeout=60)
            took = time.monotonic() - signalled
        assert server.process.wait(timeout=30) == 0
        assert DRAIN_SECONDS - 1 < took < DRAIN_SECONDS + 10
        log = server.log.read_text()
        assert "Traceback" not in log
    finally:
        stop(server)
