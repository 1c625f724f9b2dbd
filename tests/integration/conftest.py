"""A real ``lockgate serve`` subprocess on a free port, with the real model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  log_level: warning
models:
  - name: gemma
    n_ctx: 512
    max_sequences: 8
    max_n: 2
  - name: gemma-single
    n_ctx: 512
    max_sequences: 1
    queue_timeout: 1.0
"""


@dataclass(frozen=True)
class Server:
    base_url: str
    process: subprocess.Popen[bytes]
    log: Path

    def metric(self, name: str, model: str = "gemma") -> float:
        text = httpx.get(f"{self.base_url}/metrics").text
        prefix = f'{name}{{instance="embedded",model="{model}"}} '
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        raise AssertionError(f"{prefix!r} not in /metrics")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    config = root / "config.yaml"
    config.write_text(CONFIG.format(port=port))
    log = root / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(f"{base_url}/health/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server not ready: {log.read_text()}")
        time.sleep(0.2)
    yield Server(base_url, process, log)
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
