"""OpenAI's wire format: request models, response bodies, the SSE encoders, the error body.

Responses are built as plain dicts and serialized once with orjson; the stream
encoders pre-render the constant part of every chunk, so each token costs one
small ``orjson.dumps`` of its text. Bodies and chunks follow the component schemas
OpenAI publishes (``CreateChatCompletionResponse``, ``CreateChatCompletionStreamResponse``
...; tests/conformance checks them against a pinned copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, model_validator

from backends.base import (
    ChatMessage,
    GenerationChunk,
    ResponseFormat,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
)
from gateway.errors import ErrorInfo, InvalidRequest
from gateway.events import Finished, Result, Started
from gateway.protocol.logprobs import chat_logprobs, text_logprobs
from gateway.protocol.wire import (
    UNSET_MAX_TOKENS_CHARGE,
    ToolDef,
    WireModel,
    estimate_tokens,
    output_format,
    tool_definitions,
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(WireModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call being answered

    def flatten(self) -> ChatMessage:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(part.text for part in self.content)
        # "developer" is OpenAI's new name for the system role.
        role = "system" if self.role == "developer" else self.role
        calls = tuple(
            ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ()
        )
        return ChatMessage(
            role=role,
            content=text,
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
            name=self.name,
        )


class StreamOptions(WireModel):
    include_usage: bool = False


class JsonSchemaSpec(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormatIn(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormatIn:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self

    def spec(self) -> ResponseFormat | None:
        spec = self.json_schema
        if spec is None:
            return output_format(self.type)
        return output_format(self.type, schema=spec.schema_ or {}, name=spec.name,
                             strict=spec.strict)  # fmt: skip


class _SamplingFields(WireModel):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # extension
    min_p: Probability | None = None  # extension
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatIn | None = None

    def output_format(self) -> ResponseFormat | None:
        return None if self.response_format is None else self.response_format.spec()

    @model_validator(mode="after")
    def _check_combinations(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def _logprobs(self) -> int | None:
        """None: no log probabilities; k: the sampled token's and the k likeliest."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _completion_limit(self) -> int | None:
        return self.max_tokens

    def sampling(self, *, choice: int = 0) -> SamplingParams:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidRequest(
                    f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                ) from None
        seed = self.seed
        if seed is not None and choice:
            seed += choice  # n > 1 with a seed: distinct yet reproducible choices
        return SamplingParams(
            max_tokens=self._completion_limit(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
            stop=stops,
            logprobs=self._logprobs(),
        )


class FunctionName(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        forced = isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required"
        if forced and not self.tools:
            raise ValueError("tool_choice requires tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if all(t.function.name != name for t in self.tools or ()):
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return self

    def tool_definitions(self) -> tuple[dict[str, Any], ...]:
        return tool_definitions(self.tools)

    def choice_of_tool(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(m.flatten() for m in self.messages)

    def token_charge(self, messages: tuple[ChatMessage, ...]) -> int:
        """Prompt estimate + ``n`` x the completion limit, for admission."""
        prompt = sum(estimate_tokens(m.content) + 4 for m in messages)  # + the turn markup
        return prompt + self.n * (self._completion_limit() or UNSET_MAX_TOKENS_CHARGE)


class CompletionRequest(_SamplingFields):
    # A list is a batch; capped so that one request cannot take every sequence slot.
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=16)]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # OpenAI's legacy maximum

    def _logprobs(self) -> int | None:
        return self.logprobs

    def _completion_limit(self) -> int | None:
        # OpenAI's legacy completions default to 16 tokens, not "until the context is full".
        return 16 if self.max_tokens is None else self.max_tokens

    @model_validator(mode="after")
    def _check_echo(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def token_charge(self) -> int:
        """Per prompt: its estimate + ``n`` x ``max_tokens``, for admission."""
        limit = self._completion_limit() or UNSET_MAX_TOKENS_CHARGE
        return sum(estimate_tokens(p) + self.n * limit for p in self.prompts())


class EmbeddingRequest(WireModel):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def token_charge(self) -> int:
        return sum(estimate_tokens(t) for t in self.texts())


# -- responses -----------------------------------------------------------------


def error_body(info: ErrorInfo) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's error shape."""
    return orjson.dumps(
        {
            "error": {
                "message": info.message,
                "type": info.type,
                "param": info.param,
                "code": info.code,
            }
        }
    )


def usage(finished: Finished) -> dict[str, Any]:
    prompt, completion = finished.prompt_tokens, finished.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }


def _message(text: str, calls: Sequence[ToolCall]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if calls:
        # OpenAI sends content null when the turn is only tool calls.
        message["content"] = text or None
        message["tool_calls"] = [c.as_openai() for c in calls]
    return message


def _completion(result: Result, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    started, finished = result.started, result.finished
    return {
        "id": started.request_id,
        "object": obj,
        "created": started.created,
        "model": started.model,
        "choices": choices,
        "usage": usage(finished),
    }


def chat_completion(result: Result, *, logprobs: bool = False) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` body."""
    choices = [
        {
            "index": i,
            "message": _message("".join(c.text), c.tool_calls),
            "logprobs": chat_logprobs(c.logprobs) if logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for i, c in enumerate(result.choices)
    ]
    return _completion(result, "chat.completion", choices)


def text_completion(result: Result, *, logprobs: bool = False) -> dict[str, Any]:
    """A non-streamed ``text_completion`` body."""
    choices = [
        {
            "index": i,
            "text": "".join(c.text),
            "logprobs": text_logprobs(c.logprobs) if logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for i, c in enumerate(result.choices)
    ]
    return _completion(result, "text_completion", choices)


def embedding_list(*, model: str, vectors: Sequence[object], prompt_tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lockgate"}


DONE = b"data: [DONE]\n\n"


class _ChunkStream:
    """SSE events of one streamed completion; the envelope is serialized once per stream."""

    media_type = b"text/event-stream; charset=utf-8"
    _object = ""

    def __init__(self, *, choices: int, include_usage: bool) -> None:
        self._choices = choices
        self._include_usage = include_usage
        self._head = b""
        self._streamed_calls: set[int] = set()  # choices whose calls came as deltas

    def start(self, started: Started) -> bytes:
        head = orjson.dumps(
            {
                "id": started.request_id,
                "object": self._object,
                "created": started.created,
                "model": started.model,
            }
        )
        self._head = b"data: " + head[:-1] + b',"choices":['
        return b""

    def _choice(self, index: int, body: bytes) -> bytes:
        # No "usage": null on every chunk (OpenAI sends it, its own schema forbids it):
        # usage is in the last chunk only, when asked for.
        return self._head + b'{"index":%d,' % index + body + b"}]}\n\n"

    def _text(self, index: int, text: str, logprobs: Sequence[TokenLogprob]) -> bytes:
        raise NotImplementedError

    def _finish(self, index: int, reason: str) -> bytes:
        raise NotImplementedError

    def _tool_calls(self, index: int, calls: Sequence[ToolCall]) -> bytes:
        return b""

    def _tool_deltas(self, index: int, deltas: Sequence[ToolCallDelta]) -> bytes:
        return b""

    def delta(self, index: int, chunk: GenerationChunk) -> bytes:
        """One write per produced chunk: its text, tool calls and finish together."""
        out = b""
        if chunk.text or chunk.logprobs:
            out += self._text(index, chunk.text, chunk.logprobs)
        if chunk.tool_deltas:
            self._streamed_calls.add(index)
            out += self._tool_deltas(index, chunk.tool_deltas)
        elif chunk.tool_calls and index not in self._streamed_calls:
            out += self._tool_calls(index, chunk.tool_calls)
        if chunk.finish_reason is not None:
            out += self._finish(index, chunk.finish_reason)
        return out

    def finish(self, finished: Finished) -> bytes:
        if not self._include_usage:
            return DONE
        body = orjson.dumps(usage(finished))
        return self._head + b'],"usage":' + body + b"}\n\n" + DONE

    def fail(self, info: ErrorInfo) -> bytes:
        """The event sent when a stream fails after its status line went out."""
        return b"data: " + error_body(info) + b"\n\n" + DONE


class ChatStream(_ChunkStream):
    """``chat.completion.chunk`` events: a role chunk per choice first, then deltas."""

    _object = "chat.completion.chunk"

    def start(self, started: Started) -> bytes:
        super().start(started)
        role = b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null'
        return b"".join(self._choice(i, role) for i in range(self._choices))

    def _text(self, index: int, text: str, logprobs: Sequence[TokenLogprob]) -> bytes:
        probs = orjson.dumps(chat_logprobs(logprobs)) if logprobs else b"null"
        body = (
            b'"delta":{"content":' + orjson.dumps(text) + b'},"logprobs":'
            + probs + b',"finish_reason":null'
        )  # fmt: skip
        return self._choice(index, body)

    def _tool_calls(self, index: int, calls: Sequence[ToolCall]) -> bytes:
        """Whole tool calls in one delta (OpenAI may split arguments; clients join them)."""
        deltas = orjson.dumps([{"index": i, **c.as_openai()} for i, c in enumerate(calls)])
        return self._choice(
            index, b'"delta":{"tool_calls":' + deltas + b'},"logprobs":null,"finish_reason":null'
        )

    def _tool_deltas(self, index: int, deltas: Sequence[ToolCallDelta]) -> bytes:
        """OpenAI's pieces: a call's id, type and name first, then its arguments in parts."""
        out = []
        for d in deltas:
            function: dict[str, str] = {"arguments": d.arguments}
            piece: dict[str, Any] = {"index": d.index}
            if d.id is not None:
                piece.update(id=d.id, type="function")
                function = {"name": d.name or "", "arguments": d.arguments}
            piece["function"] = function
            out.append(piece)
        return self._choice(
            index,
            b'"delta":{"tool_calls":'
            + orjson.dumps(out)
            + b'},"logprobs":null,"finish_reason":null',
        )

    def _finish(self, index: int, reason: str) -> bytes:
        body = b'"delta":{},"logprobs":null,"finish_reason":"' + reason.encode() + b'"'
        return self._choice(index, body)


class TextStream(_ChunkStream):
    """``text_completion`` events of the legacy completions endpoint."""

    _object = "text_completion"

    def __init__(self, *, choices: int, include_usage: bool) -> None:
        super().__init__(choices=choices, include_usage=include_usage)
        self._offsets = [0] * choices  # characters of each choice's text so far

    def _text(self, index: int, text: str, logprobs: Sequence[TokenLogprob]) -> bytes:
        probs = b"null"
        if logprobs:
            probs = orjson.dumps(text_logprobs(logprobs, self._offsets[index]))
            self._offsets[index] += sum(len(t.token) for t in logprobs)
        body = b'"text":' + orjson.dumps(text) + b',"logprobs":' + probs + b',"finish_reason":null'
        return self._choice(index, body)

    def _finish(self, index: int, reason: str) -> bytes:
        body = b'"text":"","logprobs":null,"finish_reason":"' + reason.encode() + b'"'
        return self._choice(index, body)
