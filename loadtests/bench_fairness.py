"""Fair scheduling against FCFS on the embedded engine: a light tenant's wait, shares, throughput.

Two arms, one ``lockgate serve`` each, identical but for ``scheduler.policy``:

    fcfs  arrival order, as llama-server and Ollama queue (the baseline)
    fair  priority class, then the tenant with the least weighted service (VTC)

Both serve Gemma 3 270M with a few engine slots, so most requests queue in the
scheduler. Every request is a streamed chat whose end-of-generation tokens are
banned, so it runs exactly ``max_tokens``. Two scenarios, each run on both arms:

    share  bulk-a: 12 closed-loop clients of long generations; bulk-b: 4 such
           clients (both backlogged, weight 1); light: an open-loop Poisson stream
           of short chats (``--rate``, 0.5 a second: occasional, well under an equal
           share; at 1 a second its prompts alone make it ~21% of the tokens the
           queue charges, and it starts queueing behind itself). Reported: light's
           TTFT, each tenant's share of the tokens generated, Jain's index of bulk-a
           and bulk-b, total tokens/s.
    flood  nightly (priority batch): 16 closed-loop long generations; chat
           (interactive): the Poisson stream. Reported: chat's TTFT.

A phase starts the clients and discards a warm-up: at least ``--warmup`` seconds,
and until a short chat has come through the queue. Under FCFS the first one waits
behind the whole initial backlog (~12 s here); a window opened sooner would see no
short chat served, miss their prefill work and read FCFS's throughput too high.
Then it measures ``--duration`` seconds. Tokens are
counted per streamed chunk by its arrival time, so a long generation counts the
part that falls inside the window; TTFT (send to first content chunk) is taken for
the short chats sent inside the window, which are waited for after it ends while
the backlog keeps running. Then every client leaves, and the next phase starts once
the gateway's slots and queue are empty. Each round runs both scenarios on both
arms, in the opposite arm order to the round before, so drift falls on both; the
random streams (arrival gaps, generation lengths) repeat across arms.

Nothing is pinned by default: the engine runs two threads, as in every other engine
benchmark here. ``--pin`` puts each gateway on CPU 0 (taskset) with one engine thread
and this client on CPU 1; that halves the engine's throughput (~58 against ~108
tokens/s with 4 slots), and with it the samples per minute.

    python loadtests/bench_fairness.py              # ~11 minutes
    python loadtests/bench_fairness.py --quick      # ~3 minutes, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fairness_report import (
    POLICIES,
    SCENARIOS,
    Phase,
    Scenario,
    percentiles,
    print_tables,
    summarise,
    targets,
)
from harness import (
    NO_EOG,
    busy_seconds,
    cpu_seconds,
    free_port,
    gateway_env,
    git_revision,
    spawned,
    wait_http,
)

from gateway.tenancy.keys import key_hash, new_key

HERE = Path(__file__).resolve().parent
MODEL = "gemma"
N_CTX = 512  # per sequence: a ~23-token prompt and up to 128 generated tokens
CHAT = "/v1/chat/completions"
# Priority class per tenant; every weight is 1.
TENANTS = {
    "bulk-a": "interactive",
    "bulk-b": "interactive",
    "light": "interactive",
    "nightly": "batch",
    "chat": "interactive",
}
IDLE_TIMEOUT = 120.0
_REQUEST_NUMBERS = itertools.count()


@dataclass(frozen=True)
class Load:
    long_tokens: tuple[int, int]  # max_tokens of a long generation: uniform in this range
    short_tokens: int
    rate: float  # short chats per second
    warmup: float
    duration: float
    tail_limit: float  # longest wait after the window for its short chats


@dataclass(frozen=True)
class Pinning:
    gateway: list[str]  # command prefix
    threads: int  # engine threads
    client_cpus: set[int] | None

    @classmethod
    def choose(cls, *, pin: bool) -> Pinning:
        if pin and shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2:
            return cls(["taskset", "-c", "0"], 1, {1})
        return cls([], min(2, os.cpu_count() or 1), None)

    def describe(self) -> dict[str, str | int]:
        return {
            "gateway": " ".join(self.gateway) or "unpinned",
            "engine_threads": self.threads,
            "client": f"sched_setaffinity {sorted(self.client_cpus)}" if self.client_cpus else "no",
        }


@dataclass
class Call:
    """One streamed chat as the client saw it."""

    tenant: str
    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each content chunk
    queued_ms: float | None = None  # the gateway's x-lockgate-queued-ms: waiting for a slot
    prompt_tokens: int | None = None  # from the usage chunk
    completion_tokens: int | None = None
    status: int | None = None  # None: cut at the end of the phase; 0: transport error

    def tokens_between(self, start: float, end: float) -> float:
        if not self.chunks:
            return 0.0
        # Chunks are tokens but for a rare multi-byte character held back; usage is exact.
        per_chunk = (self.completion_tokens or len(self.chunks)) / len(self.chunks)
        return per_chunk * sum(start <= t < end for t in self.chunks)


def chat_body(tokens: int, topic: str) -> dict[str, Any]:
    # A unique opening keeps every prompt distinct; the length stays the same.
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Request {next(_REQUEST_NUMBERS):06d}. {topic}"}],
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 1.0,
        "logit_bias": NO_EOG,
    }


async def send(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any], call: Call
) -> None:
    try:
        async with client.stream("POST", CHAT, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                call.status = response.status_code
                return
            call.queued_ms = float(response.headers.get("x-lockgate-queued-ms", "nan"))
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:  # in-band, after the 200
                    call.status = int(event["error"].get("code") or 500)
                    return
                if usage := event.get("usage"):
                    call.prompt_tokens = usage["prompt_tokens"]
                    call.completion_tokens = usage["completion_tokens"]
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    call.chunks.append(time.perf_counter())
            call.status = 200
    except httpx.TransportError:
        call.status = 0


@dataclass(frozen=True)
class Gateway:
    base_url: str
    pid: int


@dataclass(frozen=True)
class PhaseRun:
    calls: list[Call]
    window: tuple[float, float]  # perf_counter
    warmup: float  # seconds discarded before the window
    cpu: dict[str, float]  # CPU seconds in the window: gateway, client, other


async def run_phase(
    gateway: Gateway,
    keys: dict[str, str],
    scenario: Scenario,
    load: Load,
    *,
    seed: str,
) -> PhaseRun:
    """Load one gateway with one scenario: warm-up, window, then the window's short chats."""
    headers = {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}
    calls: list[Call] = []
    # No pool limit: a client waiting for a connection would add to its TTFT.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(None, connect=10)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        short: list[tuple[Call, asyncio.Task[None]]] = []
        # Set when a short chat has come through the queue: under FCFS it waited behind
        # the whole initial backlog, so from then on requests flow at the steady rate.
        through = asyncio.Event()

        async def backlogged(tenant: str, index: int) -> None:
            lengths = random.Random(f"{seed}/{tenant}/{index}")
            while True:
                call = Call(tenant, time.perf_counter())
                calls.append(call)
                body = chat_body(lengths.randint(*load.long_tokens), "Write a long story.")
                await send(http, headers[tenant], body, call)
                if call.status != 200:
                    await asyncio.sleep(1)  # an error must not become a hot loop

        async def arrivals() -> None:
            gaps = random.Random(f"{seed}/{scenario.interactive}")
            due = start
            while True:
                due += gaps.expovariate(load.rate)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                call = Call(scenario.interactive, time.perf_counter())
                calls.append(call)
                body = chat_body(load.short_tokens, "Say hello.")
                short.append((call, asyncio.create_task(short_chat(call, body))))

        async def short_chat(call: Call, body: dict[str, Any]) -> None:
            await send(http, headers[call.tenant], body, call)
            through.set()

        # In a random (but repeated) order: under FCFS the first in line are served first.
        order = [(b.tenant, i) for b in scenario.backlogged for i in range(b.clients)]
        random.Random(seed).shuffle(order)
        clients = [asyncio.create_task(backlogged(tenant, i)) for tenant, i in order]
        stream = asyncio.create_task(arrivals())
        await asyncio.sleep(load.warmup)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(through.wait(), load.tail_limit)
        opened = time.perf_counter()
        window = (opened, opened + load.duration)
        cpu_before = {"gateway": cpu_seconds(gateway.pid), "client": cpu_seconds(os.getpid())}
        busy_before = busy_seconds()
        await asyncio.sleep(load.duration)
        stream.cancel()
        cpu = {
            "gateway": cpu_seconds(gateway.pid) - cpu_before["gateway"],
            "client": cpu_seconds(os.getpid()) - cpu_before["client"],
        }
        cpu["other"] = max(0.0, busy_seconds() - busy_before - cpu["gateway"] - cpu["client"])
        # Under FCFS a short chat sent late in the window may wait much longer than
        # the window lasts: keep the backlog running until the window's chats are done.
        pending = [task for call, task in short if call.sent >= window[0] and not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=load.tail_limit)
        everything = [*clients, stream, *(task for _, task in short)]
        for task in everything:
            task.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
    return PhaseRun(calls, window, window[0] - start, cpu)


