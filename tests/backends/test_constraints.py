"""response_format: what the embedded engine refuses and caches (on the real model's
vocabulary), and what remote engines are sent."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from backends.base import (
    ChatMessage,
    GenerationRequest,
    InvalidRequestError,
    ResponseFormat,
    SamplingParams,
)
from backends.llama.constraints import MAX_SCHEMA_BYTES, Constraints
from backends.llama.native import LlamaModel
from backends.model_store import default_model_path
from backends.ollama import OllamaOptions, ollama_body
from backends.openai_compat import request_body

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.fixture(scope="module")
def constraints() -> Iterator[Constraints]:
    model = LlamaModel(default_model_path(progress=False))
    yield Constraints(model)
    model.close()


async def test_matchers_are_compiled_once_per_schema(constraints: Constraints) -> None:
    first = await constraints.matcher(ResponseFormat("json_schema", schema=PERSON))
    again = await constraints.matcher(ResponseFormat("json_schema", schema=dict(PERSON)))
    assert first is not again  # a fresh copy for each sequence (matchers hold state)
    assert len(constraints._cache) == 1
    await constraints.matcher(ResponseFormat("json_object"))
    assert len(constraints._cache) == 2


async def test_what_cannot_be_enforced_is_a_400_naming_it(constraints: Constraints) -> None:
    deep: dict[str, object] = {"type": "string"}
    for _ in range(30):
        deep = {"type": "array", "items": deep}
    huge = {"type": "object", "description": "x" * MAX_SCHEMA_BYTES}
    unique = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    for fmt, said in [
        (ResponseFormat("json_schema", schema=deep), "nests deeper"),
        (ResponseFormat("json_schema", schema=huge), "KiB"),
        (ResponseFormat("json_schema", schema=unique, strict=True), "uniqueItems"),
        (ResponseFormat("json_schema", schema={"$ref": "#/$defs/nope"}), "does not exist"),
    ]:
        with pytest.raises(InvalidRequestError, match=said) as refused:
            await constraints.matcher(fmt)
        assert refused.value.param == "response_format"
    # Without strict, what cannot be enforced is left out (best effort).
    assert await constraints.matcher(ResponseFormat("json_schema", schema=unique))


def test_remote_engines_are_sent_the_format_in_their_own_shape() -> None:
    fmt = ResponseFormat("json_schema", schema=PERSON, name="person", strict=True)
    request = GenerationRequest(
        "r", SamplingParams(), messages=(ChatMessage("user", "hi"),), response_format=fmt
    )
    body = request_body(request, "up")
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    _, native = ollama_body(request, "m", OllamaOptions(num_ctx=2048, keep_alive="5m"))
    assert native["format"] == PERSON
    plain = GenerationRequest("r", SamplingParams(), prompt="x",
                              response_format=ResponseFormat("json_object"))  # fmt: skip
    assert request_body(plain, "up")["response_format"] == {"type": "json_object"}
    assert (
        ollama_body(plain, "m", OllamaOptions(num_ctx=2048, keep_alive="5m"))[1]["format"] == "json"
    )
    assert json.dumps(body)  # all plain JSON
