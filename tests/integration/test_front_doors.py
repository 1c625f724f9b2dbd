"""End to end through each front door of one ``lockgate serve``: the official ``ollama``
client and the OpenAI SDK's Responses API on the real model, and the fake backend
selected by configuration (``backend: fake``) for the failure paths."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

from gateway.tenancy.keys import key_hash, new_key
from tests.integration.conftest import Server, lockgate, stop

pytestmark = pytest.mark.integration

KEY = new_key()
CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  log_level: warning
models:
  - name: gemma
    n_ctx: 512
    max_sequences: 4
  - name: echo
    backend: fake
  - name: fail_mid_stream
    backend: fake
auth:
  database: DATABASE  # its own: the session's shared one would turn auth on for the others
tenants:
  - id: doors
    keys:
      - id: doors-key
        hash: "HASH"
""".replace("HASH", key_hash(KEY))


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("doors")
    server = lockgate(CONFIG.replace("DATABASE", str(root / "doors.db")), root)
    yield server
    stop(server)


@pytest.fixture
def ol(doors: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=doors.base_url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture
def sdk(doors: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{doors.base_url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def test_ollama_list_show_ps(ol: ollama.Client) -> None:
    assert {"gemma", "echo"} <= {m.model for m in ol.list().models}
    shown = ol.show("gemma")
    assert shown.details is not None
    assert shown.details.family == "gemma3"
    assert shown.details.quantization_level == "Q4_K_M"
    assert shown.modelinfo is not None and shown.modelinfo["gemma3.context_length"] == 512
    loaded = {m.model: m for m in ol.ps().models}
    assert loaded["gemma"].size and loaded["gemma"].size > 100_000_000


def test_ollama_chat_whole_and_streamed(ol: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = ol.chat(model="gemma", messages=messages, stream=False, options={"num_predict": 8})
    assert whole.done
    assert whole.prompt_eval_count and whole.prompt_eval_count > 3
    assert whole.eval_count and 0 < whole.eval_count <= 8
    assert whole.eval_duration and whole.prompt_eval_duration and whole.total_duration
    assert whole.total_duration > whole.eval_duration
    parts = list(
        ol.chat(
            model="gemma", messages=messages, stream=True, options={"num_predict": 8, "seed": 1}
        )
    )
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count and 0 < parts[-1].eval_count <= 8
    assert sum(1 for p in parts if p.message.content) <= parts[-1].eval_count


def test_ollama_generate_and_embed(ol: ollama.Client) -> None:
    out = ol.generate(model="gemma", prompt="The sky is", raw=True, options={"num_predict": 6})
    assert out.done and isinstance(out.response, str)
    vectors = ol.embed(model="gemma", input=["a lighthouse", "a harbour"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 640


def test_ollama_refusals(doors: Server, ol: ollama.Client) -> None:
    with (
        ollama.Client(host=doors.base_url) as anonymous,
        pytest.raises(ollama.ResponseError) as no_key,
    ):
        anonymous.list()
    assert no_key.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as unknown:
        ol.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert unknown.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as pulled:
        ol.pull("gemma")
    assert pulled.value.status_code == 404


def test_responses_whole_and_streamed(sdk: openai.OpenAI) -> None:
    r = sdk.responses.create(model="gemma", input="Say hello.", max_output_tokens=8)
    assert r.status in ("completed", "incomplete")
    assert isinstance(r.output_text, str)
    assert r.usage is not None and r.usage.output_tokens <= 8
    events = list(
        sdk.responses.create(model="gemma", input="Hi.", max_output_tokens=8, stream=True)
    )
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    last = events[-1]
    # At max_output_tokens OpenAI ends with response.incomplete (the SDK's stream helper then
    # has no final response: it waits for response.completed only), else response.completed.
    assert last.type in ("response.completed", "response.incomplete")
    assert last.response.output_text == "".join(deltas)
    assert last.response.usage is not None and last.response.usage.output_tokens <= 8


def test_the_fake_backend_by_config_serves_real_http(doors: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": "one two"}]}
    r = httpx.post(f"{doors.base_url}/v1/chat/completions", json=body, headers=headers)
    assert r.json()["choices"][0]["message"]["content"] == "one two"
    assert r.headers["x-lockgate-backend"] == "fake"
    failing = {**body, "model": "fail_mid_stream", "stream": True}
    failing["messages"] = [{"role": "user", "content": "a b c d"}]
    r = httpx.post(f"{doors.base_url}/v1/chat/completions", json=failing, headers=headers)
    assert r.status_code == 200
    assert '"error"' in r.text and r.text.endswith("data: [DONE]\n\n")