def summarise_phase(run: PhaseRun, scenario: Scenario, policy: str, round_no: int) -> Phase:
    start, end = run.window
    seconds = end - start
    tenants = [b.tenant for b in scenario.backlogged] + [scenario.interactive]
    tokens = {
        t: sum(c.tokens_between(start, end) for c in run.calls if c.tenant == t) for t in tenants
    }
    prompts = {
        t: sum(
            c.prompt_tokens or 0
            for c in run.calls
            if c.tenant == t and c.chunks and start <= c.chunks[0] < end
        )
        for t in tenants
    }
    in_window = [c for c in run.calls if c.tenant == scenario.interactive and start <= c.sent < end]
    errors = Counter(f"{c.tenant} {c.status}" for c in run.calls if c.status not in (None, 200))
    return Phase(
        scenario=scenario.name,
        policy=policy,
        round=round_no,
        ttft_ms=[(c.chunks[0] - c.sent) * 1000 for c in in_window if c.chunks],
        queued_ms=[c.queued_ms for c in in_window if c.queued_ms is not None],
        tokens=tokens,
        charged={t: tokens[t] + prompts[t] for t in tenants},
        duration=seconds,
        warmup=run.warmup,
        errors=dict(errors),
        unanswered=sum(1 for c in in_window if not c.chunks),
        cut=sum(1 for c in run.calls if c.status is None),
        gateway_cpus=run.cpu["gateway"] / seconds,
        other_cpus=run.cpu["other"] / seconds,
    )


