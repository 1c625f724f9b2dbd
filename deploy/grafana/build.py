"""Writes deploy/grafana/lockgate.json, Lockgate's Grafana dashboard, from the panels below.

    python deploy/grafana/build.py          # rewrite lockgate.json
    python deploy/grafana/build.py --check  # exit 1 if lockgate.json is not up to date

tests/deploy/test_dashboards.py runs the check and fails if a panel names a metric the
gateway does not export. Every query uses the dashboard's ``model`` and ``tenant``
variables (multi-select, "All" by default). Queue and slot figures are shown per replica
(``instance``): for a pool shared through Redis each replica reports the cluster's figure,
so summing replicas would count it twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("lockgate.json")
M = 'model=~"$model"'
T = 'tenant=~"$tenant"'


def q(expr: str, legend: str) -> dict[str, str]:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, by: str = "model") -> list[dict[str, str]]:
    return [
        q(
            f"histogram_quantile({p}, sum by ({by}, le) (rate({metric}_bucket{{{M}}}[$__rate_interval])))",
            f"p{int(p * 100)} {{{{{by}}}}}",
        )
        for p in (0.5, 0.95, 0.99)
    ]


# (row title, [(panel title, unit, queries)])
ROWS: list[tuple[str, list[tuple[str, str, list[dict[str, str]]]]]] = [
    (
        "Traffic",
        [
            (
                "Requests/s by model and door",
                "reqps",
                [
                    q(
                        f"sum by (model, endpoint) (rate(lockgate_requests_total{{{M}}}[$__rate_interval]))",
                        "{{model}} {{endpoint}}",
                    )
                ],
            ),
            (
                "Errors/s by status",
                "reqps",
                [
                    q(
                        f'sum by (status) (rate(lockgate_requests_total{{{M}, status=~"4..|5.."}}[$__rate_interval]))',
                        "{{status}}",
                    )
                ],
            ),
            (
                "Requests/s by tenant",
                "reqps",
                [
                    q(
                        f"sum by (tenant) (rate(lockgate_tenant_requests_total{{{M}, {T}}}[$__rate_interval]))",
                        "{{tenant}}",
                    )
                ],
            ),
            (
                "Tokens/s",
                "short",
                [
                    q(
                        f"sum by (model) (rate(lockgate_prompt_tokens_total{{{M}}}[$__rate_interval]))",
                        "prompt {{model}}",
                    ),
                    q(
                        f"sum by (model) (rate(lockgate_completion_tokens_total{{{M}}}[$__rate_interval]))",
                        "completion {{model}}",
                    ),
                ],
            ),
        ],
    ),
    (
        "Latency",
        [
            ("Time to first token", "s", quantiles("lockgate_time_to_first_token_seconds")),
            ("Time per output token", "s", quantiles("lockgate_time_per_output_token_seconds")),
            ("End to end", "s", quantiles("lockgate_request_duration_seconds")),
            ("Queue wait", "s", quantiles("lockgate_queue_wait_seconds")),
        ],
    ),
    (
        "Queues and slots",
        [
            (
                "Waiting for a slot",
                "short",
                [
                    q(
                        f"max by (model, priority, instance) (lockgate_queue_depth{{{M}}})",
                        "{{model}} {{priority}} ({{instance}})",
                    )
                ],
            ),
            (
                "Slots used / capacity",
                "short",
                [
                    q(
                        f"max by (model, instance) (lockgate_slots_used{{{M}}})",
                        "used {{model}} ({{instance}})",
                    ),
                    q(
                        f"max by (model, instance) (lockgate_slots_capacity{{{M}}})",
                        "capacity {{model}} ({{instance}})",
                    ),
                ],
            ),
            (
                "Scheduling outcomes/s",
                "reqps",
                [
                    q(
                        f"sum by (outcome) (rate(lockgate_queue_requests_total{{{M}}}[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
            ),
            (
                "Engine batch and KV cache",
                "short",
                [
                    q(
                        f"max by (model, backend_id, instance) (lockgate_engine_running_sequences{{{M}}})",
                        "running {{backend_id}} ({{instance}})",
                    ),
                    q(
                        f"max by (model, backend_id) (lockgate_engine_kv_cache_usage{{{M}}})",
                        "KV use {{backend_id}}",
                    ),
                ],
            ),
        ],
    ),
    (
        "Instances and routing",
        [
            (
                "Backend up",
                "short",
                [q(f"min by (model, backend_id) (lockgate_backend_up{{{M}}})", "{{backend_id}}")],
            ),
            (
                "Ejected (1) / half-open (0.5)",
                "short",
                [
                    q(
                        f"max by (model, backend_id) (lockgate_backend_ejected{{{M}}})",
                        "{{backend_id}}",
                    )
                ],
            ),
            (
                "Retries, spillovers, ejections /s",
                "ops",
                [
                    q(
                        f"sum by (backend_id) (rate(lockgate_retries_total{{{M}}}[$__rate_interval]))",
                        "retries {{backend_id}}",
                    ),
                    q(
                        f"sum by (backend_id) (rate(lockgate_spillovers_total{{{M}}}[$__rate_interval]))",
                        "spillover {{backend_id}}",
                    ),
                    q(
                        f"sum by (backend_id) (rate(lockgate_ejections_total{{{M}}}[$__rate_interval]))",
                        "ejections {{backend_id}}",
                    ),
                ],
            ),
            (
                "Canary weight and rollbacks",
                "short",
                [
                    q(
                        f"max by (model, backend_id) (lockgate_backend_weight{{{M}}})",
                        "weight {{backend_id}}",
                    ),
                    q(
                        f"sum by (backend_id) (increase(lockgate_canary_rollbacks_total{{{M}}}[1h]))",
                        "rollbacks (1h) {{backend_id}}",
                    ),
                ],
            ),
        ],
    ),
    (
        "Batches",
        [
            (
                "Batches by status",
                "short",
                [q("max by (status) (lockgate_batches)", "{{status}}")],
            ),
            (
                "Batch lines/s",
                "ops",
                [
                    q(
                        "sum by (outcome) (rate(lockgate_batch_lines_total[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
            ),
            (
                "Batch tokens/s",
                "short",
                [q("sum (rate(lockgate_batch_tokens_total[$__rate_interval]))", "tokens/s")],
            ),
            (
                "Oldest unfinished batch",
                "s",
                [q("max (lockgate_batch_oldest_pending_seconds)", "age")],
            ),
        ],
    ),
    (
        "Drift (README: Drift)",
        [
            (
                "PSI of numeric features (0.25: significant)",
                "short",
                [
                    q(
                        f"max by (model, feature) (lockgate_drift_psi{{{M}}})",
                        "{{model}} {{feature}}",
                    )
                ],
            ),
            (
                "Jensen-Shannon of categories (0.1: look)",
                "short",
                [
                    q(
                        f"max by (model, feature) (lockgate_drift_jensen_shannon{{{M}}})",
                        "{{model}} {{feature}}",
                    )
                ],
            ),
            (
                "Requests in the drift windows",
                "short",
                [
                    q(
                        f"max by (model, window) (lockgate_drift_window_requests{{{M}}})",
                        "{{model}} {{window}}",
                    )
                ],
            ),
        ],
    ),
    (
        "Tenants",
        [
            (
                "Refusals/s by reason",
                "reqps",
                [
                    q(
                        f"sum by (reason) (rate(lockgate_tenant_rejections_total{{{T}}}[$__rate_interval]))",
                        "{{reason}}",
                    )
                ],
            ),
            (
                "Token budget spent",
                "percentunit",
                [
                    q(
                        f"max by (tenant, period) (lockgate_tenant_budget_used_ratio{{{T}}})",
                        "{{tenant}} {{period}}",
                    )
                ],
            ),
            (
                "Tokens/s by tenant",
                "short",
                [
                    q(
                        f"sum by (tenant, kind) (rate(lockgate_tenant_tokens_total{{{M}, {T}}}[$__rate_interval]))",
                        "{{tenant}} {{kind}}",
                    )
                ],
            ),
            (
                "Redis degraded",
                "short",
                [q("max by (instance) (lockgate_redis_degraded)", "{{instance}}")],
            ),
        ],
    ),
]


def variable(name: str, metric: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "query": {"query": f"label_values({metric}, {name})", "refId": name},
        "definition": f"label_values({metric}, {name})",
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row, items in ROWS:
        panels.append(
            {"type": "row", "title": row, "id": len(panels) + 1, "collapsed": False,
             "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}
        )  # fmt: skip
        y += 1
        for i, (title, unit, queries) in enumerate(items):
            panels.append(
                {
                    "type": "timeseries",
                    "title": title,
                    "id": len(panels) + 1,
                    "datasource": {"type": "prometheus", "uid": "prometheus"},
                    "gridPos": {"x": 6 * i, "y": y, "w": 6, "h": 8},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    "targets": [
                        {**t, "refId": chr(ord("A") + n), "range": True}
                        for n, t in enumerate(queries)
                    ],
                }
            )
        y += 8
    return {
        "uid": "lockgate",
        "title": "Lockgate",
        "tags": ["lockgate", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                variable("model", "lockgate_requests_total"),
                variable("tenant", "lockgate_tenant_requests_total"),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv[1:]:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} is out of date: run python {__file__}")
    else:
        OUT.write_text(text)
