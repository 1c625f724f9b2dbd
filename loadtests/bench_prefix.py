"""What the prefix cache buys: time to first token and throughput when prompts repeat.

Three servers on the default model, each with 16 sequences of ``N_CTX`` tokens, up at
once and sent requests one at a time (two cores): Lockgate with ``prefix_cache: off``,
Lockgate with the cache (``shared``, the default), and llama-server at ``--parallel 16``
with its defaults (``cache_prompt`` on, a host-memory prompt cache). Every chat streams,
at temperature 0.7, with the end of generation banned so that each answer has exactly
its ``max_tokens``. Three workloads, each with its own fresh text per arm and round, so
every arm starts cold:

- ``shared``: 16 users share one ~1,000-token system prompt; each asks its own short
  question, ``--turns`` times in a row (closed loop). Round 1 is the cold start: 16 first
  prefills of a prompt no one has computed.
- ``multi_turn``: 8 conversations x 6 turns; each turn re-sends the whole history (the
  answers included) with a new question.
- ``distinct``: 16 users whose prompts share nothing (a unique opening each): the cache
  cannot help, and must not cost.

Reported per arm: TTFT p50/p99 (and round 1's p50 for ``shared``), aggregate completion
tokens/s, and the KV cells cached prefixes hold (Lockgate: ``lockgate_prefix_cache_cells``
after the workload; llama-server: the tokens its slots keep, from ``/slots``). Ratios:
cache off / on for TTFT, on / off and on / llama-server for tokens/s. Median of
``--rounds``, the arms' order rotated each round; on / off tokens/s is also paired round by
round (geometric mean, min, max). ``--control`` adds a second cache-off server, whose ratio
to the first is what the comparison's noise is. Tables to stdout, JSON to ``--out``, a PNG
next to it.

    python loadtests/bench_prefix.py               # about 20 minutes on two idle cores
    python loadtests/bench_prefix.py --quick --out /tmp/p.json
    python loadtests/bench_prefix.py --workloads distinct --rounds 6 --turns 1 --control \
        --skip-llama-server --out loadtests/results/bench_prefix_distinct.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
import httpx

HERE = Path(__file__).resolve().parent
CHAT = "/v1/chat/completions"
N_CTX, SEQUENCES = 1536, 16
WORDS = [
    "lamp", "keeper", "tower", "stair", "window", "harbour", "ship", "storm", "rope", "bell",
    "fog", "light", "stone", "island", "map", "ticket", "guide", "shell", "gull", "anchor",
    "tide", "wave", "boat", "chart", "signal",
]  # fmt: skip


@dataclass
class Arm:
    name: str
    base: str
    kind: str  # lockgate | llama-server


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    first_round_ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0


def system_prompt(tag: str, sentences: int) -> str:
    """Deterministic prose, unique to ``tag`` from its first token on."""
    rng = random.Random(tag)
    rules = [
        f"Rule {i}: the {rng.choice(WORDS)} by the {rng.choice(WORDS)} is shown to visitors "
        f"before the {rng.choice(WORDS)} and after the {rng.choice(WORDS)}."
        for i in range(sentences)
    ]
    return f"Session {tag}. You are the guide of a lighthouse museum. " + " ".join(rules)


def body(messages: list[dict[str, str]], max_tokens: int, seed: int) -> dict[str, Any]:
    return {
        "model": "gemma", "messages": messages, "max_tokens": max_tokens, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0.7, "seed": seed,
        "top_k": 40, "top_p": 1.0, "min_p": 0.0, "logit_bias": harness.NO_EOG,
    }  # fmt: skip


async def chat(
    http: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int, seed: int
) -> tuple[float, str, dict[str, Any]]:
    """TTFT (to the first content), the answer, and the usage of one streamed chat."""
    sent = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with http.stream("POST", CHAT, json=body(messages, max_tokens, seed)) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    if first is None:
        raise RuntimeError("a stream without content")
    return first - sent, "".join(text), usage


def client(arm: Arm, connections: int) -> httpx.AsyncClient:
    # No keep-alive: llama-server may close an idle connection just as a client reuses it.
    limits = httpx.Limits(max_connections=connections + 2, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=arm.base, timeout=600, limits=limits)


def record(result: Result, ttft: float, usage: dict[str, Any], max_tokens: int) -> None:
    result.ttft.append(ttft)
    result.tokens += usage.get("completion_tokens", max_tokens)
    result.prompt_tokens.append(usage.get("prompt_tokens", 0))
    details = usage.get("prompt_tokens_details") or {}
    result.cached_tokens += details.get("cached_tokens") or 0


Client = Callable[[httpx.AsyncClient, int, Result], Awaitable[None]]


async def timed(arm: Arm, clients: int, one: Client) -> Result:
    """``clients`` copies of ``one`` at once (its index each), timed together."""
    result = Result()
    async with client(arm, clients) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one(http, i, result) for i in range(clients)))
        result.seconds = time.perf_counter() - started
    return result


async def shared(arm: Arm, tag: str, users: int, turns: int) -> Result:
    system = system_prompt(tag, 44)

    async def user(http: httpx.AsyncClient, u: int, result: Result) -> None:
        for t in range(turns):
            thing = WORDS[(u + t) % len(WORDS)]
            question = f"Visitor {u} asks question {t}: where is the {thing}?"
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": question}]  # fmt: skip
            ttft, _, usage = await chat(http, messages, 32, seed=u * 100 + t)
            record(result, ttft, usage, 32)
            if t == 0:
                result.first_round_ttft.append(ttft)

    return await timed(arm, users, user)


async def multi_turn(arm: Arm, tag: str, conversations: int, turns: int) -> Result:
    async def conversation(http: httpx.AsyncClient, c: int, result: Result) -> None:
        messages = [{"role": "system", "content": system_prompt(f"{tag}-{c}", 12)}]
        for t in range(turns):
            messages.append({"role": "user", "content": f"Turn {t}: tell me about the "
                             f"{WORDS[(c * 3 + t) % len(WORDS)]}."})  # fmt: skip
            ttft, answer, usage = await chat(http, messages, 48, seed=c * 100 + t)
            record(result, ttft, usage, 48)
            messages.append({"role": "assistant", "content": answer})

    return await timed(arm, conversations, conversation)


async def distinct(arm: Arm, tag: str, users: int, turns: int) -> Result:
    async def user(http: httpx.AsyncClient, u: int, result: Result) -> None:
        for t in range(turns):
            messages = [{"role": "system", "content": system_prompt(f"{tag}-{u}-{t}", 16)},
                        {"role": "user", "content": "Tell me a story."}]  # fmt: skip
            ttft, _, usage = await chat(http, messages, 64, seed=u * 100 + t)
            record(result, ttft, usage, 64)

    return await timed(arm, users, user)


async def warm(arm: Arm) -> None:
    async with client(arm, 1) as http:
        await chat(http, [{"role": "user", "content": "Hi."}], 4, 1)


def cached_cells(arm: Arm, result: Result, users: int, answer: int) -> tuple[int | None, str]:
    """KV cells holding cached prompts once the workload is over, and how it is known."""
    if arm.kind == "lockgate":
        for line in httpx.get(arm.base + "/metrics", timeout=10).text.splitlines():
            if line.startswith("lockgate_prefix_cache_cells{"):
                return int(float(line.rsplit(" ", 1)[1])), "lockgate_prefix_cache_cells"
        return None, "cache off"
    # llama-server says nothing of it (/slots has no token counts): each slot used keeps
    # its last prompt and answer, so the last requests' lengths, one per slot, estimate it.
    slots = min(users, SEQUENCES)
    last = result.prompt_tokens[-slots:]
    return sum(last) + slots * answer, "estimate: each used slot keeps its last prompt"


def summary(results: list[Result], cells: tuple[int | None, str]) -> dict[str, Any]:
    def p(values: list[float], q: int) -> float:
        return harness.quantile(values, q) * 1000

    rows = [
        {
            "ttft_ms_p50": p(r.ttft, 50), "ttft_ms_p99": p(r.ttft, 99),
            "first_round_ttft_ms_p50": p(r.first_round_ttft, 50) if r.first_round_ttft else None,
            "tokens_per_s": r.tokens / r.seconds, "requests": len(r.ttft),
            "prompt_tokens_mean": statistics.mean(r.prompt_tokens),
            "cached_share": r.cached_tokens / max(1, sum(r.prompt_tokens)),
        }
        for r in results
    ]  # fmt: skip
    out: dict[str, Any] = {
        k: None if rows[0][k] is None else statistics.median(float(x[k] or 0) for x in rows)
        for k in rows[0]
    }
    out["cached_cells"], out["cached_cells_source"] = cells
    out["rounds"] = rows
    return out


WORKLOADS = {"shared": shared, "multi_turn": multi_turn, "distinct": distinct}
ANSWER_TOKENS = {"shared": 32, "multi_turn": 48, "distinct": 64}


def run(arms: list[Arm], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    shape = {"shared": (16, args.turns), "multi_turn": (8, 6), "distinct": (16, args.turns)}
    report: dict[str, dict[str, Any]] = {}
    for workload in args.workloads.split(","):
        per_arm: dict[str, list[Result]] = {a.name: [] for a in arms}
        cells: dict[str, tuple[int | None, str]] = {}
        for r in range(args.rounds):
            # Rotated each round: with rounds a multiple of the arms, every arm runs in every
            # place of the order equally often (an arm run after another has read up to 8%
            # slower). Each arm still follows the same one.
            for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
                tag = f"{workload}-{arm.name}-{r}-{os.getpid()}"
                result = asyncio.run(WORKLOADS[workload](arm, tag, *shape[workload]))
                per_arm[arm.name].append(result)
                users = shape[workload][0]
                cells[arm.name] = cached_cells(arm, result, users, ANSWER_TOKENS[workload])
                print(f"  {workload} round {r + 1} {arm.name:16} TTFT p50 "
                      f"{statistics.median(result.ttft) * 1000:7.1f} ms  "
                      f"{result.tokens / result.seconds:6.1f} tok/s", flush=True)  # fmt: skip
        report[workload] = {a.name: summary(per_arm[a.name], cells[a.name]) for a in arms}
    return report


def ratios(report: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for workload, by_arm in report.items():
        off, on, ls = by_arm["lockgate-off"], by_arm["lockgate-on"], by_arm.get("llama-server")
        row = {
            "ttft_p50_off_over_on": off["ttft_ms_p50"] / on["ttft_ms_p50"],
            "tokens_per_s_on_over_off": on["tokens_per_s"] / off["tokens_per_s"],
        }
        if on["first_round_ttft_ms_p50"] is not None:
            row["first_round_ttft_off_over_on"] = (
                off["first_round_ttft_ms_p50"] / on["first_round_ttft_ms_p50"]
            )
        if ls is not None:
            row["ttft_p50_llama_server_over_on"] = ls["ttft_ms_p50"] / on["ttft_ms_p50"]
            row["tokens_per_s_on_over_llama_server"] = on["tokens_per_s"] / ls["tokens_per_s"]
            if ls["first_round_ttft_ms_p50"] is not None:
                row["first_round_ttft_llama_server_over_on"] = (
                    ls["first_round_ttft_ms_p50"] / on["first_round_ttft_ms_p50"]
                )
        row |= paired(by_arm)
        out[workload] = row
    return out


def paired(by_arm: dict[str, dict[str, Any]]) -> dict[str, float]:
    """tokens/s of cache on (and of the control) over cache off, round by round: their
    geometric mean, which the order's effect cancels out of when the rounds rotate evenly,
    and the per-round spread."""
    off = [r["tokens_per_s"] for r in by_arm["lockgate-off"]["rounds"]]
    out: dict[str, float] = {}
    for name, key in (("lockgate-on", "on"), ("lockgate-off-control", "control")):
        if name not in by_arm:
            continue
        each = [r["tokens_per_s"] / o for r, o in zip(by_arm[name]["rounds"], off, strict=True)]
        out[f"tokens_per_s_{key}_over_off_paired"] = statistics.geometric_mean(each)
        out[f"tokens_per_s_{key}_over_off_min"] = min(each)
        out[f"tokens_per_s_{key}_over_off_max"] = max(each)
    return out


def print_tables(report: dict[str, dict[str, Any]], rows: dict[str, dict[str, float]]) -> None:
    print("\n| workload | arm | TTFT p50 | TTFT p99 | round 1 TTFT p50 | tokens/s "
          "| prompt tokens | cached share | KV cells kept after |"
          "\n|---|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for workload, by_arm in report.items():
        for arm, s in by_arm.items():
            first = s["first_round_ttft_ms_p50"]
            print(f"| {workload} | {arm} | {s['ttft_ms_p50']:.0f} ms | {s['ttft_ms_p99']:.0f} ms "
                  f"| {'-' if first is None else f'{first:.0f} ms'} | {s['tokens_per_s']:.1f} "
                  f"| {s['prompt_tokens_mean']:.0f} | {s['cached_share']:.0%} "
                  f"| {cells_cell(s)} |")  # fmt: skip
    print("\n| workload | ratio | value |\n|---|---|---:|")
    for workload, row in rows.items():
        for name, value in row.items():
            print(f"| {workload} | {name} | {value:.2f} |")


def cells_cell(s: dict[str, Any]) -> str:
    if s["cached_cells"] is None:
        return "-"
    estimated = s["cached_cells_source"].startswith("estimate")
    return f"{s['cached_cells']}" + (" (est.)" if estimated else "")


def plot(report: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(report)
    arms = list(report[workloads[0]])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs = [w + i * width for w in range(len(workloads))]
        axes[0].bar(xs, [report[w][arm]["ttft_ms_p50"] for w in workloads], width, label=arm)
        axes[1].bar(xs, [report[w][arm]["tokens_per_s"] for w in workloads], width, label=arm)
    for ax, title in zip(axes, ("TTFT p50 (ms, lower is better)", "tokens/s (higher is better)"),
                         strict=True):  # fmt: skip
        ax.set_xticks([w + width * (len(arms) - 1) / 2 for w in range(len(workloads))], workloads)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@contextlib.contextmanager
def servers(args: argparse.Namespace, root: Path) -> Any:
    cores = os.cpu_count() or 2
    arms: list[Arm] = []
    with contextlib.ExitStack() as stack:
        lockgates = [("lockgate-off", "off"), ("lockgate-on", "shared")]
        if args.control:  # a second cache-off server: the noise floor of the comparison
            lockgates.append(("lockgate-off-control", "off"))
        for name, mode in lockgates:
            port = harness.free_port()
            config = root / f"{name}.yaml"
            config.write_text(
                f"server: {{port: {port}, log_level: warning, access_log: 'off'}}\nmodels:\n"
                f"  - {{name: gemma, n_ctx: {N_CTX}, max_sequences: {SEQUENCES}, "
                f"threads: {cores}, prefix_cache: {mode}}}\n"
            )
            cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
            proc = stack.enter_context(
                harness.spawned(cmd, root / f"{name}.log", harness.gateway_env(root / name))
            )
            harness.wait_http(f"http://127.0.0.1:{port}/health/ready", proc)
            arms.append(Arm(name, f"http://127.0.0.1:{port}", "lockgate"))
        if not args.skip_llama_server:
            binary = harness.find_llama_server(args.llama_server)
            if binary is None:
                raise SystemExit("no llama-server: run `make llama-server` or --skip-llama-server")
            port = harness.free_port()
            cmd = [binary, "-m", str(harness.default_model()), "--host", "127.0.0.1",
                   "--port", str(port), "-np", str(SEQUENCES), "-c", str(N_CTX * SEQUENCES),
                   "-t", str(cores), "-tb", str(cores), "--no-webui"]  # fmt: skip
            proc = stack.enter_context(harness.spawned(cmd, root / "llama-server.log"))
            harness.wait_http(f"http://127.0.0.1:{port}/health", proc)
            arms.append(Arm("llama-server", f"http://127.0.0.1:{port}", "llama-server"))
        yield arms


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workloads", default="shared,multi_turn,distinct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--turns", type=int, default=4, help="shared/distinct: per user")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 turns")
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument(
        "--control", action="store_true", help="a second cache-off Lockgate: the noise floor"
    )
    parser.add_argument("--llama-server", help="its binary (default: as `make llama-server`)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_prefix.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.turns = 1, 2
    root = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    with servers(args, root) as arms:
        for arm in arms:  # warm: connections, tokenizer, the engines' first step
            asyncio.run(warm(arm))
        report = run(arms, args)
    rows = ratios(report)
    print_tables(report, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": harness.git_revision(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {
            "n_ctx": N_CTX, "sequences": SEQUENCES},
        "workloads": report, "ratios": rows,
    }, indent=2, default=str) + "\n")  # fmt: skip
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} (logs in {root})")


if __name__ == "__main__":
    main()