async def gateway_load(http: httpx.AsyncClient) -> tuple[float, float]:
    """Slots held and requests queued, over every pool."""
    used = waiting = 0.0
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith("lockgate_slots_used{"):
            used += float(line.rsplit(" ", 1)[1])
        elif line.startswith("lockgate_queue_depth{"):
            waiting += float(line.rsplit(" ", 1)[1])
    return used, waiting


async def wait_idle(gateway: Gateway) -> None:
    """Until the clients that left have been noticed: no slot held, nothing queued."""
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
        deadline = time.monotonic() + IDLE_TIMEOUT
        while await gateway_load(http) != (0.0, 0.0):
            if time.monotonic() > deadline:
                raise SystemExit(f"{gateway.base_url}: still busy {IDLE_TIMEOUT:g}s after a phase")
            await asyncio.sleep(0.2)


async def warm_up(gateway: Gateway, keys: dict[str, str], slots: int) -> None:
    """Fill every slot once (pages in the weights) and look up every key once."""
    timeout = httpx.Timeout(120, connect=10)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=timeout) as http:
        tenants = itertools.islice(itertools.cycle(keys), max(slots, len(keys)))
        calls = [Call(t, time.perf_counter()) for t in tenants]
        await asyncio.gather(
            *(
                send(http, {"Authorization": f"Bearer {keys[c.tenant]}"}, chat_body(16, "Hi."), c)
                for c in calls
            )
        )
    failed = [f"{c.tenant}: {c.status}" for c in calls if c.status != 200]
    if failed:
        raise SystemExit(f"{gateway.base_url}: warm-up failed ({', '.join(failed)})")


