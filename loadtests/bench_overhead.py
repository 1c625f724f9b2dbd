"""What a gateway costs a client: Lockgate vs LiteLLM proxy vs nginx vs direct, one run.

Arms, all against one loadtests/mock_upstream.py, served at once and loaded one at a time:

    direct          the mock itself (the floor)
    nginx           Debian's nginx, proxy_pass with a keep-alive upstream, buffering off
    lockgate        no tenants (auth off), model ``mock`` on the openai backend
    lockgate-auth   one tenant and key, all limits set too high to refuse; in-process counters
    lockgate-redis  the same with ``redis_url``: store and counters in a private redis-server
    lockgate-prev   lockgate-auth's setup on another revision (``--baseline REV``, a git
                    worktree): the cost of a change, measured side by side
    lockgate-ollama     lockgate-auth's server through its Ollama door (``/api/chat``)
    lockgate-responses  ... and through its Responses door (``/v1/responses``)
    litellm         LiteLLM proxy, one worker, callbacks off, master key, no database

A non-streamed point is a closed loop of ``c`` aiohttp clients for 1 s (discarded)
and then ``--seconds``; a streamed point is ``--stream-concurrency`` clients each
reading one stream (discarded) and then ``--stream-waves`` streams of 64 chunks 20 ms
apart; the clients start spread over one chunk gap, as independent users would,
rather than all in the same millisecond. Every round visits the arms in a random
order; reported are medians over rounds, and added latency as the median of
per-round differences to ``direct``.
CPU time and RSS are the proxy's whole process tree, read from /proc.

Tools come from ``bash loadtests/overhead_setup.sh``; an arm whose tool is missing
is skipped and named in the JSON.

    python loadtests/bench_overhead.py --rounds 5 --seconds 4 --concurrency 1,4,16,64,256
    python loadtests/bench_overhead.py --baseline origin/main~1   # + lockgate-prev
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import uvloop
from door_requests import OLLAMA_CHAT, RESPONSES, body, content_chunk
from harness import (
    LIMITS,
    Pinning,
    baseline_tree,
    busy_seconds,
    cpu_seconds,
    free_port,
    gateway_env,
    git_revision,
    mock_model,
    new_key,
    quantile,
    spawned,
    tree_cpu,
    tree_rss_mb,
    wait_http,
    wait_redis,
    write_lockgate_config,
)
from overhead_report import (
    ARMS,
    BUNCHED_MS,
    CEILING,
    STREAM_CHUNKS,
    STREAM_GAP_MS,
    Sample,
    StreamSample,
    plot,
    print_tables,
    rps_within_budget,
    summarise,
    summarise_streams,
    targets,
)

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lockgate"
LITELLM_VENV = CACHE / "litellm-venv"
CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
WARMUP_S = 1.0


@dataclass(frozen=True)
class Arm:
    url: str
    stream_url: str
    headers: dict[str, str]
    proxy_pid: int | None  # root of the proxy's process tree; None for direct
    extra_pids: dict[str, int] = field(default_factory=dict)  # e.g. redis-server
    door: str = "openai"  # the wire format of url and stream_url


async def drive(
    session: aiohttp.ClientSession, arm: Arm, concurrency: int, seconds: float
) -> list[float]:
    """Latencies (s) of ``concurrency`` closed-loop clients; any non-200 ends the run."""
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    data = body(stream=False, max_tokens=16, door=arm.door)

    async def client() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            async with session.post(arm.url, data=data, headers=arm.headers) as response:
                await response.read()
            if response.status != 200:
                raise SystemExit(f"{arm.url}: status {response.status} at c={concurrency}")
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies


async def measure(arm: Arm, concurrency: int, seconds: float) -> Sample:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await drive(session, arm, concurrency, WARMUP_S)
        proxy_before = tree_cpu(arm.proxy_pid) if arm.proxy_pid else 0.0
        extra_before = {k: cpu_seconds(p) for k, p in arm.extra_pids.items()}
        busy, client_before = busy_seconds(), cpu_seconds(os.getpid())
        started = time.perf_counter()
        latencies = await drive(session, arm, concurrency, seconds)
        wall = time.perf_counter() - started
        proxy = tree_cpu(arm.proxy_pid) - proxy_before if arm.proxy_pid else None
        extra = {k: cpu_seconds(p) - extra_before[k] for k, p in arm.extra_pids.items()}
        client = cpu_seconds(os.getpid()) - client_before
        other = busy_seconds() - busy - client - (proxy or 0.0) - sum(extra.values())
    n = len(latencies)
    return Sample(
        rps=n / wall,
        p50_ms=quantile(latencies, 50) * 1000,
        p99_ms=quantile(latencies, 99) * 1000,
        proxy_cpu_ms=None if proxy is None else proxy * 1000 / n,
        extra_cpu_ms={k: s * 1000 / n for k, s in extra.items()},
        rss_mb=tree_rss_mb(arm.proxy_pid) if arm.proxy_pid else None,
        # The mock's CPU counts as "other" here: it is the same for every arm.
        other_cpus=max(other, 0.0) / wall,
    )


async def one_stream(session: aiohttp.ClientSession, arm: Arm) -> tuple[float, list[float]]:
    """Start time and the arrival time of every content chunk of one stream."""
    data = body(stream=True, max_tokens=STREAM_CHUNKS, door=arm.door)
    arrivals: list[float] = []
    started = time.perf_counter()
    async with session.post(arm.stream_url, data=data, headers=arm.headers) as response:
        if response.status != 200:
            raise SystemExit(f"{arm.url}: status {response.status} on a stream")
        async for raw in response.content:  # one line at a time
            line = raw.strip()
            if line and content_chunk(line, arm.door):
                arrivals.append(time.perf_counter())
    return started, arrivals


async def measure_stream(arm: Arm, concurrency: int, waves: int) -> StreamSample:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one_stream(session, arm) for _ in range(concurrency)))

        async def client(i: int) -> list[tuple[float, list[float]]]:
            await asyncio.sleep(i * STREAM_GAP_MS / 1000 / concurrency)
            return [await one_stream(session, arm) for _ in range(waves)]

        before = tree_cpu(arm.proxy_pid) if arm.proxy_pid else 0.0
        results = await asyncio.gather(*(client(i) for i in range(concurrency)))
        cpu = tree_cpu(arm.proxy_pid) - before if arm.proxy_pid else None
    streams = [s for per_client in results for s in per_client]
    ttfts = [(a[0] - t0) * 1000 for t0, a in streams if a]
    gaps = [(b - a) * 1000 for _, t in streams for a, b in itertools.pairwise(t)]
    return StreamSample(
        ttft_p50_ms=quantile(ttfts, 50),
        ttft_p99_ms=quantile(ttfts, 99),
        gap_p50_ms=quantile(gaps, 50),
        gap_p99_ms=quantile(gaps, 99),
        bunched=sum(g < BUNCHED_MS for g in gaps) / len(gaps),
        chunks_sent=STREAM_CHUNKS * len(streams),
        chunks_received=sum(len(t) for _, t in streams),
        proxy_cpu_ms=None if cpu is None else cpu * 1000 / len(streams),
    )


# --- the arms' servers -------------------------------------------------------------------


def nginx_conf(workdir: Path, *, ports: tuple[int, int], mocks: tuple[int, int]) -> Path:
    """One worker (as Lockgate and LiteLLM get one process), keep-alive to the mocks, no
    buffering so SSE chunks pass as they come; every path in ``workdir``.

    nginx cannot route on the body's model name, so each mock gets its own port."""
    temp = " ".join(f"{kind}_temp_path {workdir}/{kind};" for kind in _NGINX_TEMPS)
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temp}
{_nginx_server(ports[0], mocks[0], "fast")}
{_nginx_server(ports[1], mocks[1], "stream")}
}}
"""
    )
    return conf


def _nginx_server(port: int, mock_port: int, name: str) -> str:
    return f"""
    upstream {name} {{ server 127.0.0.1:{mock_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /nginx-health {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}"""


_NGINX_TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def lockgate_config(
    workdir: Path,
    *,
    mocks: tuple[int, int],
    concurrency: int,
    key_hash: str | None,
    redis: str | None,
) -> tuple[Path, int]:
    models = [
        mock_model(name, mock, concurrency=concurrency)
        for name, mock in zip(("mock", "mock-stream"), mocks, strict=True)
    ]
    return write_lockgate_config(workdir, models=models, key_hash=key_hash, redis=redis)


def litellm_config(workdir: Path, *, mocks: tuple[int, int], master_key: str) -> Path:
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": "openai/mock",
                    "api_base": f"http://127.0.0.1:{mock}/v1",
                    "api_key": "sk-mock",
                },
            }
            for name, mock in zip(("mock", "mock-stream"), mocks, strict=True)
        ],
        "litellm_settings": {
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
            "telemetry": False,
        },
        "general_settings": {"master_key": master_key},
    }
    path = workdir / "litellm.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass
class Servers:
    arms: dict[str, Arm]
    skipped: dict[str, str]
    versions: dict[str, str]


def start_all(
    stack: contextlib.ExitStack,
    root: Path,
    pin: Pinning,
    *,
    concurrency: int,
    only: list[str],
    baseline: str | None,
) -> Servers:
    """Every server once, kept up across rounds (as in bench_auth: the idle arms sleep)."""
    # Two mocks: Lockgate streams from its upstream even for a non-streamed request, so
    # the non-streamed mock sends its chunks without a gap (as in bench_auth).
    mocks, redis_port = (free_port(), free_port()), free_port()
    mock_pids: dict[str, int] = {}
    for mock_port, gap in zip(mocks, (0.0, STREAM_GAP_MS), strict=True):
        mock = [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock_port)]
        mock += ["--chunks", str(STREAM_CHUNKS), "--gap-ms", str(gap)]
        log = root / f"mock-{mock_port}.log"
        mock_proc = stack.enter_context(spawned([*pin.helpers, *mock], log))
        wait_http(f"http://127.0.0.1:{mock_port}/health", mock_proc)
        mock_pids[f"mock-{'stream' if gap else 'fast'}"] = mock_proc.pid
    servers = Servers({}, {}, {})
    servers.arms["direct"] = Arm(*_urls(*mocks), JSON, None, mock_pids)
    ready: list[tuple[str, subprocess.Popen[bytes]]] = []

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if "nginx" in only and nginx:
        workdir, ports = root / "nginx", (free_port(), free_port())
        workdir.mkdir()
        conf = nginx_conf(workdir, ports=ports, mocks=mocks)
        cmd = [*pin.gateway, nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"]
        proc = stack.enter_context(spawned(cmd, workdir / "nginx.out"))
        servers.arms["nginx"] = Arm(*_urls(*ports), JSON, proc.pid, mock_pids)
        ready.append((f"http://127.0.0.1:{ports[0]}/nginx-health", proc))
        servers.versions["nginx"] = _version([nginx, "-v"])
    elif "nginx" in only:
        servers.skipped["nginx"] = "nginx not installed: run loadtests/overhead_setup.sh"

    lockgates = {
        "lockgate": False,
        "lockgate-auth": False,
        "lockgate-redis": True,
        "lockgate-prev": False,
    }
    if baseline is None and "lockgate-prev" in only:
        servers.skipped["lockgate-prev"] = "no --baseline revision given"
        only = [a for a in only if a != "lockgate-prev"]
    if "lockgate-redis" in only:
        redis = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]
        redis_pid = stack.enter_context(spawned([*pin.helpers, *redis], root / "redis.log")).pid
        wait_redis(redis_port)
    key, key_hash = new_key()
    for name, with_redis in lockgates.items():
        if name not in only:
            continue
        workdir = root / name
        workdir.mkdir()
        secured = name != "lockgate"
        config, port = lockgate_config(
            workdir,
            mocks=mocks,
            concurrency=concurrency,
            key_hash=key_hash if secured else None,
            redis=f"redis://127.0.0.1:{redis_port}/0" if with_redis else None,
        )
        cmd = [*pin.gateway, sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        env = gateway_env(workdir)
        cwd = None
        if name == "lockgate-prev":  # the baseline's code, imported ahead of the editable install
            assert baseline is not None
            cwd = baseline_tree(stack, root, baseline)
            env["PYTHONPATH"] = str(cwd)
            servers.versions["lockgate-prev"] = _version(["git", "-C", str(cwd), "log", "-1",
                                                          "--format=%h %s"])  # fmt: skip
        proc = stack.enter_context(spawned(cmd, workdir / "lockgate.log", env, cwd=cwd))
        headers = JSON | ({"Authorization": f"Bearer {key}"} if secured else {})
        extra = mock_pids | ({"redis": redis_pid} if with_redis else {})
        servers.arms[name] = Arm(*_urls(port, port), headers, proc.pid, extra)
        ready.append((f"http://127.0.0.1:{port}/health/ready", proc))
        if name == "lockgate-auth":  # the same server through its other front doors
            for door, path in (("ollama", OLLAMA_CHAT), ("responses", RESPONSES)):
                if f"lockgate-{door}" in only:
                    url = f"http://127.0.0.1:{port}{path}"
                    servers.arms[f"lockgate-{door}"] = Arm(url, url, headers, proc.pid, extra, door)

    litellm = LITELLM_VENV / "bin" / "litellm"
    if "litellm" in only and litellm.exists():
        workdir, port = root / "litellm", free_port()
        workdir.mkdir()
        master = "sk-" + secrets.token_urlsafe(24)
        config = litellm_config(workdir, mocks=mocks, master_key=master)
        cmd = [*pin.gateway, str(litellm), "--config", str(config), "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--num_workers", "1"]
        # No cost-map download, no telemetry, no colour codes in the log.
        env = gateway_env(workdir) | {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "NO_COLOR": "1",
            "HOME": str(workdir),
        }
        proc = stack.enter_context(spawned(cmd, workdir / "litellm.log", env))
        headers = JSON | {"Authorization": f"Bearer {master}"}
        servers.arms["litellm"] = Arm(*_urls(port, port), headers, proc.pid, mock_pids)
        ready.append((f"http://127.0.0.1:{port}/health/liveliness", proc))
        servers.versions["litellm"] = _version([str(litellm), "--version"], env=env)
    elif "litellm" in only:
        servers.skipped["litellm"] = f"{litellm} missing: run loadtests/overhead_setup.sh"

    for url, proc in ready:  # started together, so their imports overlap
        wait_http(url, proc, timeout=300)
    return servers


def _urls(port: int, stream_port: int) -> tuple[str, str]:
    return f"http://127.0.0.1:{port}{CHAT}", f"http://127.0.0.1:{stream_port}{CHAT}"


def _version(cmd: list[str], env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=120)
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else "?"


# --- rounds and summary --------------------------------------------------------------------


def run_rounds(
    arms: dict[str, Arm], levels: list[int], args: argparse.Namespace
) -> tuple[dict[tuple[str, int], list[Sample]], dict[str, list[StreamSample]]]:
    samples: dict[tuple[str, int], list[Sample]] = {}
    streams: dict[str, list[StreamSample]] = {}
    for round_no in range(1, args.rounds + 1):
        for n in levels:
            for name in random.sample(list(arms), len(arms)):
                point = uvloop.run(measure(arms[name], n, args.seconds))
                samples.setdefault((name, n), []).append(point)
                print(
                    f"  round {round_no} c={n:<3d} {name:14s} {point.rps:7.0f} req/s  "
                    f"p50 {point.p50_ms:7.2f} ms  p99 {point.p99_ms:7.2f} ms  "
                    f"proxy CPU {point.proxy_cpu_ms or 0:.3f} ms/req",
                    flush=True,
                )
        if args.stream_concurrency <= 0:
            continue
        for name in random.sample(list(arms), len(arms)):
            s = uvloop.run(measure_stream(arms[name], args.stream_concurrency, args.stream_waves))
            streams.setdefault(name, []).append(s)
            print(
                f"  round {round_no} stream {name:14s} TTFT p50 {s.ttft_p50_ms:6.2f} ms  "
                f"gap p99 {s.gap_p99_ms:6.2f} ms  chunks {s.chunks_received}/{s.chunks_sent}",
                flush=True,
            )
    return samples, streams


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", default="1,4,16,64,256")
    parser.add_argument("--stream-concurrency", type=int, default=8, help="0: no stream run")
    parser.add_argument("--stream-waves", type=int, default=3, help="streams per client")
    parser.add_argument("--arms", default=",".join(ARMS), help="a subset; direct always runs")
    parser.add_argument("--baseline", help="a git revision to run as the lockgate-prev arm")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_overhead.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    only = ["direct", *(a for a in args.arms.split(",") if a in ARMS and a != "direct")]
    pin, revision = Pinning.detect(), git_revision()  # before start: the code they import
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
        concurrency = max([*levels, args.stream_concurrency]) * 2
        servers = start_all(
            stack, root, pin, concurrency=concurrency, only=only, baseline=args.baseline
        )
        for name, why in servers.skipped.items():
            print(f"skipping {name}: {why}")
        if pin.client_cpus is not None:
            os.sched_setaffinity(0, pin.client_cpus)
        samples, streams = run_rounds(servers.arms, levels, args)
    rows, stream_rows = summarise(samples), summarise_streams(streams)
    print_tables(rows, stream_rows)
    pinned = pin.describe()
    pinning = {
        "proxies": pinned["gateway"],
        "mock, redis": pinned["mock, redis"],
        "client": pinned["client"],
    }
    report = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": revision,
        "rounds": args.rounds,
        "seconds_per_point": args.seconds,
        "warmup_seconds": WARMUP_S,
        "concurrency": levels,
        "stream": {
            "chunks": STREAM_CHUNKS,
            "gap_ms": STREAM_GAP_MS,
            "concurrency": args.stream_concurrency,
            "streams_per_client": args.stream_waves,
        },
        "arms": list(servers.arms),
        "baseline": args.baseline,
        "skipped": servers.skipped,
        "versions": servers.versions,
        "request": json.loads(body(stream=False, max_tokens=16)),
        "limits": LIMITS,
        "pinning": pinning,
        "cpus": os.cpu_count(),
        "ceiling_fraction": CEILING,
        "rps_p99_under_10ms": rps_within_budget(rows),
        "targets": targets(rows, stream_rows),
        "rows": rows,
        "stream_rows": stream_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(rows, png, f"gateway overhead vs a mock upstream ({revision}, {args.rounds} rounds)")
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
