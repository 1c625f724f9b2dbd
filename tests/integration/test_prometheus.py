"""A real Prometheus (Debian's package) scrapes a real `lockgate serve` and evaluates the
alert rules; the test reads both back through Prometheus's HTTP API."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Server, free_port, lockgate, spawn, stop

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
server: {{host: 127.0.0.1, port: {port}, log_level: warning}}
models:
  - {{name: gemma, n_ctx: 512, max_sequences: 2}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = lockgate(CONFIG, tmp_path_factory.mktemp("prom-gateway"))
    yield server
    stop(server)


@pytest.fixture(scope="module")
def prometheus(gateway: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed; `make test` installs it (target deploy-tools)")
    root = tmp_path_factory.mktemp("prometheus")
    shutil.copy(REPO / "deploy" / "prometheus" / "alerts.yaml", root / "alerts.yaml")
    target = gateway.base_url.removeprefix("http://")
    (root / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yaml]\n"
        "scrape_configs:\n"
        f"  - {{job_name: lockgate, static_configs: [{{targets: ['{target}']}}]}}\n"
    )
    port = free_port()
    server = spawn(
        [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        f"http://127.0.0.1:{port}", "/-/ready", root / "prometheus.log",
    )  # fmt: skip
    yield server
    stop(server)


def query(prometheus: Server, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus.base_url}/api/v1/query", params={"query": promql}).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_the_gateway_and_loads_its_alerts(
    gateway: Server, prometheus: Server
) -> None:
    with openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0) as c:
        for _ in range(3):
            c.chat.completions.create(
                model="gemma", max_tokens=4,
                messages=[{"role": "user", "content": "Hello"}],
            )  # fmt: skip
    deadline = time.monotonic() + 60
    found: list[dict[str, Any]] = []
    # A scrape (every second) may land between the first and the third request: wait for a
    # sample taken after all three.
    while time.monotonic() < deadline and not (found and float(found[0]["value"][1]) >= 3):
        found = query(
            prometheus, 'lockgate_requests_total{job="lockgate",model="gemma",status="200"}'
        )
        time.sleep(0.5)
    assert found, "the gateway's requests never reached Prometheus"
    assert float(found[0]["value"][1]) >= 3
    (up,) = query(prometheus, 'up{job="lockgate"}')
    assert up["value"][1] == "1"
    rules = httpx.get(f"{prometheus.base_url}/api/v1/rules").json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert "LockgateDown" in loaded and "LockgateModelDrift" in loaded
    assert all(r["health"] != "err" for r in loaded.values()), loaded


def test_every_dashboard_query_runs_and_the_picture_is_drawn(
    gateway: Server, prometheus: Server, tmp_path: Path
) -> None:
    """deploy/grafana/render.py against the real Prometheus: Prometheus accepts every
    panel's query (a refused one raises), the traffic panels have series, a PNG is drawn."""
    with openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0) as c:
        c.chat.completions.create(
            model="gemma", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )
    sys.path.insert(0, str(REPO / "deploy" / "grafana"))
    try:
        import render
    finally:
        sys.path.pop(0)
    end = time.time() + 1
    deadline = time.monotonic() + 60
    while True:
        collected = render.collect(prometheus.base_url, start=end - 120, end=end, step=2)
        panels = {p.title: p for _, ps in collected for p in ps}
        if panels["Requests/s by model and door"].series or time.monotonic() > deadline:
            break
        time.sleep(1)
        end = time.time() + 1
    assert len(panels) == 27
    assert panels["Requests/s by model and door"].series
    assert panels["Slots used / capacity"].series
    out = tmp_path / "dashboard.png"
    render.draw(collected, out, title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
