"""The request log: opt-in per tenant, redacted, sampled, rotated; a canary key never leaks.

The app runs in this process with a fake backend (``echo`` repeats the message), with
the application and access logs captured to files beside the request log, so every
file a deployment would keep is searched for the canary.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.redaction import LONGEST_SECRET, REDACTED, Redactor
from gateway.request_log import RequestLog
from gateway.settings import ConfigError, RequestLogSettings, Settings, load_settings
from gateway.tenancy.keys import key_hash, new_key
from gateway.tenancy.records import Principal, Tenant

LOGGED, QUIET = new_key(), new_key()

Gateway = Callable[..., Any]


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    """``async with gateway(**request_log) as http`` → a client of the app; the app's
    logs (application, access) go to files in ``tmp_path`` while it runs."""
    import contextlib

    @contextlib.asynccontextmanager
    async def start(**request_log: Any) -> AsyncIterator[httpx.AsyncClient]:
        settings = Settings(
            models=[{"name": "echo", "max_n": 2}],
            auth={"database": str(tmp_path / "lockgate.db")},
            batches={"database": str(tmp_path / "b.db"), "files_dir": str(tmp_path / "files")},
            tenants=[
                {"id": "audited", "keys": [{"id": "a-key", "hash": key_hash(LOGGED)}],
                 "log_requests": True},
                {"id": "private", "keys": [{"id": "p-key", "hash": key_hash(QUIET)}]},
            ],
            request_log={"path": str(tmp_path / "requests.jsonl"), **request_log},
        )  # fmt: skip
        fake = FakeBackend("echo")
        app = create_app(settings, backends={"echo": fake})
        handler = logging.FileHandler(tmp_path / "app.log")
        # Everything the server logs; not this test's own HTTP client (httpx logs its URLs).
        handler.addFilter(lambda r: not r.name.startswith(("httpx", "httpcore")))
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        try:
            async with app.router.lifespan_context(app):
                await fake.start()
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                    yield http
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
            handler.close()

    return start


def written(tmp_path: Path) -> dict[str, str]:
    """Every file the gateway wrote (not its databases): name → text."""
    return {
        p.name: p.read_text(errors="replace")
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file() and p.suffix != ".db"
    }


def lines(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "requests.jsonl"
    return [orjson.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}], **extra}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_an_opted_in_tenants_requests_are_logged_with_their_facts(
    gateway: Gateway, tmp_path: Path
) -> None:
    async with gateway(bodies=True) as http:
        r = await http.post("/v1/chat/completions", json=chat("hello there"), headers=auth(LOGGED))
        assert r.status_code == 200
        r = await http.post(
            "/v1/chat/completions", json=chat("streamed words", stream=True), headers=auth(LOGGED)
        )
        assert r.status_code == 200
        await http.post("/v1/chat/completions", json=chat("not me"), headers=auth(QUIET))
        embed = {"model": "echo", "input": "x y"}
        await http.post("/v1/embeddings", json=embed, headers=auth(LOGGED))
    plain, streamed, embedded = lines(tmp_path)  # the private tenant's request is not there
    assert plain["tenant"] == "audited" and plain["key_id"] == "a-key"
    assert plain["model"] == "echo" and plain["instance"] == "injected"
    assert plain["endpoint"] == "chat" and plain["status"] == 200 and plain["stream"] is False
    assert plain["prompt_tokens"] > 0 and plain["completion_tokens"] == 2
    assert plain["finish_reason"] == ["stop"]
    assert plain["duration_ms"] >= plain["ttft_ms"] >= 0
    assert orjson.loads(plain["request"])["messages"][0]["content"] == "hello there"
    assert plain["response"].split() == ["hello", "there"]
    assert streamed["stream"] is True and streamed["response"].split() == ["streamed", "words"]
    assert embedded["endpoint"] == "embeddings" and embedded["response"] is None


async def test_without_bodies_only_the_facts_are_written(gateway: Gateway, tmp_path: Path) -> None:
    async with gateway() as http:
        await http.post("/v1/chat/completions", json=chat("secret plans"), headers=auth(LOGGED))
    (line,) = lines(tmp_path)
    assert "request" not in line and "response" not in line
    assert "secret plans" not in written(tmp_path)["requests.jsonl"]


async def test_a_canary_key_never_reaches_any_log_file(gateway: Gateway, tmp_path: Path) -> None:
    """The key in the Authorization header, in the body, in the query string; a second,
    unknown one refused with 401; a third in a Responses request and an Ollama chat."""
    unknown = new_key()
    async with gateway(bodies=True) as http:
        # After a newline, glued to a word, after an escaped character (raw JSON: \n, \u00e9).
        body = chat(f"my key is {LOGGED}, and Bearer {unknown}\n{LOGGED} x{LOGGED} é{LOGGED}")
        r = await http.post(
            f"/v1/chat/completions?api_key={LOGGED}", json=body, headers=auth(LOGGED)
        )
        assert r.status_code == 200
        assert LOGGED in r.text  # the echo: the client's own answer is not redacted
        r = await http.post(f"/v1/chat/completions?key={unknown}", json=body, headers=auth(unknown))
        assert r.status_code == 401
        await http.post(
            "/v1/responses", json={"model": "echo", "input": f"x {LOGGED}"}, headers=auth(LOGGED)
        )
        await http.post("/api/chat", json={**body, "stream": False}, headers=auth(LOGGED))
        # A key where a path or a model name goes: the access log redacts it too.
        await http.get(f"/v1/models/{LOGGED}", headers=auth(LOGGED))
        await http.post(
            "/v1/chat/completions", json={**body, "model": LOGGED}, headers=auth(LOGGED)
        )
    files = written(tmp_path)
    assert set(files) >= {"requests.jsonl", "app.log"}
    assert "POST /v1/chat/completions 401" in files["app.log"]  # the access log is there
    for name, text in files.items():
        for canary in (LOGGED, unknown, LOGGED[3:], unknown[3:]):
            assert canary not in text, f"a key in {name}"
    logged = lines(tmp_path)
    assert len(logged) == 4 and all(REDACTED in line["request"] for line in logged)
    assert "/v1/models/[REDACTED]" in files["app.log"]


async def test_configured_patterns_are_redacted_and_bodies_cut(
    gateway: Gateway, tmp_path: Path
) -> None:
    async with gateway(bodies=True, max_body_chars=120, redact=[r"ACME-\d+"]) as http:
        content = "mail ann@example.com card 4111 1111 1111 1111 order ACME-42 " + "z " * 200
        await http.post("/v1/chat/completions", json=chat(content), headers=auth(LOGGED))
    (line,) = lines(tmp_path)
    text = written(tmp_path)["requests.jsonl"]
    assert "ACME-42" not in text and "ann@example.com" in text  # the list replaces the default
    assert line["request"].endswith("…[truncated]") and len(line["request"]) <= 120 + 20


def test_default_patterns_cover_emails_and_card_numbers() -> None:
    redact = Redactor(RequestLogSettings().redact)
    assert redact("write to ann.b+x@mail.example.org now") == f"write to {REDACTED} now"
    assert redact("4111-1111-1111-1111 and 378282246310005") == f"{REDACTED} and {REDACTED}"
    assert redact("12 tokens, 2026 year") == "12 tokens, 2026 year"
    assert redact.value({"a": ["Bearer abc.def", {"k": "sk-0123456789ab"}]}) == {
        "a": [REDACTED, {"k": REDACTED}]
    }


def test_sampling_and_opt_in_choose_what_is_written(tmp_path: Path) -> None:
    settings = RequestLogSettings(path=str(tmp_path / "r.jsonl"), sample_rate=0.25)
    draws = iter([0.1, 0.3, 0.2, 0.9])
    log = RequestLog(settings, sample=lambda: next(draws))
    audited = Principal(tenant=Tenant(id="a", log_requests=True), key_id="k")
    private = Principal(tenant=Tenant(id="p"), key_id="k")
    assert [log.wants(audited) for _ in range(4)] == [True, False, True, False]
    assert not log.wants(private)
    assert not RequestLog(RequestLogSettings()).wants(audited)  # no path: off


def test_the_file_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "r.jsonl"
    log = RequestLog(RequestLogSettings(path=str(path), max_bytes=1024, backups=2))
    log.start()
    for i in range(200):
        log.write({"request_id": f"r{i}", "pad": "x" * 50})
    log.stop()
    kept = sorted(p.name for p in path.parent.iterdir())
    assert kept == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    assert all(p.stat().st_size <= 1024 for p in path.parent.iterdir())
    assert orjson.loads(path.read_text().splitlines()[-1])["request_id"] == "r199"


def test_an_unwritable_path_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = RequestLog(RequestLogSettings(path=str(blocker / "r.jsonl")))
    assert log.check() is not None and "request_log.path" in (log.check() or "")


def test_a_bad_pattern_is_refused_with_its_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("request_log: {path: r.jsonl, redact: ['(unclosed']}\n")
    with pytest.raises(ConfigError, match=r"request_log\.redact"):
        load_settings(config, {})


def test_a_long_body_is_cut_before_it_is_scanned() -> None:
    """16 MiB without an @ or a digit: scanned whole, patterns cost in its size (the
    first e-mail pattern was quadratic on it); the redactor only ever sees the cut."""
    log = RequestLog(RequestLogSettings(path="-", max_body_chars=4096))
    seen: list[int] = []
    redact = log.redact
    log.redact = lambda text: seen.append(len(text)) or redact(text)  # type: ignore[method-assign,func-returns-value]
    out = log.body(b"a" * (16 << 20) + b" lg-0123456789abcdef")
    assert seen == [4096 + LONGEST_SECRET]
    assert out is not None and out.endswith("[truncated]") and "lg-" not in out
    straddling = "x" * 4090 + " lg-" + "k" * 40  # a key across the cut: no prefix of it left
    cut = log.body(straddling)
    assert cut is not None and "lg-" not in cut and "kkk" not in cut
