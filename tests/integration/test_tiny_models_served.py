"""Llama and Qwen2 served end to end: ``lockgate serve`` on tiny random-weight GGUFs of
those architectures (tests/tiny_gguf.py, written at test time), through the OpenAI SDK.

Random weights say nothing, so what is checked is what does not depend on them: chats
render with the family's template and run, a forced tool call is a valid call of a
declared function, and a JSON Schema answer parses and validates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from tests.integration.conftest import Server, lockgate, stop
from tests.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.integration

CONFIG = """
server: {{host: 127.0.0.1, port: {port}, log_level: warning}}
models:
  - {{name: tiny-llama, path: 'LLAMA', n_ctx: 1024, max_sequences: 4, threads: 1}}
  - {{name: tiny-qwen, path: 'QWEN', n_ctx: 1024, max_sequences: 4, threads: 1}}
"""
MODELS = ["tiny-llama", "tiny-qwen"]
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"kind": {"type": "string", "enum": ["user", "system", "name"]}},
            "required": ["kind"],
            "additionalProperties": False,
        },
    },
}
CHOICE = {
    "type": "object",
    "properties": {"pick": {"enum": ["the", "world", "you"]}, "ok": {"type": "boolean"}},
    "required": ["pick", "ok"],
    "additionalProperties": False,
}
HELLO = [{"role": "system", "content": "You are the system."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def tiny_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("tiny-models")
    llama = write_tiny_gguf(root / "tiny-llama.gguf", "llama")
    qwen = write_tiny_gguf(root / "tiny-qwen.gguf", "qwen2")
    text = CONFIG.replace("LLAMA", str(llama)).replace("QWEN", str(qwen))
    server = lockgate(text, root)
    yield server
    stop(server)


@pytest.fixture
def client(tiny_gateway: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tiny_gateway.base_url}/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.mark.parametrize("model", MODELS)
def test_chat_runs_in_the_family_template(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=6, n=1)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.completion_tokens <= 6
    assert r.choices[0].finish_reason in ("stop", "length")
    # The templates' golden token sequences are in tests/backends/test_tiny_models.py;
    # here the count proves the same template served: llama adds <|begin_of_text|>.
    assert r.usage.prompt_tokens == {"tiny-llama": 24, "tiny-qwen": 22}[model]


@pytest.mark.parametrize("model", MODELS)
def test_a_forced_tool_call_is_valid(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=HELLO, tools=[LOOKUP], tool_choice="required",  # type: ignore[arg-type, list-item]
        parallel_tool_calls=False, max_tokens=64, temperature=1.0, seed=4,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "lookup"
    jsonschema.validate(json.loads(call.function.arguments), LOOKUP["function"]["parameters"])  # type: ignore[index]


@pytest.mark.parametrize("model", MODELS)
def test_json_schema_and_json_mode(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=48, temperature=0.7, seed=2,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CHOICE}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), CHOICE)
    r = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=48, temperature=0.7, seed=2,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
    )  # fmt: skip
    text = r.choices[0].message.content or ""
    if r.choices[0].finish_reason == "stop":  # random weights may ramble to max_tokens
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


@pytest.mark.parametrize(("model", "family"), [("tiny-llama", "llama"), ("tiny-qwen", "qwen2")])
def test_the_architectures_are_what_serves(tiny_gateway: Server, model: str, family: str) -> None:
    shown = httpx.post(f"{tiny_gateway.base_url}/api/show", json={"model": model}).json()
    assert shown["details"]["family"] == family
