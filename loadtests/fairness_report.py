"""What bench_fairness.py measured, summed up: the scenarios, per-phase results,
pooled summaries (percentiles, shares, Jain's index), the issue's targets, tables."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

POLICIES = ("fcfs", "fair")
# Issue targets (share scenario): light p99 TTFT at least 5x lower under fair;
# throughput within 5% of FCFS; Jain's index of the equal-weight pair at least 0.95.
TTFT_GAIN = 5.0
THROUGHPUT_FLOOR = 0.95
JAIN_FLOOR = 0.95


@dataclass(frozen=True)
class Backlogged:
    """A tenant's closed-loop clients: each sends its next long generation when one ends."""

    tenant: str
    clients: int


@dataclass(frozen=True)
class Scenario:
    name: str
    backlogged: tuple[Backlogged, ...]
    interactive: str  # the tenant of the Poisson stream of short streamed chats
    pair: tuple[str, str] | None = None  # equal-weight tenants whose Jain index is reported


SCENARIOS = (
    Scenario(
        "share", (Backlogged("bulk-a", 12), Backlogged("bulk-b", 4)), "light", ("bulk-a", "bulk-b")
    ),
    Scenario("flood", (Backlogged("nightly", 16),), "chat"),
)


@dataclass
class Phase:
    scenario: str
    policy: str
    round: int
    ttft_ms: list[float]  # short chats sent inside the window
    queued_ms: list[float]  # the same chats' wait for a slot, as the gateway reports it
    tokens: dict[str, float]  # tenant → completion tokens generated inside the window
    # tenant → prompt + completion tokens, what the fair queue charges: the prompt
    # counts when its first token comes (the prefill is done).
    charged: dict[str, float]
    duration: float
    warmup: float
    errors: dict[str, int]  # "tenant status" → count, whole phase (0 = transport error)
    unanswered: int  # short chats of the window without a first token by the tail limit
    cut: int  # requests still running when the clients left (expected)
    gateway_cpus: float  # CPUs the gateway used, on average, during the window
    other_cpus: float  # CPUs busy with anything but the gateway and this client

    @property
    def throughput(self) -> float:
        return sum(self.tokens.values()) / self.duration


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        nan = float("nan")
        return {"p50": values[0] if values else nan, "p99": values[0] if values else nan}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p99": cuts[98]}


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when equal, 1/n when one takes everything."""
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else float("nan")


def summarise(phases: list[Phase]) -> dict[str, dict[str, Any]]:
    """Per scenario and policy, pooled over rounds: TTFTs together, tokens and time summed."""
    out: dict[str, dict[str, Any]] = {}
    for scenario in SCENARIOS:
        arms: dict[str, Any] = {}
        for policy in POLICIES:
            mine = [p for p in phases if p.scenario == scenario.name and p.policy == policy]
            ttft = [v for p in mine for v in p.ttft_ms]
            tokens = {t: sum(p.tokens[t] for p in mine) for t in mine[0].tokens}
            charged = {t: sum(p.charged[t] for p in mine) for t in mine[0].charged}
            total, seconds = sum(tokens.values()), sum(p.duration for p in mine)
            errors: Counter[str] = Counter()
            for p in mine:
                errors.update(p.errors)
            arm: dict[str, Any] = {
                "ttft_ms": percentiles(ttft) | {"n": len(ttft)},
                "queued_ms": percentiles([v for p in mine for v in p.queued_ms]),
                "tokens": tokens,
                "share": {t: n / total for t, n in tokens.items()},
                # shares of what the fair queue counts (prompt + completion)
                "charged_share": {t: n / sum(charged.values()) for t, n in charged.items()},
                "throughput_tok_s": total / seconds,
                "non_200": dict(errors),
                "unanswered": sum(p.unanswered for p in mine),
                "gateway_cpus": statistics.median(p.gateway_cpus for p in mine),
                "other_cpus": statistics.median(p.other_cpus for p in mine),
                "rounds": [asdict(p) for p in mine],
            }
            if scenario.pair:
                arm["jain"] = jain([tokens[t] for t in scenario.pair])
                arm["jain_per_round"] = [jain([p.tokens[t] for t in scenario.pair]) for p in mine]
            arms[policy] = arm
        fcfs, fair = arms["fcfs"], arms["fair"]
        arms["p99_ttft_fcfs_over_fair"] = fcfs["ttft_ms"]["p99"] / fair["ttft_ms"]["p99"]
        arms["throughput_fair_over_fcfs"] = fair["throughput_tok_s"] / fcfs["throughput_tok_s"]
        out[scenario.name] = arms
    return out


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    share = summary["share"]
    return [
        {
            "target": f"light p99 TTFT >= {TTFT_GAIN:g}x lower under fair",
            "value": share["p99_ttft_fcfs_over_fair"],
            "met": share["p99_ttft_fcfs_over_fair"] >= TTFT_GAIN,
        },
        {
            "target": f"throughput fair/fcfs >= {THROUGHPUT_FLOOR:g}",
            "value": share["throughput_fair_over_fcfs"],
            "met": share["throughput_fair_over_fcfs"] >= THROUGHPUT_FLOOR,
        },
        {
            "target": f"Jain(bulk-a, bulk-b) under fair >= {JAIN_FLOOR:g}",
            "value": share["fair"]["jain"],
            "met": share["fair"]["jain"] >= JAIN_FLOOR,
        },
    ]


def print_tables(summary: dict[str, dict[str, Any]], goals: list[dict[str, Any]]) -> None:
    for scenario in SCENARIOS:
        arms = summary[scenario.name]
        tenants = list(arms["fcfs"]["tokens"])
        light = scenario.interactive
        who = ", ".join(f"{b.tenant} x{b.clients}" for b in scenario.backlogged)
        print(f"\n{scenario.name}: backlogged {who}; {light} Poisson (TTFT in ms)")
        columns = [f"{light} p50", f"{light} p99", "n"]
        columns += [f"{t} share" for t in tenants] + [f"{light} charged share"]
        columns += ["Jain"] if scenario.pair else []
        columns += ["tok/s", "non-200", "other CPUs"]
        print(f"| policy | {' | '.join(columns)} |")
        print("|---|" + "---:|" * len(columns))
        for policy in POLICIES:
            a = arms[policy]
            cells = [f"{a['ttft_ms']['p50']:.0f}", f"{a['ttft_ms']['p99']:.0f}"]
            cells += [str(a["ttft_ms"]["n"])] + [f"{a['share'][t]:.3f}" for t in tenants]
            cells += [f"{a['charged_share'][light]:.3f}"]
            cells += [f"{a['jain']:.3f}"] if scenario.pair else []
            errors = sum(a["non_200"].values()) + a["unanswered"]
            cells += [f"{a['throughput_tok_s']:.1f}", str(errors), f"{a['other_cpus']:.2f}"]
            print(f"| {policy} | {' | '.join(cells)} |")
        print(
            f"p99 TTFT fcfs/fair: {arms['p99_ttft_fcfs_over_fair']:.1f}x; "
            f"throughput fair/fcfs: {arms['throughput_fair_over_fcfs']:.3f}"
        )
    print("\n| target (share scenario) | value | met |\n|---|---:|---|")
    for g in goals:
        print(f"| {g['target']} | {g['value']:.3f} | {'met' if g['met'] else 'NOT met'} |")
    other = max(summary[s.name][p]["other_cpus"] for s in SCENARIOS for p in POLICIES)
    if other > 0.15:
        print(f"\nwarning: other processes kept up to {other:.2f} CPUs busy (median of a phase)")
