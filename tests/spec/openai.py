"""Validate a body or streamed event against OpenAI's published component schema.

    validate("CreateChatCompletionResponse", response.json())

The schemas are a pinned extract of openai/openai-openapi (see
extract_openai_schemas.py); JSON Schema 2020-12, as OpenAPI 3.1 uses.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema


@functools.cache
def _document() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(__file__).with_name("openai_schemas.json").read_text())
    return data


def _nullable(keyword: str) -> Any:
    """``keyword``'s draft check, passing null where the schema still says OpenAPI 3.0's
    ``nullable: true`` (a few of OpenAI's schemas do; JSON Schema has no such keyword)."""
    check = jsonschema.Draft202012Validator.VALIDATORS[keyword]

    def validate(
        validator: Any, value: Any, instance: Any, schema: dict[str, Any]
    ) -> Iterator[jsonschema.ValidationError]:
        if instance is None and schema.get("nullable") is True:
            return
        yield from check(validator, value, instance, schema)

    return validate


_OpenAIValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"type": _nullable("type"), "enum": _nullable("enum")}
)


@functools.cache
def _validator(name: str) -> Any:
    doc = _document()
    schema = {"components": doc["components"], "$ref": f"#/components/schemas/{name}"}
    return _OpenAIValidator(schema)


def _branch(name: str, instance: Any) -> str:
    """For a union with a discriminator (ResponseStreamEvent: ``type``), the member that
    the instance names, so that a failure is reported against it, not the whole union."""
    schemas = _document()["components"]["schemas"]
    prop = schemas[name].get("discriminator", {}).get("propertyName")
    if prop is None or not isinstance(instance, dict):
        return name
    for member in schemas[name].get("anyOf", ()):
        member_name = member["$ref"].rsplit("/", 1)[-1]
        if schemas[member_name].get("properties", {}).get(prop, {}).get("enum") == [
            instance.get(prop)
        ]:
            return member_name
    return name


def validate(name: str, instance: Any) -> None:
    """Raise, naming the first violation, if ``instance`` is not a valid ``name``."""
    name = _branch(name, instance)
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(instance))
    if error is not None:
        # best_match descends into anyOf/oneOf to the branch that came closest.
        where = "/".join(str(p) for p in error.absolute_path) or "(top)"
        raise AssertionError(f"not a valid {name}: at {where}: {error.message[:500]}")
