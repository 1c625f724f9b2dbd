"""Offline batches beside interactive traffic: batch throughput, and what chat users feel.

One Lockgate on the default model (16 sequences), driven over HTTP. Four arms, run in
``--rounds`` rounds with their order rotated each round: this machine's speed drifts by
tens of percent over minutes, and with rounds a multiple of 4 every arm holds every place
in the order equally often.

- ``saturated``: 16 closed-loop clients send the batch's own lines as plain requests
  (non-streamed): the engine's throughput when nothing else runs (completion tokens/s).
- ``idle``: 2 interactive users chat (streamed, one request after another, 0.5 s between
  an answer and the next question): TTFT.
- ``batch_alone``: the same lines as one batch (``/v1/batches``), nothing else running:
  what the interactive reserve and the batch runner cost.
- ``batch``: the lines as a batch again, while the 2 users chat: batch completion tokens/s
  (from ``usage`` over the batch's run), the users' own tokens/s over the same time (the
  engine's work for them, which the batch cannot have), and their TTFT.
- ``vllm-run-batch`` (anchor, once, after the rounds): vLLM's offline ``run_batch`` command
  on the same lines, on the CPU build `make test` installs; its tokens/s over its whole
  run, start-up included (it has no other mode).

The rotation is cyclic: ``batch`` follows ``batch_alone`` in 3 rounds of 4, so what one arm
leaves behind for the next is not balanced. The users' TTFTs beside the batch are all their
requests from upload to the batch's end (the upload and its validation take about a second;
the batch's last lines run beside them too), while its tokens/s is from its first finished
line to its end.

Every line asks for exactly ``--tokens`` tokens (end of generation banned). Ratios, paired
round by round (geometric mean, min, max): batch / saturated tokens/s (goal >= 0.90), alone
and beside the users; the users' share; the engine's whole output beside the users (batch +
users) / saturated and / the batch alone; the batch / what the users left. Interactive TTFT
p99 during the batch / idle (goal <= 2), paired and over all rounds' requests pooled.
Table to stdout, JSON to ``--out``, a PNG beside it.

    python loadtests/bench_batch.py                  # 4 rounds of 1,250 lines: over an hour
    python loadtests/bench_batch.py --lines 250 --skip-vllm   # about 15 minutes here
    python loadtests/bench_batch.py --again          # no run: the ratios again from the JSON
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


async def idle(base: str, seconds: float) -> dict[str, Any]:
    stop, seen_by = asyncio.Event(), Users()
    users = [asyncio.create_task(chat_user(base, stop, seen_by, u)) for u in range(2)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*users)
    return {**ttft_summary(seen_by.ttfts), "ttfts": seen_by.ttfts}


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
        "ttfts": seen_by.ttfts,
    }


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


ARMS = ("saturated", "batch_alone", "batch", "idle")


async def run_arm(arm: str, base: str, source: Path, args: argparse.Namespace) -> dict[str, Any]:
    if arm == "saturated":
        return await saturated(base, args.lines, args.tokens, 16)
    if arm == "idle":
        return await idle(base, args.idle_seconds)
    if arm == "batch_alone":
        return await batch_arm(base, source, 0)
    assert arm == "batch", arm
    return await batch_arm(base, source, 2)


def rounds(base: str, source: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    by_arm: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    for r in range(args.rounds):
        for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
            row = asyncio.run(run_arm(arm, base, source, args))
            by_arm[arm].append(row)
            rate = f"{row['tokens_per_s']:6.1f} tok/s" if "tokens_per_s" in row else " " * 12
            ttft = f"  TTFT p50 {row['ttft_ms_p50']:6.0f} ms" if "ttft_ms_p50" in row else ""
            print(f"  round {r + 1} {arm:12} {rate}{ttft}", flush=True)
    return by_arm


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds; TTFT over every round's requests together (each round's
    TTFTs are kept, so ``--again`` can draw the PNG again from the JSON)."""
    out: dict[str, Any] = {
        k: statistics.median(r[k] for r in rows)
        for k in ("tokens_per_s", "interactive_tokens_per_s")
        if k in rows[0]
    }
    ttfts = [t for r in rows for t in r.get("ttfts", ())]
    if ttfts:
        out |= ttft_summary(ttfts)
    out["rounds"] = rows
    return out


