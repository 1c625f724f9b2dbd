"""OpenAI's Responses API, text subset: the request model, the Response object, the events.

What is served: ``input`` as a string or a list of messages, ``instructions``,
``max_output_tokens``, ``temperature``, ``top_p``, ``stream``, ``metadata``,
``user``; usage in the Response. Nothing is stored (every response behaves as
``store: false``), so ``previous_response_id`` is refused; so are tools, reasoning
and every other field, each by name, with a 400 — never ignored. ``text.format``
may ask for JSON (``json_object``, or ``json_schema`` with its ``name`` and ``schema``):
decoding is constrained as for chat's ``response_format``.

A stream is the typed SSE events the OpenAI SDK parses, each with its
``sequence_number``: ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``..., then the ``.done`` events and
``response.completed`` (or ``response.incomplete`` at ``max_output_tokens``, or
``response.failed``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import ConfigDict, Field, field_validator, model_validator

from backends.base import ChatMessage, GenerationChunk, ResponseFormat, SamplingParams
from gateway.errors import ErrorInfo
from gateway.events import Finished, Result, Started
from gateway.protocol.wire import (
    UNSET_MAX_TOKENS_CHARGE,
    StrictBody,
    estimate_tokens,
    new_id,
    output_format,
)

# Accepted by OpenAI, refused here by name: the text subset does not do them.
UNSUPPORTED = (
    "previous_response_id",  # nothing is stored
    "conversation",
    "tools",
    "tool_choice",
    "reasoning",
    "background",
    "include",
    "prompt",
    "max_tool_calls",
    "top_logprobs",
    "truncation",
    "service_tier",
    "prompt_cache_key",
)


class ContentIn(StrictBody):
    type: Literal["input_text", "output_text", "text"]
    text: str
    # What an earlier response's output carries, fed back as input (store: false chats).
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class MessageIn(StrictBody):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentIn]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def flatten(self) -> ChatMessage:
        text = (
            self.content if isinstance(self.content, str) else "".join(c.text for c in self.content)
        )
        return ChatMessage("system" if self.role == "developer" else self.role, text)


class TextFormat(StrictBody):
    """``text.format``: plain text, any JSON object, or JSON of a schema (flat, unlike
    chat's ``response_format.json_schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] | None = (
        None
    )
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs a name and a schema")
        return self

    def spec(self) -> ResponseFormat | None:
        return output_format(self.type, schema=self.schema_, name=self.name, strict=self.strict)

    def echo(self) -> dict[str, Any]:
        """The format as the Response object repeats it."""
        return self.model_dump(by_alias=True, exclude_none=True)


class TextOptions(StrictBody):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(StrictBody):
    """Unknown fields are errors here (``extra: forbid``), named in the 400."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: Annotated[str, Field(min_length=1)]
    input: str | Annotated[list[MessageIn], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    stream: bool = False
    store: bool | None = None  # accepted; nothing is ever stored
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    stream_options: dict[str, Any] | None = None
    # The fields OpenAI has and this subset refuses, each with its own message.
    previous_response_id: Any = None
    conversation: Any = None
    tools: Any = None
    tool_choice: Any = None
    reasoning: Any = None
    background: Any = None
    include: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    truncation: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _refused(cls, value: Any) -> Any:
        # An SDK may send the neutral value (tools: [], truncation: "disabled"): that is no ask.
        if value not in (None, [], "disabled", "auto", False):
            raise ValueError("not supported by this server (the text subset of the Responses API)")
        return value

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        system = (ChatMessage("system", self.instructions),) if self.instructions else ()
        if isinstance(self.input, str):
            return (*system, ChatMessage("user", self.input))
        return (*system, *(m.flatten() for m in self.input))

    def output_format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text is not None else None
        return None if fmt is None else fmt.spec()

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p
        )

    def token_charge(self, messages: tuple[ChatMessage, ...]) -> int:
        prompt = sum(estimate_tokens(m.content) + 4 for m in messages)
        return prompt + (self.max_output_tokens or UNSET_MAX_TOKENS_CHARGE)


# -- the Response object ---------------------------------------------------------


def _usage(finished: Finished) -> dict[str, Any]:
    return {
        "input_tokens": finished.prompt_tokens,
        "input_tokens_details": {"cached_tokens": finished.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": finished.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseShape:
    """The constant part of one Response (its request's settings), built once."""

    def __init__(self, body: ResponsesRequest) -> None:
        self.request = body
        self.response_id = ""
        self.message_id = new_id("msg", "_")
        self.created = 0
        self.model = body.model
        fmt = body.text.format if body.text is not None else None
        self._format = {"type": "text"} if fmt is None else fmt.echo()

    def start(self, started: Started) -> None:
        self.response_id = started.request_id
        self.created = started.created
        self.model = started.model

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [_text_part(text)] if status != "in_progress" else []
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(
        self,
        status: str,
        *,
        output: list[dict[str, Any]],
        finished: Finished | None = None,
        error: ErrorInfo | None = None,
    ) -> dict[str, Any]:
        b = self.request
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": self.created + round(finished.timings.total)
            if finished is not None and status == "completed"
            else None,
            "error": None
            if error is None
            else {"code": _error_code(error), "message": error.message},
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True if b.parallel_tool_calls is None else b.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": 1.0 if b.temperature is None else b.temperature,
            "top_p": 1.0 if b.top_p is None else b.top_p,
            "text": {"format": self._format},
            "tool_choice": "auto",
            "tools": [],
            "truncation": "disabled",
            "metadata": b.metadata or {},
            **({"usage": _usage(finished)} if finished is not None else {}),
            **({"user": b.user} if b.user is not None else {}),
        }


