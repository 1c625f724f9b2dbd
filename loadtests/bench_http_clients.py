"""httpx vs aiohttp vs Lockgate's own backends/http1.py as the upstream client:
client CPU per request and throughput.

The clients hit the same mock upstream (loadtests/mock_upstream.py, a separate
process) with the same closed-loop concurrency, pooled keep-alive connections
sized to the concurrency, and the same request: a non-streamed chat completion,
or a streamed one (64 chunks, no pacing) read line by line as the gateway does.
CPU is this process's own (user + system), so a slow mock cannot flatter either
client. Prints a table and writes JSON.

    python loadtests/bench_http_clients.py --concurrency 1,16,64 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
from harness import free_port, running

from backends.http1 import ConnectionPool

HERE = Path(__file__).resolve().parent
BODY = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_BODY = json.dumps(
    {"model": "mock", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()
HEADERS = {"Content-Type": "application/json"}


async def drive(call: Callable[[], Awaitable[None]], concurrency: int, total: int) -> float:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def with_httpx(url: str, stream: bool, concurrency: int, total: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def call() -> None:
            if stream:
                async with client.stream("POST", url, content=STREAM_BODY, headers=HEADERS) as r:
                    async for _ in r.aiter_lines():
                        pass
            else:
                r = await client.post(url, content=BODY, headers=HEADERS)
                json.loads(r.content)

        await call()
        return await drive(call, concurrency, total)


async def with_aiohttp(url: str, stream: bool, concurrency: int, total: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call() -> None:
            body = STREAM_BODY if stream else BODY
            async with session.post(url, data=body, headers=HEADERS) as r:
                if stream:
                    async for _ in r.content:
                        pass
                else:
                    json.loads(await r.read())

        await call()
        return await drive(call, concurrency, total)


async def with_http1(url: str, stream: bool, concurrency: int, total: int) -> float:
    base, path = url.split("/v1/", 1)
    pool = ConnectionPool(base, connect_timeout=5)

    async def call() -> None:
        response = await pool.send("POST", "/v1/" + path, STREAM_BODY if stream else BODY, HEADERS)
        try:
            if stream:  # whole reads split into lines, as RemoteBackend.lines does
                pending = b""
                while data := await response.readany():
                    *_, pending = (pending + data).split(b"\n")
            else:
                json.loads(await response.read())
        finally:
            response.release()

    try:
        await call()
        return await drive(call, concurrency, total)
    finally:
        await pool.close()


def measure(fn: Callable[..., Awaitable[float]], *args: object) -> tuple[float, float]:
    """(requests/s, client CPU ms per request)."""
    total = int(args[-1])  # type: ignore[call-overload]
    cpu0 = os.times()
    wall = asyncio.run(fn(*args))
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return total / wall, cpu / total * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_http_clients.json")
    args = parser.parse_args()
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    cmd = [
        sys.executable,
        str(HERE / "mock_upstream.py"),
        "--port",
        str(port),
        "--chunks",
        "64",
        "--gap-ms",
        "0",
    ]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(cmd, f"http://127.0.0.1:{port}/health", workdir / "mock.log"))
        for stream in (False, True):
            total = args.requests // (8 if stream else 1)
            for n in (int(x) for x in args.concurrency.split(",")):
                arms = (("httpx", with_httpx), ("aiohttp", with_aiohttp), ("http1", with_http1))
                for name, fn in arms:
                    rps, cpu_ms = measure(fn, url, stream, n, total)
                    rows.append(
                        {
                            "client": name,
                            "stream": stream,
                            "concurrency": n,
                            "rps": rps,
                            "cpu_ms_per_request": cpu_ms,
                        }
                    )
                    kind = "stream" if stream else "plain"
                    print(
                        f"  {kind:6s} c={n:<3d} {name:8s} {rps:8.0f} req/s "
                        f"{cpu_ms:7.3f} ms CPU/req",
                        flush=True,
                    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
