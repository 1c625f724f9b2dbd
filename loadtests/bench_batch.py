"""Offline batches beside interactive traffic: batch throughput, and what chat users feel.

One Lockgate on the default model (16 sequences), driven over HTTP, in one run:

Baselines run before and after the batches and are averaged (the machine's speed drifts).

- ``saturated``: 16 closed-loop clients send the batch's own lines as plain requests
  (non-streamed): the engine's throughput when nothing else runs (completion tokens/s).
- ``idle``: 2 interactive users chat (streamed, one request after another, 0.5 s between
  an answer and the next question): TTFT.
- ``batch_alone``: the same lines as one batch (``/v1/batches``), nothing else running:
  what the interactive reserve and the batch runner cost.
- ``batch``: the lines as a batch again, while the 2 users chat: batch completion tokens/s
  (from ``usage`` over the batch's run), the users' own tokens/s over the same time (the
  engine's work for them, which the batch cannot have), and their TTFT.
- ``vllm-run-batch`` (anchor): vLLM's offline ``run_batch`` command on the same lines, on
  the CPU build `make test` installs; its tokens/s over its whole run, start-up included
  (it has no other mode), and over its run less the start-up it logs.

Every line asks for exactly ``--tokens`` tokens (end of generation banned). Ratios:
batch / saturated tokens/s (goal >= 0.90), alone and beside the users; the engine's whole
output beside the users (batch + users) / saturated, and the batch / what the users left;
interactive TTFT p99 during the batch / idle (goal <= 2). Table to stdout, JSON to ``--out``.

    python loadtests/bench_batch.py                 # 5,000 lines; over 2 hours here
    python loadtests/bench_batch.py --lines 1000 --skip-vllm   # about 30 minutes
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
from dataclasses import dataclass, field
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


@dataclass
class Users:
    """What the interactive users saw: TTFTs, and when each answer ended with how many
    completion tokens (the engine's work for them)."""

    ttfts: list[float] = field(default_factory=list)
    answers: list[tuple[float, int]] = field(default_factory=list)

    def tokens_between(self, start: float, end: float) -> int:
        return sum(n for at, n in self.answers if start <= at <= end)


async def chat_user(base: str, stop: asyncio.Event, seen_by: Users, u: int) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        i = 0
        while not stop.is_set():
            body = {**line_body(10_000 + 100 * u + i, 16), "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            began = time.perf_counter()
            seen, tokens = False, 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                async for raw in r.aiter_lines():  # read to the end: the user waits for it all
                    if not seen and raw.startswith("data: ") and '"content"' in raw:
                        seen_by.ttfts.append((time.perf_counter() - began) * 1000)
                        seen = True
                    elif raw.startswith("data: {") and '"usage":{' in raw:  # compact JSON
                        tokens = json.loads(raw[6:])["usage"]["completion_tokens"]
            seen_by.answers.append((time.perf_counter(), tokens))
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
    stop, seen_by = asyncio.Event(), Users()
    users = [asyncio.create_task(chat_user(base, stop, seen_by, u)) for u in range(2)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*users)
    return ttft_summary(seen_by.ttfts)


def ttft_summary(ttfts: list[float]) -> dict[str, float]:
    return {
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p99": harness.quantile(ttfts, 99),
        "requests": len(ttfts),
    }


async def batch_arm(base: str, source: Path, chatting: int) -> dict[str, Any]:
    """The lines as one batch while ``chatting`` users chat: the batch's tokens/s from the
    first finished line to the end, and the users' own tokens/s over the same time."""
    stop, seen_by = asyncio.Event(), Users()
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        with source.open("rb") as f:
            uploaded = (await http.post("/v1/files", files={"file": f},
                                        data={"purpose": "batch"})).json()  # fmt: skip
        created = (await http.post("/v1/batches", json={
            "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})).json()  # fmt: skip
        users = [asyncio.create_task(chat_user(base, stop, seen_by, u)) for u in range(chatting)]
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
        "interactive_tokens_per_s": seen_by.tokens_between(first[0], now) / seconds,
        "seconds": seconds,
        "status": b["status"],
        "request_counts": b["request_counts"],
        **(ttft_summary(seen_by.ttfts) if seen_by.ttfts else {}),
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
                print("batch alone...", flush=True)
                report["batch_alone"] = asyncio.run(batch_arm(base, source, 0))
                print("batch with 2 interactive users...", flush=True)
                report["batch"] = asyncio.run(batch_arm(base, source, 2))
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
    batch, full = report["batch"], report["saturated"]["tokens_per_s"]
    ratios = {
        "batch_alone_vs_saturated_tokens_per_s": report["batch_alone"]["tokens_per_s"] / full,
        "batch_vs_saturated_tokens_per_s": batch["tokens_per_s"] / full,
        # What the engine did while the users chatted (their answers and the batch's):
        # work-conserving when it is the saturated engine's.
        "engine_during_batch_vs_saturated_tokens_per_s": (
            batch["tokens_per_s"] + batch["interactive_tokens_per_s"]
        )
        / full,
        # The batch's share of what the users left.
        "batch_vs_saturated_less_users": batch["tokens_per_s"]
        / (full - batch["interactive_tokens_per_s"]),
        "ttft_p99_batch_vs_idle": batch["ttft_ms_p99"] / report["idle"]["ttft_ms_p99"],
        "ttft_p50_batch_vs_idle": batch["ttft_ms_p50"] / report["idle"]["ttft_ms_p50"],
    }
    if report.get("vllm_run_batch"):
        ratios["batch_vs_vllm_run_batch_tokens_per_s"] = (
            batch["tokens_per_s"] / report["vllm_run_batch"]["tokens_per_s"]
        )
    print(f"\n{'arm':<16} {'tok/s':>8} {'users tok/s':>12} {'TTFT p50':>10} {'TTFT p99':>10}")
    for name, row in report.items():
        if row and name != "baselines":
            p50 = f"{row['ttft_ms_p50']:.0f} ms" if "ttft_ms_p50" in row else "-"
            p99 = f"{row['ttft_ms_p99']:.0f} ms" if "ttft_ms_p99" in row else "-"
            rate = f"{row['tokens_per_s']:.1f}" if "tokens_per_s" in row else "-"
            users = row.get("interactive_tokens_per_s")
            users_rate = "-" if users is None else f"{users:.1f}"
            print(f"{name:<16} {rate:>8} {users_rate:>12} {p50:>10} {p99:>10}")
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
