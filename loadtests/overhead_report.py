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
ARMS = ["direct", "nginx", "lockgate", "lockgate-auth", "lockgate-redis", "litellm"]
# Within this fraction of the mock's own rate, an arm may be limited by the mock, not itself.
CEILING = 0.9


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
    for (arm, n), points in samples.items():
        floor = samples["direct", n]
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
        print(
            f"| {r['concurrency']:<3d} | {r['arm']:14s} | {r['rps']:7.0f}{flag[1]}"
            f"| {r['p50_ms']:6.2f} | {r['p99_ms']:6.2f} | {r['added_p50_ms']:7.2f} "
            f"| {r['added_p99_ms']:7.2f} | {_cell(r['proxy_cpu_ms_per_request'], 16, 3)} "
            f"| {_cell(r['rss_mb'], 6, 0)} |"
        )
    if any(r["near_mock_ceiling"] for r in rows):
        print(f"\n* within {1 - CEILING:.0%} of the mock's own rate: may be the mock's limit")
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
        ax50.plot(xs, [r["p50_ms"] for r in mine], marker="o", label=arm)
        ax99.plot(xs, [r["p99_ms"] for r in mine], marker="o", label=arm)
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