def write_config(
    workdir: Path, *, policy: str, keys: dict[str, str], slots: int, threads: int
) -> int:
    port = free_port()
    # Queue limits far above the 17-20 clients, so the scheduler never refuses.
    config = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "models": [{"name": MODEL, "n_ctx": N_CTX, "max_sequences": slots, "threads": threads}],
        "scheduler": {
            "policy": policy,
            "max_queue": 10_000,
            "max_queue_per_tenant": 10_000,
            "max_wait": 3600,
        },
        "auth": {"database": str(workdir / "lockgate.db")},
        "tenants": [
            {
                "id": tenant,
                "priority": priority,
                "weight": 1.0,
                "keys": [{"id": f"{tenant}-key", "hash": key_hash(keys[tenant])}],
            }
            for tenant, priority in TENANTS.items()
        ],
    }
    (workdir / "lockgate.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    return port


def start_gateways(
    stack: contextlib.ExitStack, root: Path, keys: dict[str, str], pin: Pinning, slots: int
) -> dict[str, Gateway]:
    """One gateway per policy, both up for the whole run (only one is loaded at a time)."""
    started: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    for policy in POLICIES:
        workdir = root / policy
        workdir.mkdir()
        port = write_config(workdir, policy=policy, keys=keys, slots=slots, threads=pin.threads)
        cmd = [*pin.gateway, sys.executable, "-m", "gateway", "serve"]
        cmd += ["--config", str(workdir / "lockgate.yaml")]
        proc = stack.enter_context(spawned(cmd, workdir / "lockgate.log", gateway_env(workdir)))
        started[policy] = (proc, f"http://127.0.0.1:{port}")
    for proc, base in started.values():  # started together, so their imports overlap
        wait_http(f"{base}/health/ready", proc)
    return {policy: Gateway(base, proc.pid) for policy, (proc, base) in started.items()}


def run_rounds(
    gateways: dict[str, Gateway], keys: dict[str, str], load: Load, rounds: int
) -> list[Phase]:
    phases: list[Phase] = []
    for round_no in range(1, rounds + 1):
        order = POLICIES if round_no % 2 else POLICIES[::-1]
        for scenario in SCENARIOS:
            for policy in order:
                gateway = gateways[policy]
                seed = f"{round_no}/{scenario.name}"
                run = asyncio.run(run_phase(gateway, keys, scenario, load, seed=seed))
                asyncio.run(wait_idle(gateway))
                phase = summarise_phase(run, scenario, policy, round_no)
                phases.append(phase)
                print(progress_line(phase, scenario), flush=True)
    return phases


def progress_line(p: Phase, scenario: Scenario) -> str:
    ttft = percentiles(p.ttft_ms)
    shares = " ".join(f"{t} {n / p.duration:5.1f}" for t, n in p.tokens.items())
    return (
        f"  round {p.round} {p.scenario:5s} {p.policy:4s}  warm-up {p.warmup:4.1f}s  "
        f"{scenario.interactive} TTFT "
        f"p50 {ttft['p50']:6.0f} p99 {ttft['p99']:6.0f} ms (n={len(p.ttft_ms)}, queued p50 "
        f"{percentiles(p.queued_ms)['p50']:.0f})  "
        f"tok/s {p.throughput:5.1f} [{shares}]  errors {p.errors or 0}  "
        f"gateway {p.gateway_cpus:.2f} CPUs, other {p.other_cpus:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~3 minutes: 1 round, short phases")
    parser.add_argument("--rounds", type=int, help="default 2 (quick: 1)")
    parser.add_argument("--duration", type=float, help="measured s per phase (default 60)")
    parser.add_argument("--warmup", type=float, help="least discarded s per phase (default 10)")
    parser.add_argument("--rate", type=float, default=0.5, help="short chats per second")
    parser.add_argument("--slots", type=int, default=4, help="the engine's max_sequences")
    parser.add_argument("--pin", action="store_true", help="gateway on CPU 0, client on CPU 1")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_fairness.json")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    load = Load(
        long_tokens=(64, 128),
        short_tokens=8,
        rate=args.rate,
        warmup=args.warmup or (5.0 if args.quick else 10.0),
        duration=args.duration or (25.0 if args.quick else 60.0),
        tail_limit=120.0,
    )
    pin, revision = Pinning.choose(pin=args.pin), git_revision()
    keys = {tenant: new_key() for tenant in TENANTS}
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
        gateways = start_gateways(stack, root, keys, pin, args.slots)
        if pin.client_cpus is not None:
            os.sched_setaffinity(0, pin.client_cpus)
        for gateway in gateways.values():
            asyncio.run(warm_up(gateway, keys, args.slots))
        print(f"gateways up and warm after {time.monotonic() - began:.0f}s; logs in {root}")
        phases = run_rounds(gateways, keys, load, rounds)
    summary = summarise(phases)
    goals = targets(summary)
    print_tables(summary, goals)
    report = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": revision,
        "wall_seconds": round(time.monotonic() - began),
        "model": {"name": "Gemma 3 270M Q4_K_M (packaged default)", "n_ctx": N_CTX},
        "slots": args.slots,
        "rounds": rounds,
        "load": asdict(load),
        "scenarios": [asdict(s) for s in SCENARIOS],
        "tenants": {t: {"priority": p, "weight": 1.0} for t, p in TENANTS.items()},
        "request": {"temperature": 1.0, "logit_bias": NO_EOG, "stream": True, "chat": True},
        "pinning": pin.describe(),
        "cpus": os.cpu_count(),
        "targets": goals,
        "results": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} after {report['wall_seconds']}s")


if __name__ == "__main__":
    main()
