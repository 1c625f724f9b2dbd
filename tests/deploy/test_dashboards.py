"""The Grafana dashboard and the alert rules name only metrics the gateway exports.

The names come from the gateway's own registry, built by the app factory with every
collector registered (fake backends: this reads metric families, not engine figures).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from prometheus_client.core import Metric

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "lockgate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
# Series Prometheus adds itself.
BUILTIN = {"up"}


def sample_names(family: Metric) -> set[str]:
    """The series names a family is scraped as."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }[family.type]
    return {family.name + s for s in suffixes}


def exported() -> set[str]:
    app = create_app(Settings(), backends={"gemma": FakeBackend("echo")})
    metrics: Metrics = app.state.metrics
    names: set[str] = set()
    for family in metrics.registry.collect():
        names |= sample_names(family)
    return names


def named(expressions: list[str]) -> set[str]:
    """Every metric an expression names: the project's prefix, and Prometheus's ``up``."""
    found: set[str] = set()
    for expr in expressions:
        found |= set(re.findall(r"\blockgate_[a-z0-9_]+\b", expr))
        found |= set(re.findall(r"\b(up)\s*\{", expr))
    return found


def dashboard_expressions() -> list[str]:
    text = DASHBOARD.read_text()
    return re.findall(r'"expr": "((?:[^"\\]|\\.)*)"', text)


def test_the_dashboard_is_generated_from_its_source() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "grafana" / "build.py"), "--check"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_every_dashboard_panel_names_a_real_metric() -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 30
    used = named(expressions)
    assert len(used) >= 25  # the parse found names, not nothing
    missing = used - exported() - BUILTIN
    assert not missing, f"panels query metrics the gateway does not export: {sorted(missing)}"


def test_every_alert_names_a_real_metric() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    expressions = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = named(expressions)
    assert len(used) == 10  # the metrics the alerts name
    missing = used - exported() - BUILTIN
    assert not missing, f"alerts query metrics the gateway does not export: {sorted(missing)}"


def test_a_misspelt_metric_would_be_caught() -> None:
    assert named(['rate(lockgate_request_total{model="x"}[5m])']) - exported() == {
        "lockgate_request_total"
    }
