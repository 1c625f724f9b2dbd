"""Offline batches beside interactive traffic: batch throughput, and what chat users feel.

One Lockgate on the default model (16 sequences), driven over HTTP, in one run:

Baselines run before and after the batch and are averaged (the machine's speed drifts).

- ``saturated``: 16 closed-loop clients send the batch's own lines as plain requests
  (non-streamed): the engine's throughput when nothing else runs (completion tokens/s).
- ``idle``: 2 interactive users chat (streamed, one request after another): TTFT.
- ``batch``: the same lines as one batch (``/v1/batches``) while the 2 users chat:
  batch completion tokens/s (from ``usage`` over the batch's run) and their TTFT.
- ``vllm-run-batch`` (anchor): vLLM's offline ``run_batch`` command on the same lines, on
  the CPU build `make test` installs; its tokens/s over its whole run, start-up included
  (it has no other mode), and over its run less the start-up it logs.

Every line asks for exactly ``--tokens`` tokens (end of generation banned). Ratios:
batch / saturated tokens/s (goal >= 0.90) and interactive TTFT p99 during the batch /
idle (goal <= 2). Table to stdout, JSON to ``--out``.

    python loadtests/bench_batch.py                 # 5,000 lines; about 25 minutes
    python loadtests/bench_batch.py --lines 1000 --skip-vllm
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOPICS = ["harbours", "bells", "maps", "tides", "ropes", "storms", "lamps", "gulls"]


def line_body(i: int, tokens: int) -> dict[str, Any]:
    question = f"Write one sentence about {TOPICS[i % len(TOPICS)]} and the number {i}."
    return {
        "model": "gemma",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": tokens,
        "temperature": 0.7,
        "logit_bias": harness.NO_EOG,
    }


def batch_file(path: Path, n: int, tokens: int) -> None:
    with path.open("w") as out:
        for i in range(n):
            line = {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": line_body(i, tokens)}  # fmt: skip
            out.write(json.dumps(line) + "\n")


async def chat_user(base: str, stop: asyncio.Event, ttfts: list[float], u: int) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        i = 0
        while not stop.is_set():
            body = {**line_body(10_000 + 100 * u + i, 16), "stream": True}
            began = time.perf_counter()
            seen = False
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                async for raw in r.aiter_lines():  # read to the end: the user waits for it all
                    if not seen and raw.startswith("data: ") and '"content"' in raw:
                        ttfts.append((time.perf_counter() - began) * 1000)
                        seen = True
            i += 1
            await asyncio.sleep(0.5)  # a user reads the answer


async def saturated(base: str, n: int, tokens: int, clients: int) -> dict[str, float]:
    queue = list(range(n))
    produced = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal produced
        while queue:
            i = queue.pop()
            r = await http.post("/v1/chat/completions", json=line_body(i, tokens))
            produced += r.json()["usage"]["completion_tokens"]

    began = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - began
    return {"tokens_per_s": produced / seconds, "seconds": seconds, "lines": n}


async def idle(base: str, seconds: float) -> dict[str, float]:
    stop, ttfts = asyncio.Event(), list[float]()
    users = [asyncio.create_task(chat_user(base, stop, ttfts, u)) for u in range(2)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*users)
    return ttft_summary(ttfts)


def ttft_summary(ttfts: list[float]) -> dict[str, float]:
    return {
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p99": harness.quantile(ttfts, 99),
        "requests": len(ttfts),
    }


async def batch_arm(base: str, source: Path) -> dict[str, Any]:
    stop, ttfts = asyncio.Event(), list[float]()
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        with source.open("rb") as f:
            uploaded = (await http.post("/v1/files", files={"file": f},
                                        data={"purpose": "batch"})).json()  # fmt: skip
        created = (await http.post("/v1/batches", json={
            "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})).json()  # fmt: skip
        users = [asyncio.create_task(chat_user(base, stop, ttfts, u)) for u in range(2)]
        first: tuple[float, int] | None = None
        while True:
            b = (await http.get(f"/v1/batches/{created['id']}")).json()
            now, out = time.perf_counter(), b["usage"]["output_tokens"]
            if first is None and out > 0:
                first = (now, out)  # from the first finished lines: validation excluded
            if b["status"] in ("completed", "failed", "cancelled", "expired"):
                break
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*users)
    assert first is not None, b
    seconds = now - first[0]
    return {
        "tokens_per_s": (out - first[1]) / seconds,
        "seconds": seconds,
        "status": b["status"],
        "request_counts": b["request_counts"],
        **ttft_summary(ttfts),
    }


def mean_of(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: (a[k] + b[k]) / 2 for k in a}


def vllm_run_batch(source: Path, root: Path) -> dict[str, Any] | None:
    out = root / "vllm-out.jsonl"
    log = root / "vllm.log"
    began = time.perf_counter()
    with log.open("wb") as sink:
        done = subprocess.run(
            ["bash", str(REPO / "quantization" / "vllm.sh"), "run-batch", str(source), str(out)],
            stdout=sink, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    seconds = time.perf_counter() - began
    if done.returncode != 0 or not out.exists():
        print(f"vLLM run_batch failed; see {log}", file=sys.stderr)
        return None
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    tokens = sum(
        r["response"]["body"]["usage"]["completion_tokens"] for r in rows if r.get("response")
    )
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "lines": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per line")
    parser.add_argument("--reserve", type=int, default=2, help="batches.interactive_reserve")
    parser.add_argument("--background-prefill", type=int, default=64,
                        help="models[].background_prefill")  # fmt: skip
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_batch.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        source = root / "in.jsonl"
        batch_file(source, args.lines, args.tokens)
        port = harness.free_port()
        config = root / "lockgate.yaml"
        config.write_text(
            f"server: {{port: {port}, log_level: warning, access_log: 'off'}}\nmodels:\n"
            f"  - {{name: gemma, n_ctx: 512, max_sequences: 16, threads: {cores},"
            f" background_prefill: {args.background_prefill}}}\n"
            f"batches: {{interactive_reserve: {args.reserve}, files_dir: {root}/files,"
            f" database: {root}/batches.db}}\n"
        )
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        proc = stack.enter_context(
            harness.spawned(cmd, root / "lockgate.log", harness.gateway_env(root / "state"))
        )
        base = f"http://127.0.0.1:{port}"
        harness.wait_http(f"{base}/health/ready", proc)
        report: dict[str, Any] = {}
        # The baselines run before and after the batch, and their mean is what the batch
        # is compared with: this machine's speed drifts by tens of percent over minutes.
        before, after = {}, {}
        for when, into in (("before", before), ("after", after)):
            if when == "after":
                print("batch with 2 interactive users...", flush=True)
                report["batch"] = asyncio.run(batch_arm(base, source))
            print(f"idle interactive TTFT ({when})...", flush=True)
            into["idle"] = asyncio.run(idle(base, args.idle_seconds))
            print(f"saturated engine ({when})...", flush=True)
            into["saturated"] = asyncio.run(saturated(base, args.lines, args.tokens, 16))
        report["idle"] = mean_of(before["idle"], after["idle"])
        report["saturated"] = mean_of(before["saturated"], after["saturated"])
        report["baselines"] = {"before": before, "after": after}
        stack.close()  # the gateway stops before vLLM starts: one engine on the CPU at a time
        if not args.skip_vllm:
            print("vLLM run_batch...", flush=True)
            report["vllm_run_batch"] = vllm_run_batch(source, root)
    ratios = {
        "batch_vs_saturated_tokens_per_s": report["batch"]["tokens_per_s"]
        / report["saturated"]["tokens_per_s"],
        "ttft_p99_batch_vs_idle": report["batch"]["ttft_ms_p99"] / report["idle"]["ttft_ms_p99"],
        "ttft_p50_batch_vs_idle": report["batch"]["ttft_ms_p50"] / report["idle"]["ttft_ms_p50"],
    }
    if report.get("vllm_run_batch"):
        ratios["batch_vs_vllm_run_batch_tokens_per_s"] = (
            report["batch"]["tokens_per_s"] / report["vllm_run_batch"]["tokens_per_s"]
        )
    print(f"\n{'arm':<16} {'tok/s':>8} {'TTFT p50':>10} {'TTFT p99':>10}")
    for name, row in report.items():
        if row and name != "baselines":
            p50 = f"{row['ttft_ms_p50']:.0f} ms" if "ttft_ms_p50" in row else "-"
            p99 = f"{row['ttft_ms_p99']:.0f} ms" if "ttft_ms_p99" in row else "-"
            rate = f"{row['tokens_per_s']:.1f}" if "tokens_per_s" in row else "-"
            print(f"{name:<16} {rate:>8} {p50:>10} {p99:>10}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                "revision": harness.git_revision(),
                "settings": {k: str(v) for k, v in vars(args).items()},
                "report": report,
                "ratios": ratios,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
