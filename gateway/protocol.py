"""OpenAI wire format: request models, converters, and response builders.

Requests are validated by pydantic models that all derive from
:class:`OpenAIBaseModel`, which carries the one compatibility rule: fields we
do not know are ignored and logged at debug level — accepted, so SDKs that send
new parameters keep working, but never forwarded to an engine.

Responses are built as plain dicts and serialized once with orjson; the
streaming path pre-renders the constant part of every chunk (see
:class:`ChunkEncoder`) so each token costs one small ``orjson.dumps``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.base import ChatMessage, FinishReason, SamplingParams, ToolCall
from gateway.errors import InvalidRequest

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="after")
    def _drop_unknown_fields(self) -> OpenAIBaseModel:
        extra = self.__pydantic_extra__
        if extra:
            log.debug("ignoring unknown fields in %s: %s", type(self).__name__, sorted(extra))
            extra.clear()
        return self


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class FunctionDef(OpenAIBaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDef


class ChatMessageIn(OpenAIBaseModel):
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


# Limits charge prompt + max_tokens before the engine has tokenized anything: prompts are
# estimated at 4 characters a token, and without max_tokens a choice is charged 256.
# Both are reconciled with the engine's real counts when the request ends.
CHARS_PER_TOKEN = 4
UNSET_MAX_TOKENS_CHARGE = 256


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 1


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _SamplingFields(OpenAIBaseModel):
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
    logprobs: bool | int | None = None

    @model_validator(mode="after")
    def _check_combinations(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        return self

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
        )


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None

    def tool_definitions(self) -> tuple[dict[str, Any], ...]:
        return tuple(t.model_dump(exclude_none=True) for t in self.tools or ())

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


class EmbeddingRequest(OpenAIBaseModel):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def token_charge(self) -> int:
        return sum(estimate_tokens(t) for t in self.texts())


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|.*[\[\(].*)$")


def parse(model: type[M], body: bytes) -> M:
    """Decode and validate a JSON body, raising :class:`InvalidRequest` (400)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        # Union members appear in pydantic's path ("prompt.list[str]"); clients want "prompt".
        loc = ".".join(str(p) for p in first["loc"] if not _UNION_MEMBER.match(str(p)))
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"{loc}: {message}" if loc else message, param=loc or None) from None


# -- responses -----------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    *,
    chat: bool,
    rid: str,
    model: str,
    created: int,
    choices: list[tuple[str, FinishReason, tuple[ToolCall, ...]]],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` or ``text_completion`` body."""
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                **({"message": _message(text, calls)} if chat else {"text": text}),
                "logprobs": None,
                "finish_reason": reason,
            }
            for i, (text, reason, calls) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def tool_call_dict(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _message(text: str, calls: tuple[ToolCall, ...]) -> dict[str, Any]:
    if not calls:
        return {"role": "assistant", "content": text}
    # OpenAI sends content null when the turn is only tool calls.
    return {
        "role": "assistant",
        "content": text or None,
        "tool_calls": [tool_call_dict(c) for c in calls],
    }


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


class ChunkEncoder:
    """Renders SSE events for one streamed response.

    The envelope (id, object, created, model) is the same for every chunk, so
    it is serialized once; a token then costs one ``orjson.dumps`` of its text.
    """

    def __init__(self, *, rid: str, model: str, chat: bool, include_usage: bool) -> None:
        head = orjson.dumps(
            {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
            }
        )
        self._head = b"data: " + head[:-1] + b',"choices":['
        self._chat = chat
        self._usage_tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def _choice(self, index: int, body: bytes) -> bytes:
        return self._head + b'{"index":%d,' % index + body + b"}]" + self._usage_tail

    def role(self, index: int) -> bytes:
        """OpenAI's first chat chunk announces the role with empty content."""
        return self._choice(
            index, b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null'
        )

    def text(self, index: int, text: str) -> bytes:
        content = orjson.dumps(text)
        if self._chat:
            body = b'"delta":{"content":' + content + b'},"logprobs":null,"finish_reason":null'
        else:
            body = b'"text":' + content + b',"logprobs":null,"finish_reason":null'
        return self._choice(index, body)

    def tool_calls(self, index: int, calls: tuple[ToolCall, ...]) -> bytes:
        """Whole tool calls in one delta (OpenAI may split arguments; clients join them)."""
        deltas = [{"index": i, **tool_call_dict(c)} for i, c in enumerate(calls)]
        body = (
            b'"delta":{"tool_calls":'
            + orjson.dumps(deltas)
            + b'},"logprobs":null,"finish_reason":null'
        )
        return self._choice(index, body)

    def finish(self, index: int, reason: FinishReason) -> bytes:
        if self._chat:
            body = b'"delta":{},"logprobs":null,"finish_reason":"' + reason.encode() + b'"'
        else:
            body = b'"text":"","logprobs":null,"finish_reason":"' + reason.encode() + b'"'
        return self._choice(index, body)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return (
            self._head
            + b"],"
            + b'"usage":'
            + orjson.dumps(usage(prompt_tokens, completion_tokens))
            + b"}\n\n"
        )

    DONE = b"data: [DONE]\n\n"