def _error_code(info: ErrorInfo) -> str:
    # ResponseErrorCode is a closed enum: the nearest of its values.
    if info.status == 429:
        return "rate_limit_exceeded"
    return "invalid_prompt" if 400 <= info.status < 500 else "server_error"


def response_body(shape: ResponseShape, result: Result) -> dict[str, Any]:
    """A non-streamed Response."""
    shape.start(result.started)
    choice = result.choices[0]
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    message = shape.message("".join(choice.text), status)
    return shape.response(status, output=[message], finished=result.finished)


class ResponseEvents:
    """The typed SSE events of one streamed Response."""

    media_type = b"text/event-stream; charset=utf-8"

    def __init__(self, shape: ResponseShape) -> None:
        self._shape = shape
        self._sequence = 0
        self._text: list[str] = []
        self._status = "completed"
        self._delta_head = b""

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        payload = orjson.dumps({"type": kind, "sequence_number": self._sequence, **fields})
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    def start(self, started: Started) -> bytes:
        shape = self._shape
        shape.start(started)
        pending = shape.response("in_progress", output=[])
        item = shape.message("", "in_progress")
        part = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
        self._delta_head = orjson.dumps(part)[1:-1]
        return b"".join(
            (
                self._event("response.created", {"response": pending}),
                self._event("response.in_progress", {"response": pending}),
                self._event("response.output_item.added", {"output_index": 0, "item": item}),
                self._event("response.content_part.added", {**part, "part": _text_part("")}),
            )
        )

    def delta(self, index: int, chunk: GenerationChunk) -> bytes:
        if chunk.finish_reason == "length":
            self._status = "incomplete"
        if not chunk.text:
            return b""
        self._text.append(chunk.text)
        # The envelope is the same for every delta: only the text and number change.
        payload = (
            b'{"type":"response.output_text.delta","sequence_number":%d,' % self._sequence
            + self._delta_head
            + b',"delta":'
            + orjson.dumps(chunk.text)
            + b',"logprobs":[]}'
        )
        self._sequence += 1
        return b"event: response.output_text.delta\ndata: " + payload + b"\n\n"

    def finish(self, finished: Finished) -> bytes:
        shape, text = self._shape, "".join(self._text)
        part = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
        item = shape.message(text, self._status)
        done = shape.response(self._status, output=[item], finished=finished)
        last = "response.completed" if self._status == "completed" else "response.incomplete"
        return b"".join(
            (
                self._event("response.output_text.done", {**part, "text": text, "logprobs": []}),
                self._event("response.content_part.done", {**part, "part": _text_part(text)}),
                self._event("response.output_item.done", {"output_index": 0, "item": item}),
                self._event(last, {"response": done}),
            )
        )

    def fail(self, info: ErrorInfo) -> bytes:
        shape = self._shape
        item = shape.message("".join(self._text), "incomplete")
        failed = shape.response("failed", output=[item], error=info)
        return self._event("response.failed", {"response": failed})
