"""What bench_overhead.py measured, summed up: per-point samples, medians over rounds,
added latency against the direct arm, tables and the latency-vs-concurrency plot."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STREAM_CHUNKS = 64
STREAM_GAP_MS = 20.0
# A gap this short between chunks the mock spaced STREAM_GAP_MS apart means they were bunched.
BUNCHED_MS = 2.0
ARMS = [
    "direct",
    "nginx",
    "lockgate",
    "lockgate-auth",
    "lockgate-prev",
    "lockgate-ollama",
    "lockgate-responses",
    "lockgate-redis",
    "litellm",
]
# Within this fraction of the mock's own rate, an arm may be limited by the mock, not itself.
CEILING = 0.9
# A level where direct p99 passes this multiple of its one-client floor measures the load
# generator's own queueing: its latencies are shown, flagged, and kept out of the targets.
SATURATED = 2.0
# The rate an arm sustains with p99 under this many ms.
P99_BUDGET_MS = 10.0


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_ms: float | None  # per request, the proxy's whole process tree
    extra_cpu_ms: dict[str, float]
    rss_mb: float | None
    other_cpus: float


@dataclass
class StreamSample:
    ttft_p50_ms: float
    ttft_p99_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    bunched: float  # fraction of gaps under BUNCHED_MS
    chunks_sent: int
    chunks_received: int
    proxy_cpu_ms: float | None  # per stream


def paired_added(points: list[Any], floor: list[Any], metric: str) -> float:
    """Median of per-round differences to ``direct``: the rounds share a VM's drift."""
    pairs = zip(points, floor, strict=True)
    return float(statistics.median(getattr(p, metric) - getattr(d, metric) for p, d in pairs))


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(samples: dict[tuple[str, int], list[Sample]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    one = samples.get(("direct", min(n for _, n in samples)))
    floor_p99 = statistics.median(p.p99_ms for p in one) if one else None
    for (arm, n), points in samples.items():
        floor = samples["direct", n]
        direct_p99 = statistics.median(p.p99_ms for p in floor)
        rps = statistics.median(p.rps for p in points)
        ceiling = statistics.median(p.rps for p in floor)
        rows.append(
            {
                "arm": arm,
                "concurrency": n,
                "rps": rps,
                "p50_ms": statistics.median(p.p50_ms for p in points),
                "p99_ms": statistics.median(p.p99_ms for p in points),
                "added_p50_ms": paired_added(points, floor, "p50_ms"),
                "added_p99_ms": paired_added(points, floor, "p99_ms"),
                "proxy_cpu_ms_per_request": _median([p.proxy_cpu_ms for p in points]),
                "extra_cpu_ms_per_request": {
                    k: statistics.median(p.extra_cpu_ms[k] for p in points)
                    for k in points[0].extra_cpu_ms
                },
                "rss_mb": _median([p.rss_mb for p in points]),
                "near_mock_ceiling": arm != "direct" and rps >= CEILING * ceiling,
                "direct_saturated": floor_p99 is not None and direct_p99 > SATURATED * floor_p99,
                "other_cpus": statistics.median(p.other_cpus for p in points),
                "rounds": [asdict(p) for p in points],
            }
        )
    return sorted(rows, key=lambda r: (r["concurrency"], ARMS.index(r["arm"])))


def summarise_streams(streams: dict[str, list[StreamSample]]) -> list[dict[str, Any]]:
    floor = streams.get("direct")
    rows: list[dict[str, Any]] = []
    for arm, points in streams.items():
        rows.append(
            {
                "arm": arm,
                "ttft_p50_ms": statistics.median(p.ttft_p50_ms for p in points),
                "added_ttft_p50_ms": paired_added(points, floor, "ttft_p50_ms") if floor else None,
                "gap_p99_ms": statistics.median(p.gap_p99_ms for p in points),
                "added_gap_p99_ms": paired_added(points, floor, "gap_p99_ms") if floor else None,
                "bunched": statistics.median(p.bunched for p in points),
                "chunks_sent": sum(p.chunks_sent for p in points),
                "chunks_received": sum(p.chunks_received for p in points),
                "proxy_cpu_ms_per_stream": _median([p.proxy_cpu_ms for p in points]),
                "rounds": [asdict(p) for p in points],
            }
        )
    return sorted(rows, key=lambda r: ARMS.index(r["arm"]))


def rps_within_budget(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per arm, the highest rate measured with p99 under :data:`P99_BUDGET_MS`."""
    best: dict[str, float | None] = {}
    for r in rows:
        fits = r["p99_ms"] < P99_BUDGET_MS
        current = best.get(r["arm"])
        if fits and (current is None or r["rps"] > current):
            best[r["arm"]] = r["rps"]
        else:
            best.setdefault(r["arm"], None)
    return best


def targets(rows: list[dict[str, Any]], stream_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 6's targets for Lockgate with auth + limits, each with its measured value."""
    at = {(r["arm"], r["concurrency"]): r for r in rows}
    streams = {s["arm"]: s for s in stream_rows}
    arm = "lockgate-auth"
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, *, at_least: bool = False,
            note: str = "") -> None:  # fmt: skip
        met = None if value is None else (value >= limit if at_least else value <= limit)
        out.append({"target": name, "value": value, "limit": limit, "met": met, "note": note})

    one, many = at.get((arm, 1)), at.get((arm, 64))
    if one:
        add("added p50 at 1 client, ms", one["added_p50_ms"], 0.5)
        add("added p99 at 1 client, ms", one["added_p99_ms"], 1.0)
        add("CPU per request at 1 client, ms", one["proxy_cpu_ms_per_request"], 1.0)
    if many:
        note = (
            "direct is saturated at 64: queueing in the load generator" * many["direct_saturated"]
        )
        add("added p99 at 64 clients, ms", many["added_p99_ms"], 5.0, note=note)
        for other, ratio in (("litellm", 25.0), ("nginx", 0.5)):
            theirs = at.get((other, 64))
            if theirs:
                add(f"req/s at 64 clients / {other}", many["rps"] / theirs["rps"], ratio,
                    at_least=True)  # fmt: skip
    s = streams.get(arm)
    if s:
        add("stream: added TTFT p50, ms", s["added_ttft_p50_ms"], 1.0)
        add("stream: added gap p99, ms", s["added_gap_p99_ms"], 1.0)
        add("stream: chunks lost or merged", s["chunks_sent"] - s["chunks_received"], 0)
    return out


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"


def print_tables(rows: list[dict[str, Any]], stream_rows: list[dict[str, Any]]) -> None:
    print(
        "\n| c   | arm            |   req/s | p50 ms | p99 ms | +p50 ms | +p99 ms "
        "| proxy CPU ms/req | RSS MB |\n|-----|----------------|---------|--------|--------|"
        "---------|---------|------------------|--------|"
    )
    for r in rows:
        flag = " *" if r["near_mock_ceiling"] else "  "
        level = f"{r['concurrency']}{'†' if r['direct_saturated'] else ''}"
        print(
            f"| {level:<3s} | {r['arm']:14s} | {r['rps']:7.0f}{flag[1]}"
            f"| {r['p50_ms']:6.2f} | {r['p99_ms']:6.2f} | {r['added_p50_ms']:7.2f} "
            f"| {r['added_p99_ms']:7.2f} | {_cell(r['proxy_cpu_ms_per_request'], 16, 3)} "
            f"| {_cell(r['rss_mb'], 6, 0)} |"
        )
    if any(r["near_mock_ceiling"] for r in rows):
        print(f"\n* within {1 - CEILING:.0%} of the mock's own rate: may be the mock's limit")
    if any(r["direct_saturated"] for r in rows):
        print(
            f"† direct p99 is over {SATURATED:g}x its one-client floor: the mock and client"
            " share a core, so latency there includes the load generator's queueing"
        )
    budget = rps_within_budget(rows)
    print(f"\nreq/s with p99 < {P99_BUDGET_MS:g} ms: " + ", ".join(
        f"{arm} {'-' if v is None else f'{v:.0f}'}" for arm, v in budget.items()
    ))  # fmt: skip
    if stream_rows:
        print(
            f"\nstreams of {STREAM_CHUNKS} chunks {STREAM_GAP_MS:g} ms apart\n"
            "| arm            | TTFT p50 ms | +TTFT ms | gap p99 ms | +gap p99 ms | "
            f"gaps < {BUNCHED_MS:g} ms | chunks recv/sent | proxy CPU ms/stream |\n"
            "|----------------|-------------|----------|------------|-------------|"
            "------------|------------------|---------------------|"
        )
        for s in stream_rows:
            chunks = f"{s['chunks_received']}/{s['chunks_sent']}"
            print(
                f"| {s['arm']:14s} | {s['ttft_p50_ms']:11.2f} | "
                f"{_cell(s['added_ttft_p50_ms'], 8, 2)} | {s['gap_p99_ms']:10.2f} | "
                f"{_cell(s['added_gap_p99_ms'], 11, 2)} | {s['bunched']:10.1%} | "
                f"{chunks:>16s} | {_cell(s['proxy_cpu_ms_per_stream'], 19, 3)} |"
            )
    checks = targets(rows, stream_rows)
    if checks:
        print("\n| target (lockgate-auth) | measured | limit | met |\n|---|---:|---:|---|")
        for t in checks:
            met = {True: "yes", False: "no", None: "-"}[t["met"]]
            value = "-" if t["value"] is None else f"{t['value']:.2f}"
            print(f"| {t['target']} | {value} | {t['limit']:g} | {met} {t['note']} |")
    if rows and max(r["other_cpus"] for r in rows) > 0.3:
        print("\nwarning: other processes kept the machine busy; rerun on a quiet machine")


def plot(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax50, ax99) = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        xs = [r["concurrency"] for r in mine]
        for ax, key in ((ax50, "p50_ms"), (ax99, "p99_ms")):
            (line,) = ax.plot(xs, [r[key] for r in mine], marker="o", label=arm)
            # Hollow where the direct arm is saturated (the load generator's queueing).
            hollow = [r for r in mine if r["direct_saturated"]]
            ax.plot([r["concurrency"] for r in hollow], [r[key] for r in hollow], "o",
                    markerfacecolor="white", color=line.get_color())  # fmt: skip
    for ax, name in ((ax50, "p50"), (ax99, "p99")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(f"{name} latency, ms")
        ax.grid(True, which="both", alpha=0.3)
    ax99.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
