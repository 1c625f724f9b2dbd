"""Draws the Grafana dashboard's panels from a Prometheus's data, without Grafana.

Grafana is not a Debian package, so the README's picture of the dashboard is drawn
here: every panel of deploy/grafana/lockgate.json, in its rows, each of its queries run
through Prometheus's ``/api/v1/query_range`` with the dashboard's variables at "All",
one line per series, labelled by the panel's legend format.

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 --minutes 10 \\
        --out dashboard.png

A query Prometheus refuses is an error (so the picture also checks every query).
loadtests/dashboard_snapshot.py runs a gateway, Prometheus and traffic, then this.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DASHBOARD = Path(__file__).with_name("lockgate.json")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True, slots=True)
class Series:
    legend: str
    times: list[float]
    values: list[float]


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    unit: str
    series: list[Series]


class QueryRefused(RuntimeError):
    """Prometheus answered a panel's query with an error."""


def rows(dashboard: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The dashboard's rows, each with its panels, in order."""
    found: list[tuple[str, list[dict[str, Any]]]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.append((panel["title"], []))
        elif found:
            found[-1][1].append(panel)
    return found


def expand(expr: str, *, rate_interval: str) -> str:
    """The query as Grafana sends it with every variable at "All"."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$model", ".*")
        .replace("$tenant", ".*")
    )


def legend(template: str, labels: dict[str, str]) -> str:
    return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), template).strip() or "value"


def query_panel(
    client: httpx.Client, panel: dict[str, Any], *, start: float, end: float, step: float,
    rate_interval: str,
) -> Panel:  # fmt: skip
    series = []
    for target in panel["targets"]:
        expr = expand(target["expr"], rate_interval=rate_interval)
        answer = client.get(
            "/api/v1/query_range",
            params={"query": expr, "start": start, "end": end, "step": step},
        ).json()
        if answer.get("status") != "success":
            raise QueryRefused(f"{panel['title']}: {expr}: {answer.get('error')}")
        for result in answer["data"]["result"]:
            points = [(float(t), float(v)) for t, v in result["values"]]
            points = [(t, v) for t, v in points if v == v]  # NaN: a quantile of no samples
            if points:
                series.append(
                    Series(
                        legend(target.get("legendFormat", ""), result["metric"]),
                        [t - start for t, _ in points],
                        [v for _, v in points],
                    )
                )
    return Panel(panel["title"], panel["fieldConfig"]["defaults"].get("unit", ""), series)


def collect(
    prometheus: str, *, start: float, end: float, step: float = 5.0, scrape: float = 1.0
) -> list[tuple[str, list[Panel]]]:
    """Every panel's series over [start, end], as Grafana would query them."""
    dashboard = json.loads(DASHBOARD.read_text())
    # Grafana's $__rate_interval: at least four scrapes, and at least one step.
    rate_interval = f"{int(max(4 * scrape, step))}s"
    with httpx.Client(base_url=prometheus, timeout=30) as client:
        return [
            (title, [query_panel(client, p, start=start, end=end, step=step,
                                 rate_interval=rate_interval) for p in panels])
            for title, panels in rows(dashboard)
        ]  # fmt: skip


_UNITS = {"s": "seconds", "reqps": "requests/s", "short": "", "percentunit": "share"}


def draw(collected: list[tuple[str, list[Panel]]], out: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(panels) for _, panels in collected)
    plt.style.use("dark_background")
    fig, axes = plt.subplots(
        len(collected), columns, figsize=(5 * columns, 3.1 * len(collected)), squeeze=False
    )
    fig.patch.set_facecolor("#111217")
    for r, (row, panels) in enumerate(collected):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_facecolor("#181b1f")
            if c >= len(panels):
                ax.axis("off")
                continue
            panel = panels[c]
            heading = f"{row} · {panel.title}" if c == 0 else panel.title
            ax.set_title(heading, fontsize=9, loc="left", color="#d8d9da")
            for s in panel.series[:8]:
                ax.plot([t / 60 for t in s.times], s.values, linewidth=1.2, label=s.legend[:40])
            if panel.series:
                ax.legend(fontsize=6, loc="upper left", framealpha=0.3)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#8e8e8e",
                        transform=ax.transAxes)  # fmt: skip
            ax.set_ylabel(_UNITS.get(panel.unit, panel.unit), fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.15)
            if r == len(collected) - 1 or c >= len(collected[r + 1][1]):
                ax.set_xlabel("minutes", fontsize=7)
    fig.suptitle(title, fontsize=13, x=0.01, ha="left", color="#d8d9da")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70, facecolor=fig.get_facecolor())
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=15.0, help="the window, up to now")
    parser.add_argument("--step", type=float, default=5.0, help="seconds between points")
    parser.add_argument("--scrape", type=float, default=15.0, help="the scrape interval (s)")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    end = time.time()
    collected = collect(
        args.prometheus, start=end - 60 * args.minutes, end=end, step=args.step,
        scrape=args.scrape,
    )  # fmt: skip
    draw(collected, args.out, title="Lockgate (drawn from Prometheus by deploy/grafana/render.py)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
