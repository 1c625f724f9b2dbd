"""Drift signals: the two tests, the windows, and the gauges and report a gateway serves.

Unit tests of gateway/drift.py, then the app in this process with a fake backend
(``echo`` answers with the prompt's words, so the answers' lengths are chosen here).
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.drift import DriftTracker, Features, features, jensen_shannon, psi
from gateway.drift_cli import plot, table, verdict
from gateway.settings import REFUSAL, DriftSettings, Settings
from gateway.tenancy.keys import key_hash, new_key

ADMIN = "a" * 32
KEY = new_key()


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = random.Random(1)
    reference = [rng.gauss(100, 10) for _ in range(2000)]
    same = [rng.gauss(100, 10) for _ in range(2000)]
    shifted = [rng.gauss(130, 10) for _ in range(2000)]
    assert psi(reference, same) < 0.02
    assert psi(reference, shifted) > 1.0
    assert psi([5.0] * 100, [5.0] * 100) == pytest.approx(0.0)  # one bin: no error
    assert psi([5.0] * 100, [9.0] * 100) > 0.0  # beyond the reference's range counts
    # A tight distribution: a 0.5% wobble is not a shift, a 10% move is.
    tight = [rng.gauss(0.055, 0.0005) for _ in range(500)]
    assert psi(tight, [v * 1.005 for v in tight]) < 0.1
    assert psi(tight, [v * 1.10 for v in tight]) > 0.25  # significant


def test_jensen_shannon_is_zero_alike_one_disjoint_and_symmetric() -> None:
    assert jensen_shannon(["stop"] * 9 + ["length"], ["length", *["stop"] * 9]) == 0.0
    assert jensen_shannon(["stop"] * 10, ["length"] * 10) == pytest.approx(1.0)
    a, b = ["stop"] * 8 + ["length"] * 2, ["stop"] * 5 + ["length"] * 5
    assert jensen_shannon(a, b) == pytest.approx(jensen_shannon(b, a))
    assert 0.05 < jensen_shannon(a, b) < 0.2


def one(text: str = "fine", *, finish: str = "stop", json_mode: bool = False) -> Features:
    return features(
        prompt_tokens=10, completion_tokens=len(text.split()), ttft_seconds=0.1,
        finish_reason=finish, text=text, json_mode=json_mode, refusal=re.compile(REFUSAL),
    )  # fmt: skip


def test_features_of_an_answer() -> None:
    assert one("I'm sorry, but I cannot do that").refusal == "yes"
    assert one("Sorry is a word.").refusal == "no"
    assert one("  \n").empty == "yes" and one("x").empty == "no"
    assert one('{"a": 1}', json_mode=True).json_valid == "yes"
    assert one('{"a": ', json_mode=True).json_valid == "no"
    assert one('{"a": 1}').json_valid is None  # not asked for JSON: not counted


def test_windows_scores_version_change_and_pin() -> None:
    tracker = DriftTracker(DriftSettings(reference=20, window=20, min_requests=20))
    for _ in range(20):
        tracker.observe("m", "v1", one("a b"))
    assert tracker.scores("m") != []
    assert dict((f, v) for f, _, v in tracker.scores("m"))["completion_tokens"] < 0.01
    for _ in range(20):
        tracker.observe("m", "v1", one("a b c d e f g h", finish="length"))
    scores = {f: v for f, _, v in tracker.scores("m")}
    assert scores["completion_tokens"] > 1.0 and scores["finish_reason"] == pytest.approx(1.0)
    assert "json_valid" not in scores  # no JSON-mode requests: no score
    assert tracker.pin("m")
    assert {f: v for f, _, v in tracker.scores("m")}["completion_tokens"] < 0.01
    tracker.observe("m", "v2", one())  # a new version: a new reference
    assert tracker.scores("m") == []
    version, reference, current = tracker.windows("m") or ("", [], [])
    assert version == "v2" and len(reference) == len(current) == 1


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        models=[{"name": "echo"}],
        auth={"database": str(tmp_path / "l.db"), "admin_key": ADMIN},
        tenants=[{"id": "t", "keys": [{"id": "k", "hash": key_hash(KEY)}]}],
        batches={"database": str(tmp_path / "b.db"), "files_dir": str(tmp_path / "files")},
        drift={"reference": 10, "window": 10, "min_requests": 10},
    )
    fake = FakeBackend("echo")
    app = create_app(settings, backends={"echo": fake})
    async with app.router.lifespan_context(app):
        await fake.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


async def ask(http: httpx.AsyncClient, words: int) -> None:
    key = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": "w " * words}]}
    assert (await http.post("/v1/chat/completions", json=body, headers=key)).status_code == 200


async def test_a_gateway_exports_drift_gauges_and_a_report(http: httpx.AsyncClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for _ in range(10):
        await ask(http, 3)
    before = (await http.get("/metrics")).text
    assert 'lockgate_drift_window_requests{model="echo",window="reference"} 10.0' in before
    for _ in range(10):
        await ask(http, 40)  # answers ten times longer
    text = (await http.get("/metrics")).text
    psi_line = next(
        line for line in text.splitlines()
        if line.startswith('lockgate_drift_psi{feature="completion_tokens",model="echo"}')
    )  # fmt: skip
    assert float(psi_line.rsplit(" ", 1)[1]) > 1.0
    assert 'lockgate_drift_jensen_shannon{feature="finish_reason",model="echo"} 0.0' in text

    report = (await http.get("/admin/drift/echo", headers=admin)).json()
    assert report["version"].startswith("injected:fake")
    assert report["current"]["completion_tokens"] == [40.0] * 10
    scores = {s["feature"]: s["value"] for s in report["scores"]}
    assert verdict("psi", scores["completion_tokens"]) == "significant"
    printed = table(report)
    assert "completion_tokens  psi" in printed and "significant" in printed
    assert (await http.get("/admin/drift/nope", headers=admin)).status_code == 404
    assert (await http.get("/admin/drift/echo")).status_code == 401

    pinned = (await http.post("/admin/drift/echo/pin", headers=admin)).json()
    assert {s["feature"]: s["value"] for s in pinned["scores"]}["completion_tokens"] < 0.01


async def test_the_report_plots_both_windows(http: httpx.AsyncClient, tmp_path: Path) -> None:
    for words in [3] * 10 + [9] * 10:
        await ask(http, words)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    report = (await http.get("/admin/drift/echo", headers=admin)).json()
    out = tmp_path / "drift.png"
    plot(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