def paired(by_arm: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each ratio round by round (the arms of one round ran minutes apart): geometric mean,
    min and max over the rounds."""
    each: dict[str, list[float]] = {}
    arms = zip(by_arm["saturated"], by_arm["batch_alone"], by_arm["batch"], strict=True)
    for sat, alone, batch in arms:
        full, users = sat["tokens_per_s"], batch["interactive_tokens_per_s"]
        made = batch["tokens_per_s"] + users  # the engine's whole output beside the users
        for name, value in (
            ("batch_alone_vs_saturated", alone["tokens_per_s"] / full),
            ("batch_vs_saturated", batch["tokens_per_s"] / full),
            ("users_vs_saturated", users / full),
            # Work-conserving when it is the saturated engine's.
            ("engine_during_batch_vs_saturated", made / full),
            ("batch_vs_saturated_less_users", batch["tokens_per_s"] / (full - users)),
            # The engine beside the users against the batch alone: below 1 by at most what
            # protecting the users costs.
            ("engine_during_batch_vs_batch_alone", made / alone["tokens_per_s"]),
        ):
            each.setdefault(name, []).append(value)
    for quiet, busy in zip(by_arm["idle"], by_arm["batch"], strict=True):
        for q in ("p99", "p50"):
            key = f"ttft_ms_{q}"
            each.setdefault(f"ttft_{q}_batch_vs_idle", []).append(busy[key] / quiet[key])
    out: dict[str, float] = {}
    for name, values in each.items():
        out[f"{name}_paired"] = statistics.geometric_mean(values)
        out[f"{name}_min"], out[f"{name}_max"] = min(values), max(values)
    return out


def print_tables(report: dict[str, Any], ratios: dict[str, float]) -> None:
    print("\n| arm | batch tok/s | users' tok/s | chat TTFT p50 | p99 | requests |"
          "\n|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for name, row in report.items():
        if not row:
            continue
        cells = [
            f"{row['tokens_per_s']:.1f}" if "tokens_per_s" in row else "-",
            f"{row['interactive_tokens_per_s']:.1f}" if "interactive_tokens_per_s" in row else "-",
            f"{row['ttft_ms_p50']:.0f} ms" if "ttft_ms_p50" in row else "-",
            f"{row['ttft_ms_p99']:.0f} ms" if "ttft_ms_p99" in row else "-",
            str(row.get("requests", "-")),
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| ratio | geomean | min | max |\n|---|---:|---:|---:|")
    for key, value in ratios.items():
        if key.endswith("_paired"):
            name = key.removesuffix("_paired")
            low, high = ratios[f"{name}_min"], ratios[f"{name}_max"]
            print(f"| {name} | {value:.3f} | {low:.3f} | {high:.3f} |")
        elif not key.endswith(("_min", "_max")):
            print(f"| {key} | {value:.3f} | | |")


def plot(by_arm: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(len(by_arm["saturated"])))
    width = 0.27
    beside = [r["tokens_per_s"] for r in by_arm["batch"]]
    bars = (
        ("saturated (16 HTTP clients)", -width, [r["tokens_per_s"] for r in by_arm["saturated"]]),
        ("batch alone", 0.0, [r["tokens_per_s"] for r in by_arm["batch_alone"]]),
        ("batch beside 2 chat users", width, beside),
    )
    for label, shift, heights in bars:
        left.bar([x + shift for x in xs], heights, width, label=label)
    users = [r["interactive_tokens_per_s"] for r in by_arm["batch"]]
    left.bar([x + width for x in xs], users, width, bottom=beside, label="the users' answers")
    left.set_xticks(xs, [f"round {x + 1}" for x in xs])
    left.set_title("completion tokens/s")
    left.legend(fontsize=8, loc="lower right")
    for arm, label in (("idle", "2 users, engine idle"), ("batch", "2 users beside the batch")):
        ttfts = sorted(t for r in by_arm[arm] for t in r["ttfts"])
        right.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=label)
    right.set_xlabel("TTFT (ms)")
    right.set_title("chat TTFT: share of requests at or below")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def rounds_of(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {arm: report[arm]["rounds"] for arm in ARMS}


def ratios_of(report: dict[str, Any]) -> dict[str, float]:
    """The paired ratios from the arms' rounds, and TTFT over all rounds' requests pooled."""
    batch, quiet = report["batch"], report["idle"]
    ratios = paired(rounds_of(report))
    ratios["ttft_p99_pooled_batch_vs_idle"] = batch["ttft_ms_p99"] / quiet["ttft_ms_p99"]
    ratios["ttft_p50_pooled_batch_vs_idle"] = batch["ttft_ms_p50"] / quiet["ttft_ms_p50"]
    if report.get("vllm_run_batch"):
        ratios["batch_vs_vllm_run_batch_tokens_per_s"] = (
            batch["tokens_per_s"] / report["vllm_run_batch"]["tokens_per_s"]
        )
    return ratios


def write(out: Path, args: argparse.Namespace, report: dict[str, Any]) -> None:
    ratios = ratios_of(report)
    print_tables(report, ratios)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    out.write_text(
        json.dumps(
            {
                "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                "revision": harness.git_revision(),
                "settings": settings,
                "report": report,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    plot(rounds_of(report), out.with_suffix(".png"))


def again(out: Path) -> None:
    """The ratios of a stored run computed again, and its PNG drawn again when its rounds
    kept their TTFTs (runs before ``--again`` existed did not)."""
    stored = json.loads(out.read_text())
    stored["ratios"] = ratios_of(stored["report"])
    print_tables(stored["report"], stored["ratios"])
    out.write_text(json.dumps(stored, indent=2))
    if all("ttfts" in r for r in stored["report"]["idle"]["rounds"]):
        plot(rounds_of(stored["report"]), out.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--lines", type=int, default=1250, help="lines per arm and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per line")
    parser.add_argument("--reserve", type=int, default=2, help="batches.interactive_reserve")
    parser.add_argument("--background-prefill", type=int, default=64,
                        help="models[].background_prefill")  # fmt: skip
    parser.add_argument("--idle-seconds", type=float, default=30, help="per round")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_batch.json")
    parser.add_argument("--again", action="store_true",
                        help="no run: the ratios (and PNG) again from --out's rounds")  # fmt: skip
    args = parser.parse_args()
    if args.again:
        again(args.out)
        return
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.rounds % len(ARMS):
        print(f"--rounds {args.rounds}: not a multiple of {len(ARMS)}, so the arms do not hold"
              " every place in the order equally often", file=sys.stderr)  # fmt: skip
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
        by_arm = rounds(base, source, args)
        stack.close()  # the gateway stops before vLLM starts: one engine on the CPU at a time
        report: dict[str, Any] = {arm: summary(rows) for arm, rows in by_arm.items()}
        if not args.skip_vllm:
            print("vLLM run_batch...", flush=True)
            report["vllm_run_batch"] = vllm_run_batch(source, root)
    write(args.out, args, report)


if __name__ == "__main__":
    main()
