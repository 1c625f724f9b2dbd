"""What every wire format shares: the base of request models, the body parser, estimates.

Request models derive from :class:`WireModel`, which carries the one compatibility
rule: fields we do not know are ignored and logged at debug level — accepted, so
SDKs that send new parameters keep working, but never forwarded to an engine.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.base import ResponseFormat
from gateway.errors import InvalidRequest
from gateway.validation import first_problem

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# Limits charge prompt + max_tokens before the engine has tokenized anything: prompts are
# estimated at 4 characters a token, and without max_tokens a choice is charged 256.
# Both are reconciled with the engine's real counts when the request ends.
CHARS_PER_TOKEN = 4
UNSET_MAX_TOKENS_CHARGE = 256


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 1


def new_id(prefix: str, sep: str = "-") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex}"


class WireModel(BaseModel):
    # strict: no "5" for 5, no 1 for true — OpenAI refuses those, and a proxy in front that
    # reads the JSON as typed must not disagree with what the engine is asked to do.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    @model_validator(mode="after")
    def _drop_unknown_fields(self) -> WireModel:
        extra = self.__pydantic_extra__
        if extra:
            log.debug("ignoring unknown fields in %s: %s", type(self).__name__, sorted(extra))
            extra.clear()
        return self


class FunctionDef(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(WireModel):
    """A function tool, as OpenAI and Ollama both declare it."""

    type: Literal["function"]
    function: FunctionDef


def tool_definitions(tools: list[ToolDef] | None) -> tuple[dict[str, Any], ...]:
    """The declared tools as the engines take them: validated, unknown fields gone."""
    return tuple(t.model_dump(exclude_none=True) for t in tools or ())


class StrictBody(BaseModel):
    """A body whose unknown fields are errors (the admin API: a typo must not pass)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def parse(model: type[M], body: bytes) -> M:
    """Decode and validate a JSON body, raising :class:`InvalidRequest` (400)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    return parse_object(model, data)


def parse_object(model: type[M], data: object) -> M:
    """Validate a decoded JSON body (a batch line's ``body``), raising :class:`InvalidRequest`."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where, message = first_problem(exc)
        raise InvalidRequest(message, param=where) from None


def output_format(
    kind: str,
    *,
    schema: Mapping[str, Any] | None = None,
    name: str | None = None,
    strict: bool | None = None,
) -> ResponseFormat | None:
    """A door's format type (``text``, ``json_object``, ``json_schema``) as engines take it."""
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        return ResponseFormat("json_schema", schema=schema or {}, name=name, strict=strict)
    return None
