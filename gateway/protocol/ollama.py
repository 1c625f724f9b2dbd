"""Ollama's wire format: request models, response bodies, the NDJSON encoders, the error body.

As Ollama's own server answers (docs.ollama.com/api): a stream is one JSON object
per line, ``done: false`` until the last, which carries ``done_reason`` and the
counts and durations in nanoseconds; ``stream: false`` gives that last object
with the whole text. Durations are measured, none invented (``load_duration`` is
the wait for a slot, as Ollama's is the wait for its runner). Errors are
``{"error": "..."}`` with the HTTP status, or as a line once streaming began.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, field_validator, model_validator

from backends.base import (
    ChatMessage,
    GenerationChunk,
    ModelInfo,
    ResponseFormat,
    SamplingParams,
    ToolCall,
)
from gateway.errors import ErrorInfo
from gateway.events import Finished, Result, Started, Timings
from gateway.protocol.wire import (
    UNSET_MAX_TOKENS_CHARGE,
    ToolDef,
    WireModel,
    estimate_tokens,
    tool_definitions,
)

VERSION = "0.12.0"  # the Ollama API version this door follows, for clients that check


def _nanoseconds(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Options(WireModel):
    """The sampling ``options`` Ollama clients send; the rest (num_ctx, num_gpu...) are
    the server's business here and ignored like any unknown field."""

    num_predict: int | None = None  # -1: until the context is full; -2: fill it
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: Annotated[list[str], Field(max_length=16)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None

    def sampling(self) -> SamplingParams:
        limit = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        return SamplingParams(
            max_tokens=limit,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repeat_penalty=self.repeat_penalty,
            stop=tuple(self.stop or ()),
        )


class _Generating(WireModel):
    model: Annotated[str, Field(min_length=1)]
    stream: bool = True
    options: Options | None = None  # null is "none", as Ollama reads it
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None  # the gateway keeps its models loaded
    think: bool | str | None = None

    @field_validator("format")
    @classmethod
    def _json_or_a_schema(cls, value: str | dict[str, Any] | None) -> object:
        if isinstance(value, str) and value not in ("", "json"):  # "": none, as Ollama reads it
            raise ValueError('format must be "json" or a JSON Schema object')
        return value

    def output_format(self) -> ResponseFormat | None:
        """Ollama's ``format``: ``"json"`` for any JSON object, or a JSON Schema."""
        if isinstance(self.format, dict):
            return ResponseFormat("json_schema", schema=self.format)
        return ResponseFormat("json_object") if self.format == "json" else None

    @field_validator("think")
    @classmethod
    def _no_thinking(cls, value: bool | str | None) -> object:
        if value:
            raise ValueError("thinking is not supported by this server")
        return value

    def sampling(self) -> SamplingParams:
        return (self.options or Options()).sampling()

    def max_tokens_charge(self) -> int:
        return self.sampling().max_tokens or UNSET_MAX_TOKENS_CHARGE


class ToolFunctionIn(WireModel):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCallIn(WireModel):
    function: ToolFunctionIn


class MessageIn(WireModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # null is "none", as Ollama reads it
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None  # a tool turn: which tool answered

    @field_validator("images")
    @classmethod
    def _no_images(cls, value: list[str] | None) -> object:
        if value:
            raise ValueError("images are not supported by this server")
        return value


def _arguments(value: dict[str, Any] | str) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class ChatRequest(_Generating):
    # No messages: Ollama's way to load (or, with keep_alive 0, unload) a model.
    messages: Annotated[list[MessageIn], Field(max_length=100_000)] = Field(default_factory=list)
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        """The turns as engines take them. Ollama names a tool's answer by the tool, not by
        the call: each gets the id of the pending call to that tool (else the next pending
        one), so that OpenAI-style upstreams can pair them."""
        out: list[ChatMessage] = []
        pending: list[ToolCall] = []
        for i, m in enumerate(self.messages):
            calls = tuple(
                ToolCall(f"call_{i}_{j}", c.function.name, _arguments(c.function.arguments))
                for j, c in enumerate(m.tool_calls or ())
            )
            if calls:
                pending = list(calls)
            answered = None
            if m.role == "tool" and pending:
                match = next((c for c in pending if c.name == m.tool_name), pending[0])
                pending.remove(match)
                answered = match.id
            out.append(
                ChatMessage(
                    m.role,
                    m.content or "",
                    tool_calls=calls,
                    tool_call_id=answered,
                    name=m.tool_name,
                )
            )
        return tuple(out)

    def tool_definitions(self) -> tuple[dict[str, Any], ...]:
        """Ollama's tools are OpenAI's function tools, checked the same way."""
        return tool_definitions(self.tools)

    def token_charge(self, messages: Sequence[ChatMessage]) -> int:
        return sum(estimate_tokens(m.content) + 4 for m in messages) + self.max_tokens_charge()


class GenerateRequest(_Generating):
    prompt: str = ""
    system: str | None = None
    raw: bool = False  # the prompt as is, no template
    suffix: str | None = None
    images: list[str] | None = None
    context: list[int] | None = None

    @field_validator("suffix", "images", "context")
    @classmethod
    def _unsupported(cls, value: object) -> object:
        if value:
            raise ValueError("not supported by this server")
        return value

    def chat_messages(self) -> tuple[ChatMessage, ...] | None:
        """Unless ``raw``, the prompt is a user turn (and ``system`` a system turn), as
        Ollama renders it with the model's template."""
        if self.raw:
            return None
        system = (ChatMessage("system", self.system),) if self.system else ()
        return (*system, ChatMessage("user", self.prompt))

    def token_charge(self) -> int:
        return estimate_tokens(self.prompt + (self.system or "")) + self.max_tokens_charge()


class EmbedRequest(WireModel):
    model: Annotated[str, Field(min_length=1)]
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    truncate: bool = True
    keep_alive: float | str | None = None
    dimensions: int | None = None

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> object:
        if value is not None:
            raise ValueError("dimensions is not supported by this server")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingsRequest(WireModel):
    """The legacy ``/api/embeddings``: one ``prompt``, one ``embedding``."""

    model: Annotated[str, Field(min_length=1)]
    prompt: str
    keep_alive: float | str | None = None


class ShowRequest(WireModel):
    model: str = ""
    name: str = ""  # the older clients' name for it
    verbose: bool = False

    @model_validator(mode="after")
    def _named(self) -> ShowRequest:
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self

    @property
    def model_name(self) -> str:
        return self.model or self.name


# -- responses -----------------------------------------------------------------


def error_body(info: ErrorInfo) -> bytes:
    return orjson.dumps({"error": info.message})


def _done_fields(finished: Finished, reason: str) -> dict[str, Any]:
    t: Timings = finished.timings
    return {
        "done": True,
        "done_reason": reason,
        "total_duration": _nanoseconds(t.total),
        "load_duration": _nanoseconds(t.queued),
        "prompt_eval_count": finished.prompt_tokens,
        "prompt_eval_duration": _nanoseconds(t.prefill),
        "eval_count": finished.completion_tokens,
        "eval_duration": _nanoseconds(t.decode),
    }


def _tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    out = []
    for c in calls:
        try:
            arguments = json.loads(c.arguments) if c.arguments else {}
        except ValueError:
            arguments = {"_raw": c.arguments}  # not JSON: kept whole, never dropped
        out.append({"function": {"name": c.name, "arguments": arguments}})
    return out


def _reason(reason: str) -> str:
    return "stop" if reason == "tool_calls" else reason  # Ollama says "stop" for tool calls


def loaded(model: str, *, chat: bool, keep_alive: float | str | None) -> dict[str, Any]:
    """The answer to a request with nothing to generate: Ollama's load (or unload) call.
    Here every configured model stays loaded, so it is done at once."""
    unload = keep_alive in (0, "0", "0s", "0m")
    text = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return {
        "model": model,
        "created_at": _now(),
        **text,
        "done": True,
        "done_reason": "unload" if unload else "load",
    }


def chat_response(result: Result) -> dict[str, Any]:
    choice = result.choices[0]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(choice.text)}
    if choice.tool_calls:
        message["tool_calls"] = _tool_calls(choice.tool_calls)
    return {
        "model": result.started.model,
        "created_at": _now(),
        "message": message,
        **_done_fields(result.finished, _reason(choice.finish_reason)),
    }


def generate_response(result: Result) -> dict[str, Any]:
    choice = result.choices[0]
    return {
        "model": result.started.model,
        "created_at": _now(),
        "response": "".join(choice.text),
        **_done_fields(result.finished, _reason(choice.finish_reason)),
    }


class _Lines:
    """Ollama's NDJSON stream: a line per chunk, then the ``done`` line."""

    media_type = b"application/x-ndjson"

    def __init__(self) -> None:
        self._model = ""
        self._reason = "stop"

    def start(self, started: Started) -> bytes:
        self._model = started.model
        return b""

    def _line(self, fields: dict[str, Any]) -> bytes:
        return orjson.dumps({"model": self._model, "created_at": _now(), **fields}) + b"\n"

    def _piece(self, chunk: GenerationChunk) -> dict[str, Any]:
        raise NotImplementedError

    def _last(self) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, index: int, chunk: GenerationChunk) -> bytes:
        if chunk.finish_reason is not None:
            self._reason = _reason(chunk.finish_reason)
        if not chunk.text and not chunk.tool_calls:
            return b""
        return self._line({**self._piece(chunk), "done": False})

    def finish(self, finished: Finished) -> bytes:
        return self._line({**self._last(), **_done_fields(finished, self._reason)})

    def fail(self, info: ErrorInfo) -> bytes:
        return error_body(info) + b"\n"


