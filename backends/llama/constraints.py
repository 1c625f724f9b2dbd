"""Output constraints as llama.cpp grammars: ``response_format`` → GBNF.

    gbnf = Constraints().grammar(ResponseFormat("json_schema", schema={...}))

``json_object`` is llama.cpp's own JSON grammar (any object); ``json_schema`` is
converted by llama-cpp-python's port of llama.cpp's ``json-schema-to-grammar``.
Schemas are bounded before conversion — nesting depth and size — because the
converter recurses (deep nesting has crashed servers: llama.cpp #18988, #26600);
what it cannot express is a 400 that names the schema, never unconstrained text.
Keywords the converter does not enforce (``minimum``, ``maximum``, ``multipleOf``,
``uniqueItems``...) are a 400 when the request says ``strict: true``; without it they
are ignored (best effort, as OpenAI's non-strict mode). Converted grammars are cached
by the schema's canonical JSON.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from backends.base import InvalidRequestError, ResponseFormat

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 24
_CACHE_SIZE = 128
# JSON_GBNF's root is "object" already (llama.cpp's grammars/json.gbnf): any JSON object.


# What llama-cpp-python's converter turns into grammar; anything else it would ignore.
_HONOURED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "minLength", "maxLength", "pattern", "format", "enum", "const",
    "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
})  # fmt: skip
# Keywords that describe and constrain nothing.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "name", "strict",
})  # fmt: skip
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")


def unhonoured(node: Any, where: str = "") -> list[str]:
    """Keywords of ``node`` (a JSON Schema) the grammar cannot enforce, with their paths."""
    found: list[str] = []
    if not isinstance(node, Mapping):
        return found
    for key, value in node.items():
        at = f"{where}.{key}" if where else key
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            if key == "patternProperties":
                found.append(at)
            for name, sub in value.items():
                found += unhonoured(sub, f"{at}.{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                found += unhonoured(sub, f"{at}.{i}")
        elif key in ("items", "additionalProperties", "not", "if", "then", "else"):
            if key in ("not", "if", "then", "else"):
                found.append(at)
            found += unhonoured(value, at)
        elif key not in _HONOURED and key not in _ANNOTATIONS:
            found.append(at)
    return found


def _depth(node: Any, level: int = 0) -> int:
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(node, Mapping):
        return max((_depth(v, level + 1) for v in node.values()), default=level)
    if isinstance(node, list):
        return max((_depth(v, level + 1) for v in node), default=level)
    return level


class Constraints:
    def __init__(self) -> None:
        self._cache: OrderedDict[str, str] = OrderedDict()

    def grammar(self, fmt: ResponseFormat) -> str:
        if fmt.kind == "json_object":
            return JSON_GBNF
        if not isinstance(fmt.schema, Mapping):
            raise InvalidRequestError(
                "response_format.json_schema.schema must be a JSON Schema object",
                param="response_format",
            )
        key = json.dumps(fmt.schema, sort_keys=True, separators=(",", ":"))
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        if len(key) > MAX_SCHEMA_BYTES:
            raise InvalidRequestError(
                f"response_format: the schema is over {MAX_SCHEMA_BYTES // 1024} KiB",
                param="response_format",
            )
        if _depth(fmt.schema) > MAX_SCHEMA_DEPTH:
            raise InvalidRequestError(
                f"response_format: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels",
                param="response_format",
            )
        missing = unhonoured(fmt.schema)
        if missing and fmt.strict:
            raise InvalidRequestError(
                "response_format: with strict, every keyword must be enforced, and these"
                f" cannot be: {', '.join(missing[:8])} (send strict: false for best effort)",
                param="response_format",
            )
        try:
            gbnf: str = json_schema_to_gbnf(key)
        except (ValueError, KeyError, TypeError, AssertionError, NotImplementedError,
                RecursionError) as exc:  # fmt: skip
            raise InvalidRequestError(
                f"response_format: this JSON Schema is not supported ({exc})",
                param="response_format",
            ) from None
        self._cache[key] = gbnf
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return gbnf
