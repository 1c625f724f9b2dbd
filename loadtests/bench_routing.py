"""The router's four promises, each measured against the arm without it, in one run.

    python loadtests/bench_routing.py                  # all four; ~6 minutes
    python loadtests/bench_routing.py --only placement,spillover

- **failover**: two real llama-servers (one thread each), 8 clients in a closed loop
  for ``--failover-seconds`` (60); one server is SIGKILLed at a third of the run and
  started again (same port) at two thirds. Counted: requests that failed before
  streaming began (goal 0), started streams by how they ended (completed, error event,
  hung: goal 0 hung), and when the restarted server served again.
- **spillover**: a primary pool too small for the offered load (a paced mock streaming
  4 chunks 0.2 s apart, 2 slots: 2.5 requests/s) with and without a CPU twin in tier 1
  (a slower mock, 0.4 s apart, 8 slots: 5/s); Poisson arrivals at 5/s for 20 s. p99
  time to first token and the share spilled (goal: p99 with spillover <= 0.3x without).
- **placement**: two mocks of unequal speed (2 chunks 25 ms or 125 ms apart, 4 slots
  each), Poisson arrivals at 40/s for 15 s: least expected wait against round robin
  (requests alternate between two one-instance names). p99 TTFT (goal: >= 1.5x better).
- **affinity**: two llama-servers, 16 conversations each with its own ~1,500-token
  system prompt, 3 turns each, 4 clients: ``affinity: none`` against ``prefix``.
  Median TTFT (goal: >= 3x lower) and throughput (not lower).

Table, JSON and PNG in loadtests/results/bench_routing.*.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from harness import (
    default_model,
    find_llama_server,
    free_port,
    gateway_env,
    git_revision,
    quantile,
    spawned,
    wait_http,
)

HERE = Path(__file__).resolve().parent
MOCK = HERE / "mock_upstream.py"


@contextlib.contextmanager
def gateway(root: Path, models: str, routing: str) -> Iterator[str]:
    port = free_port()
    config = root / f"gateway-{port}.yaml"
    config.write_text(
        f"server: {{port: {port}, log_level: warning, access_log: off}}\n"
        f"auth: {{database: {root / f'db-{port}'}}}\n"
        f"routing: {routing}\nmodels:\n{models}"
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    with spawned(cmd, root / f"gateway-{port}.log", gateway_env(root)) as proc:
        wait_http(f"http://127.0.0.1:{port}/health/ready", proc)
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def mock(root: Path, *, hold_ms: float, chunks: int = 4, gap_ms: float = 0) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, str(MOCK), "--port", str(port), "--chunks", str(chunks),
           "--gap-ms", str(gap_ms), "--hold-ms", str(hold_ms)]  # fmt: skip
    with spawned(cmd, root / f"mock-{port}.log") as proc:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"


def llama_cmd(binary: str, port: int, slots: int = 4) -> list[str]:
    return [binary, "-m", str(default_model()), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(2048 * slots), "-t", "1", "--metrics", "--no-webui",
            "--alias", "gemma"]  # fmt: skip


# -- failover -----------------------------------------------------------------------


def failover(root: Path, binary: str, seconds: float) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    with contextlib.ExitStack() as stack:
        procs = []
        for port in ports:
            proc = stack.enter_context(spawned(llama_cmd(binary, port), root / f"ls-{port}.log"))
            wait_http(f"http://127.0.0.1:{port}/health", proc)
            procs.append(proc)
        models = "".join(
            f"  - {{name: chat, id: {name}, backend: llamacpp, base_url: 'http://127.0.0.1:{p}',"
            f" upstream_model: gemma, health_interval: 1}}\n"
            for name, p in zip(("a", "b"), ports, strict=True)
        )
        base = stack.enter_context(gateway(root, models, "{affinity: none, eject_after: 2}"))
        t0 = time.monotonic()
        events: list[dict[str, Any]] = []

        async def client(i: int) -> None:
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                n = 0
                while time.monotonic() - t0 < seconds:
                    n += 1
                    question = [{"role": "user", "content": f"Story {i}-{n}, please."}]
                    body = {"model": "chat", "max_tokens": 12, "stream": i % 2 == 0,
                            "messages": question}  # fmt: skip
                    at = time.monotonic() - t0
                    try:
                        async with asyncio.timeout(45):
                            events.append(await one(http, body, at))
                    except TimeoutError:
                        events.append({"at": at, "kind": "hung"})

        async def one(http: httpx.AsyncClient, body: dict[str, Any], at: float) -> dict[str, Any]:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                who = r.headers.get("x-lockgate-backend", "-")
                if r.status_code != 200:
                    await r.aread()
                    return {"at": at, "kind": "error_before_stream", "backend": who}
                if not body["stream"]:
                    await r.aread()
                    return {"at": at, "kind": "ok", "backend": who}
                text = "".join([line async for line in r.aiter_lines()])
                kind = "ok" if "[DONE]" in text else "error_event" if '"error"' in text else "cut"
                return {"at": at, "kind": kind, "backend": who}

        async def chaos() -> tuple[float, float]:
            await asyncio.sleep(seconds / 3)
            procs[1].send_signal(signal.SIGKILL)
            killed = time.monotonic() - t0
            await asyncio.sleep(seconds / 3)
            stack.enter_context(
                spawned(llama_cmd(binary, ports[1]), root / f"ls-{ports[1]}-again.log")
            )
            return killed, time.monotonic() - t0

        async def main() -> tuple[float, float]:
            task = asyncio.create_task(chaos())
            await asyncio.gather(*(client(i) for i in range(8)))
            return await task

        killed, restarted = asyncio.run(main())
    kinds = Counter(e["kind"] for e in events)
    back = [e["at"] for e in events if e.get("backend") == "b" and e["at"] > restarted]
    return {
        "requests": len(events),
        "outcomes": dict(kinds),
        "errors_before_streaming": kinds["error_before_stream"],
        "hung": kinds["hung"],
        "killed_at_s": round(killed, 1),
        "restarted_at_s": round(restarted, 1),
        "b_serves_again_after_s": round(min(back) - restarted, 1) if back else None,
        "served_by": dict(Counter(e.get("backend") for e in events)),
    }


# -- open-loop latency arms (spillover, placement) -----------------------------------------


async def open_loop(base: str, rate: float, seconds: float, models: list[str]) -> list[float]:
    """TTFT of requests sent at ``rate``/s (Poisson), cycling over ``models``."""
    rng, ttfts, tasks = random.Random(5), [], []
    async with httpx.AsyncClient(base_url=base, timeout=120,
                                 limits=httpx.Limits(max_connections=512)) as http:  # fmt: skip

        async def one(model: str) -> None:
            body = {"model": model, "stream": True, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
            sent = time.perf_counter()
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                first = None
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: ") and '"content"' in line:
                        first = time.perf_counter() - sent
                ttfts.append(first if first is not None else time.perf_counter() - sent)

        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(one(models[i % len(models)])))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return ttfts


def spillover(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with mock(root, hold_ms=0, chunks=4, gap_ms=200) as gpu, mock(root, hold_ms=0, chunks=4,
                                                                   gap_ms=400) as cpu:  # fmt: skip
        primary = f"  - {{name: chat, id: gpu, backend: openai, base_url: '{gpu}', upstream_model: m, concurrency: 2}}\n"  # noqa: E501
        twin = f"  - {{name: chat, id: cpu-twin, backend: openai, base_url: '{cpu}', upstream_model: m, concurrency: 8, tier: 1}}\n"  # noqa: E501
        for arm, models in (("primary_only", primary), ("spillover", primary + twin)):
            with gateway(root, models, "{affinity: none, spill_after: 0.5}") as base:
                ttfts = asyncio.run(open_loop(base, 5, 20, ["chat"]))
                metrics = httpx.get(f"{base}/metrics").text
            spilled = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("lockgate_spillovers_total{")
            )
            out[arm] = {
                "requests": len(ttfts),
                "ttft_p50_s": statistics.median(ttfts),
                "ttft_p99_s": quantile(ttfts, 99),
                "spilled_share": spilled / len(ttfts),
            }
    out["p99_ratio"] = out["spillover"]["ttft_p99_s"] / out["primary_only"]["ttft_p99_s"]
    return out


def placement(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with (
        mock(root, hold_ms=0, chunks=2, gap_ms=25) as fast,
        mock(root, hold_ms=0, chunks=2, gap_ms=125) as slow,
    ):

        def entry(name: str, id: str, url: str) -> str:
            return (f"  - {{name: {name}, id: {id}, backend: openai, base_url: '{url}',"
                    f" upstream_model: m, concurrency: 4}}\n")  # fmt: skip

        arms = {
            "round_robin": (
                entry("rr-fast", "fast", fast) + entry("rr-slow", "slow", slow),
                ["rr-fast", "rr-slow"],
            ),
            "least_wait": (entry("chat", "fast", fast) + entry("chat", "slow", slow), ["chat"]),
        }
        for arm, (models, names) in arms.items():
            with gateway(root, models, "{affinity: none}") as base:
                ttfts = asyncio.run(open_loop(base, 40, 15, names))
            out[arm] = {"requests": len(ttfts), "p50_s": statistics.median(ttfts),
                        "p99_s": quantile(ttfts, 99)}  # fmt: skip
    out["p99_ratio"] = out["round_robin"]["p99_s"] / out["least_wait"]["p99_s"]
    return out


# -- affinity -------------------------------------------------------------------------


def affinity(root: Path, binary: str) -> dict[str, Any]:
    words = ["lighthouse", "harbour", "keeper", "storm", "beacon", "rocks", "tide", "ship"]
    rng = random.Random(11)
    systems = [
        f"You are assistant {c}. " + " ".join(rng.choice(words) for _ in range(1100))
        for c in range(16)
    ]
    out: dict[str, Any] = {}
    for arm in ("none", "prefix"):
        # Fresh servers for each arm: no arm inherits the other's prompt caches.
        ports = [free_port(), free_port()]
        with contextlib.ExitStack() as stack:
            for port in ports:
                proc = stack.enter_context(
                    spawned(llama_cmd(binary, port, slots=4), root / f"aff-{port}.log")
                )
                wait_http(f"http://127.0.0.1:{port}/health", proc)
            models = "".join(
                f"  - {{name: chat, id: {n}, backend: llamacpp, base_url: 'http://127.0.0.1:{p}',"
                " upstream_model: gemma}\n"
                for n, p in zip(("a", "b"), ports, strict=True)
            )
            with gateway(root, models, f"{{affinity: {arm}}}") as base:
                started = time.monotonic()
                ttfts = asyncio.run(conversations(base, systems))
                seconds = time.monotonic() - started
            out[arm] = {
                "requests": len(ttfts),
                "ttft_p50_s": statistics.median(ttfts),
                "ttft_p90_s": quantile(ttfts, 90),
                "requests_per_s": len(ttfts) / seconds,
            }
    out["median_ratio"] = out["none"]["ttft_p50_s"] / out["prefix"]["ttft_p50_s"]
    out["throughput_ratio"] = out["prefix"]["requests_per_s"] / out["none"]["requests_per_s"]
    return out


async def conversations(base: str, systems: list[str]) -> list[float]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for s in systems:
        queue.put_nowait(s)
    ttfts: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:

        async def client() -> None:
            while not queue.empty():
                system = queue.get_nowait()
                messages = [{"role": "system", "content": system}]
                for turn in range(3):
                    messages.append({"role": "user", "content": f"Question {turn}?"})
                    body = {"model": "chat", "messages": messages, "max_tokens": 4,
                            "stream": True}  # fmt: skip
                    sent, first = time.perf_counter(), None
                    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if first is None and '"content"' in line:
                                first = time.perf_counter() - sent
                    ttfts.append(first if first is not None else time.perf_counter() - sent)
                    messages.append({"role": "assistant", "content": "ok"})

        await asyncio.gather(*(client() for _ in range(4)))
    return ttfts


# -- report ---------------------------------------------------------------------------


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (k, a, b, m)
        for k, a, b, m in (
            ("spillover", "primary_only", "spillover", "ttft_p99_s"),
            ("placement", "round_robin", "least_wait", "p99_s"),
            ("affinity", "none", "prefix", "ttft_p50_s"),
        )
        if k in report
    ]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (k, a, b, m) in zip(axes[0], panels, strict=True):
        values = [report[k][a][m] * 1000, report[k][b][m] * 1000]
        ax.bar([a, b], values, color=["tab:gray", "tab:blue"])
        ax.set_title(f"{k}: {m.replace('_s', '')} (ms)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", default="failover,spillover,placement,affinity")
    parser.add_argument("--failover-seconds", type=float, default=60)
    parser.add_argument("--llama-server", help="path to llama-server (default: make's build)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_routing.json")
    args = parser.parse_args()
    only = set(args.only.split(","))
    binary = find_llama_server(args.llama_server)
    if binary is None and only & {"failover", "affinity"}:
        raise SystemExit("llama-server not found: run `make llama-server`")
    root = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    report: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
    }
    if "placement" in only:
        report["placement"] = placement(root)
        print("placement", json.dumps(report["placement"]), flush=True)
    if "spillover" in only:
        report["spillover"] = spillover(root)
        print("spillover", json.dumps(report["spillover"]), flush=True)
    if "failover" in only:
        assert binary is not None
        report["failover"] = failover(root, binary, args.failover_seconds)
        print("failover", json.dumps(report["failover"]), flush=True)
    if "affinity" in only:
        assert binary is not None
        report["affinity"] = affinity(root, binary)
        print("affinity", json.dumps(report["affinity"]), flush=True)
    print("\n| benchmark | without | with | ratio | goal |\n|---|---:|---:|---:|---|")
    if "placement" in report:
        p = report["placement"]
        rr, lw = p["round_robin"]["p99_s"] * 1000, p["least_wait"]["p99_s"] * 1000
        print(f"| placement TTFT p99 (round robin / least wait) | {rr:.0f} ms | {lw:.0f} ms"
              f" | {p['p99_ratio']:.2f}x better | >= 1.5x |")  # fmt: skip
    if "spillover" in report:
        s = report["spillover"]
        print(f"| spillover TTFT p99 | {s['primary_only']['ttft_p99_s'] * 1000:.0f} ms"
              f" | {s['spillover']['ttft_p99_s'] * 1000:.0f} ms | {s['p99_ratio']:.2f}x"
              f" ({s['spillover']['spilled_share']:.0%} spilled) | <= 0.3x |")  # fmt: skip
    if "affinity" in report:
        a = report["affinity"]
        print(f"| affinity TTFT p50 | {a['none']['ttft_p50_s'] * 1000:.0f} ms"
              f" | {a['prefix']['ttft_p50_s'] * 1000:.0f} ms | {a['median_ratio']:.2f}x lower,"
              f" throughput x{a['throughput_ratio']:.2f} | >= 3x |")  # fmt: skip
    if "failover" in report:
        f = report["failover"]
        print(f"| failover: errors before streaming / hung | - | {f['errors_before_streaming']}"
              f" / {f['hung']} of {f['requests']} | - | 0 / 0 |")  # fmt: skip
        print(f"| failover: outcomes | | {f['outcomes']} | | |")
        print(f"| failover: b serves again after restart | | {f['b_serves_again_after_s']} s | | |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