class ChatLines(_Lines):
    def _piece(self, chunk: GenerationChunk) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": chunk.text}
        if chunk.tool_calls:
            message["tool_calls"] = _tool_calls(chunk.tool_calls)
        return {"message": message}

    def _last(self) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": ""}}


class GenerateLines(_Lines):
    def _piece(self, chunk: GenerationChunk) -> dict[str, Any]:
        return {"response": chunk.text}

    def _last(self) -> dict[str, Any]:
        return {"response": ""}


def _details(info: ModelInfo) -> dict[str, Any]:
    params = info.parameters
    if params is None:
        size = ""
    elif params >= 1e9:
        size = f"{params / 1e9:.1f}B"
    else:
        size = f"{params / 1e6:.0f}M"
    return {
        "parent_model": "",
        "format": "gguf" if info.family else "",
        "family": info.family or "",
        "families": [info.family] if info.family else None,
        "parameter_size": size,
        "quantization_level": info.quantization or "",
    }


def model_entry(name: str, created: int, info: ModelInfo) -> dict[str, Any]:
    """One model of ``/api/tags``."""
    return {
        "name": name,
        "model": name,
        "modified_at": datetime.fromtimestamp(created, UTC).isoformat(),
        "size": info.size_bytes or 0,
        "digest": "",
        "details": _details(info),
    }


def running_entry(name: str, info: ModelInfo) -> dict[str, Any]:
    """One model of ``/api/ps``: loaded for as long as the gateway runs."""
    return {
        "name": name,
        "model": name,
        "size": info.size_bytes or 0,
        "digest": "",
        "details": _details(info),
        "expires_at": "9999-12-31T23:59:59Z",
        "size_vram": 0,
        "context_length": info.context_length or 0,
    }


def show_response(created: int, info: ModelInfo) -> dict[str, Any]:
    capabilities = ["completion", "embedding"]
    model_info: dict[str, Any] = {"general.architecture": info.family or ""}
    if info.parameters is not None:
        model_info["general.parameter_count"] = info.parameters
    if info.family and info.context_length:
        model_info[f"{info.family}.context_length"] = info.context_length
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(info),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": datetime.fromtimestamp(created, UTC).isoformat(),
    }
