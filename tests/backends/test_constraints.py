"""response_format → GBNF: what is refused, what is cached, and what remote engines are sent."""

from __future__ import annotations

import json

import pytest

from backends.base import (
    ChatMessage,
    GenerationRequest,
    InvalidRequestError,
    ResponseFormat,
    SamplingParams,
)
from backends.llama.constraints import MAX_SCHEMA_BYTES, Constraints, unhonoured
from backends.ollama import OllamaOptions, ollama_body
from backends.openai_compat import request_body

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_unenforced_keywords_are_found_with_their_paths() -> None:
    schema = {
        "type": "object",
        "title": "ignored: an annotation",
        "properties": {
            "age": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "any": {"anyOf": [{"type": "number", "multipleOf": 2}, {"type": "null"}]},
        },
        "$defs": {"x": {"type": "string", "not": {"const": "a"}}},
    }
    assert unhonoured(schema) == [
        "properties.age.minimum",
        "properties.tags.uniqueItems",
        "properties.any.anyOf.0.multipleOf",
        "$defs.x.not",
    ]
    assert unhonoured(PERSON) == []


def test_grammars_are_built_once_and_bad_schemas_are_400s() -> None:
    c = Constraints()
    first = c.grammar(ResponseFormat("json_schema", schema=PERSON))
    assert c.grammar(ResponseFormat("json_schema", schema=dict(PERSON))) is first  # cached
    assert "root" in c.grammar(ResponseFormat("json_object"))
    deep: dict[str, object] = {"type": "string"}
    for _ in range(30):
        deep = {"type": "array", "items": deep}
    huge = {"type": "object", "description": "x" * MAX_SCHEMA_BYTES}
    strict_bounded = ResponseFormat("json_schema", schema={"type": "integer", "maximum": 3},
                                    strict=True)  # fmt: skip
    for fmt, said in [
        (ResponseFormat("json_schema", schema=deep), "nests deeper"),
        (ResponseFormat("json_schema", schema=huge), "KiB"),
        (strict_bounded, "maximum"),
        (ResponseFormat("json_schema", schema={"$ref": "#/$defs/nope"}), "not supported"),
    ]:
        with pytest.raises(InvalidRequestError, match=said) as refused:
            c.grammar(fmt)
        assert refused.value.param == "response_format"
    # Without strict, what cannot be enforced is left out (best effort).
    assert c.grammar(ResponseFormat("json_schema", schema={"type": "integer", "maximum": 3}))


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
