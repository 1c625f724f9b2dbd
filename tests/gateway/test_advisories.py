"""One regression test per published bug class of LLM servers and gateways, named for it.

In process, over the fake backend (this module's test double), with tenants and the admin
API on. The wire-level classes (oversized heads, slowloris) are in
tests/integration/test_wire_limits.py, oversized prompts in tests/backends/test_engine.py
(against real processes), and Ollama's model-management pass-through (CVE-2024-37032,
CVE-2026-7482) in tests/gateway/test_ollama_api.py.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.base import ChatMessage
from backends.fake import FakeBackend
from backends.llama.templates import ChatTemplate
from gateway.app import create_app
from gateway.tenancy import keys as key_module
from tests.gateway.test_tenancy_api import ADMIN, ENDPOINTS, Keys, auth, chat, settings


@pytest.fixture
def echo() -> FakeBackend:
    return FakeBackend("echo", context_length=64)


@pytest.fixture
async def client(tmp_path: Path, echo: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings(tmp_path), backends={"echo": echo})
    async with app.router.lifespan_context(app):
        await echo.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


@pytest.mark.parametrize(
    "key",
    [
        "lg-' OR '1'='1' --",
        'lg-" OR 1=1; DROP TABLE keys; --',
        "lg-x' UNION SELECT hash FROM keys --",
        "lg-*1\r\n$8\r\nFLUSHALL",
    ],
)
async def test_litellm_cve_2026_42208_sql_shaped_keys_are_just_unknown_keys(
    client: httpx.AsyncClient, key: str
) -> None:
    """Keys are looked up by their SHA-256, never spliced into a query or a command."""
    r = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}".encode("latin-1")})  # type: ignore[dict-item]
    assert r.status_code == 401
    assert (await client.get("/v1/models", headers=auth(Keys.team_a))).status_code == 200


async def test_vllm_cve_2025_59425_keys_are_compared_in_constant_time(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin key goes through hmac.compare_digest (of digests, so length says nothing);
    tenant keys are found by their hash, and the stored hash compared with compare_digest."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert (await client.get("/admin/tenants", headers=auth(ADMIN))).status_code == 200
    assert (await client.get("/admin/tenants", headers=auth(ADMIN[:-1] + "y"))).status_code == 401
    assert compared and all(len(a) == len(b) == 32 for a, b in compared[:2])
    assert key_module.key_hash(Keys.team_a).startswith("sha256:")
    assert hashlib.sha256(Keys.team_a.encode()).hexdigest() in key_module.key_hash(Keys.team_a)


@pytest.mark.parametrize(
    "path",
    [
        "//v1/models",
        "/v1/../v1/models",
        "/v1%2Fmodels",
        "/V1/models",
        "/v1/./models",
        "/admin/tenants/",
    ],
)
async def test_vllm_ghsa_94f4_hr76_p5j6_no_path_variant_bypasses_auth(
    client: httpx.AsyncClient, path: str
) -> None:
    """Guards are declared per route, not matched on a rebuilt path prefix."""
    for host in ("test", "localhost", "127.0.0.1:8000", "evil.example"):
        r = await client.get(path, headers={"Host": host})
        assert r.status_code in (401, 404, 405), (path, host, r.status_code)
        assert "location" not in r.headers
        assert "object" not in r.text or '"error"' in r.text


@pytest.mark.parametrize(
    "smuggled",
    [
        {"api_base": "http://169.254.169.254/"},
        {"base_url": "http://evil.example/v1"},
        {"extra_body": {"api_base": "http://evil.example"}},
        {"metadata": {"upstream": "http://evil.example"}},
    ],
)
async def test_litellm_cve_2024_6587_clients_cannot_choose_an_upstream(
    client: httpx.AsyncClient, echo: FakeBackend, smuggled: dict[str, Any]
) -> None:
    """Unknown fields, at any depth, are dropped: nothing a client sends names a host."""
    r = await client.post(
        "/v1/chat/completions", json={**chat(), **smuggled}, headers=auth(Keys.team_a)
    )
    assert r.status_code == 200
    seen = repr(echo.seen[-1])
    assert "evil" not in seen and "169.254" not in seen
    ollama = {**chat(), "stream": False, "options": {"base_url": "http://evil.example"}}
    r = await client.post("/api/chat", json=ollama, headers=auth(Keys.team_a))
    assert r.status_code == 200
    assert "evil" not in repr(echo.seen[-1])


async def test_key_leakage_a_canary_key_appears_in_no_log_metric_or_body(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = "lg-" + "C" * 43
    texts = []
    for method, path, body in ENDPOINTS:
        r = await client.request(method, path, json=body, headers=auth(canary))
        texts.append(r.text + str(r.headers))
    texts.append((await client.get("/metrics")).text)
    assert all(canary not in t for t in texts)
    assert canary not in caplog.text


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_llama_cpp_python_cve_2024_34359_and_vllm_cve_2025_62426_templates_are_sandboxed(
    payload: str,
) -> None:
    """A template that reaches for Python internals fails to render; message text is data."""
    hostile = ChatTemplate(payload, name="gguf")
    with pytest.raises(Exception, match="template"):
        hostile.render_parts((ChatMessage("user", "hi"),))
    benign = ChatTemplate.builtin("gemma")
    parts = benign.render_parts((ChatMessage("user", payload),))
    assert any(payload in text for text, is_content in parts if is_content)


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 128}, "n"), ({"n": 129}, "n"), ({"max_tokens": 10**9}, "messages")],
)
async def test_vllm_cve_2026_34756_n_and_max_tokens_cannot_amplify(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    """n is capped by the model's max_n, and prompt + max_tokens by its context: refused
    before anything is queued."""
    r = await client.post("/v1/chat/completions", json=chat(**extra), headers=auth(Keys.team_a))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 3.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": -0.1},
        {"presence_penalty": 9},
        {"logit_bias": {"1": 500}},
        {"logit_bias": {"not-a-token": 1}},
        {"stop": ["x"] * 17},
    ],
)
async def test_llama_cpp_cve_2026_21869_pass_through_parameters_out_of_range_are_400(
    client: httpx.AsyncClient, echo: FakeBackend, extra: dict[str, Any]
) -> None:
    before = len(echo.seen)
    r = await client.post("/v1/chat/completions", json=chat(**extra), headers=auth(Keys.team_a))
    assert r.status_code == 400
    assert len(echo.seen) == before  # never reached the engine
