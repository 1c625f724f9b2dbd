"""The Backend interface every engine implements, and the types it speaks.

A backend turns a :class:`GenerationRequest` into a stream of
:class:`GenerationChunk` and a batch of texts into embeddings. It knows nothing
of HTTP, tenants or OpenAI's wire format; the gateway translates both ways.

Contract of :meth:`Backend.generate`:

* It is an async iterator. Errors detectable before any work is done
  (context too long, engine full past its wait limit) are raised before the
  first chunk, so the caller can still answer with a plain HTTP error.
* Each chunk carries newly produced text; the last one carries
  ``finish_reason`` and the final token counts.
* Closing the iterator early (``aclose()``, or cancelling the task that
  iterates it) aborts the request and frees its engine resources.

Errors::

    BackendError                     anything a backend raises on purpose
    ├── InvalidRequestError          the request can never succeed (→ 400)
    │   └── ContextLengthExceeded    prompt + max_tokens > context (→ 400)
    ├── BackendOverloaded            no capacity within the wait limit, or the
    │                                upstream answered 429 (→ 503 + Retry-After)
    ├── BackendUnavailable           not loaded, shut down, failed, unreachable,
    │                                or the upstream answered 5xx (→ 503)
    └── BackendTimeout               connect, first-token or between-chunk timeout (→ 504)

Remote backends translate their upstream's errors into this tree exactly once:
an upstream 4xx caused by the request becomes an ``InvalidRequestError`` (it is
the client's mistake, never retried, never an outage); everything else is the
backend's problem.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "tool_calls"]


class BackendError(Exception):
    """Base of every error a backend raises deliberately.

    ``code`` carries a machine-readable code when the backend knows one (an
    upstream's own ``context_length_exceeded``, say); the gateway prefers it.
    """

    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(BackendError):
    """The request is malformed for this backend and will never succeed."""


class Unsupported(InvalidRequestError):
    """The backend cannot do this at all (embeddings from a server started without them)."""

    code = "unsupported"


class ContextLengthExceeded(InvalidRequestError):
    """Prompt tokens plus the requested completion exceed the context window."""

    def __init__(
        self,
        *,
        prompt_tokens: int,
        max_tokens: int,
        context_length: int,
        param: str = "messages",
        at_least: bool = False,
    ) -> None:
        # at_least: the prompt was refused by its size alone, before it was tokenized.
        bound = "at least " if at_least else ""
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {bound}{prompt_tokens + max_tokens} tokens ({bound}{prompt_tokens} in the "
            f"prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param=param,
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class BackendOverloaded(BackendError):
    """No capacity became free within the wait limit; retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailable(BackendError):
    """The backend cannot serve now: still loading, shut down, crashed or unreachable.

    ``retry_after`` is when trying again makes sense (the next health probe, say)."""

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class BackendTimeout(BackendError):
    """The upstream did not connect, start or continue within its time limit."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model asked for; ``arguments`` is a JSON string (OpenAI's form)."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's ``tool_calls`` entry, the one shape every OpenAI dialect shares."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call as it is produced: the first of a call carries its ``id``
    and ``name``, the rest carry text to append to its ``arguments`` (OpenAI's stream)."""

    index: int  # the call's place among the choice's calls
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One produced token's log probability and, when asked, its likeliest alternatives."""

    token: str
    raw: bytes  # the token's bytes (its text may be part of a UTF-8 character)
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()  # (token, bytes, logprob), likeliest first


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn, its content already flattened to text."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # role "tool": which call this answers
    name: str | None = None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. ``None`` means "the engine's default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0: disabled
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None  # llama.cpp's (Ollama's option); 1.0: off
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    # None: no log probabilities; k >= 0: the sampled token's and its k likeliest rivals'.
    logprobs: int | None = None

    def explicit(self) -> dict[str, float | int]:
        """The scalar knobs the client set, by their OpenAI names (for remote engines)."""
        knobs = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repeat_penalty": self.repeat_penalty,
        }
        return {k: v for k, v in knobs.items() if v is not None}


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A constraint on the output: any JSON object, or JSON that validates against
    ``schema`` (OpenAI's ``response_format``, Ollama's ``format``)."""

    kind: Literal["json_object", "json_schema"]
    schema: Mapping[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Either ``prompt`` (raw completion) or ``messages`` (chat) is set."""

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    # OpenAI tool definitions and tool_choice, passed to backends that support tools.
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None
    # False when the caller only wants the whole answer: a backend may then produce it
    # as one final chunk (a remote engine's non-streamed call, no SSE to parse).
    stream: bool = True
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None  # None: the engine's default (allowed)
    tenant: str | None = None  # whose request (set by the gateway): for per-tenant caches
    # Batch work (set by the gateway): an engine may hold it back while an interactive
    # prompt is prefilled, so that chat users' first token does not wait behind it.
    background: bool = False


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """New text since the previous chunk; counts are cumulative."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # complete calls, sent once they are whole
    # The same calls as they are produced, for streams. A backend that sends deltas also
    # sends the whole calls (in a later chunk); streams then skip the whole ones.
    tool_deltas: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()  # of this chunk's tokens, when asked for
    cached_tokens: int = 0  # of prompt_tokens, those a prefix cache had (not computed)


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class BackendLoad:
    """A point-in-time view of how busy a backend is.

    ``None`` is "this engine does not say": it is exported as no series, not as 0.
    """

    running: int
    capacity: int
    waiting: int | None = None  # queued inside the engine (not in the gateway's queue)
    last_batch_size: int | None = None  # sequences in the most recent decode step
    decode_steps: int | None = None  # cumulative
    decoded_sequences: int | None = None  # cumulative sum of batch sizes
    kv_cache_usage: float | None = None  # 0..1
    prefix_cache_hit_tokens: int | None = None  # cumulative: prompt tokens shared
    prefix_cache_queried_tokens: int | None = None  # cumulative: prompt tokens looked up
    prefix_cache_cells: int | None = None  # KV cells cached prefixes hold now


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a backend knows of its model, for clients that ask (Ollama's ``/api/show``).

    Remote engines know little; unknown is ``None``, never a guess.
    """

    family: str | None = None  # architecture: gemma3, llama, qwen2...
    parameters: int | None = None
    quantization: str | None = None  # Q4_K_M...
    context_length: int | None = None  # per sequence
    size_bytes: int | None = None  # the weights' file size
    chat_template: bool | None = None  # does the model carry its own chat template?


@runtime_checkable
class Backend(Protocol):
    """One engine instance serving one or more public model names."""

    @property
    def ready(self) -> bool:
        """True once the model is loaded and requests can be served."""
        ...

    async def start(self) -> None:
        """Load the model / connect; called once from the app lifespan."""
        ...

    async def close(self) -> None:
        """Abort in-flight work and release every resource."""
        ...

    async def validate(self, request: GenerationRequest) -> None:
        """Raise :class:`InvalidRequestError` (e.g. context too long) for a request that
        can never run, without running it, so it is refused before it queues. Work that
        grows with the input (tokenizing) must not hold the event loop."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the completion; see the module docstring for the contract."""
        ...

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        """Pooled embeddings, one vector per text, in order."""
        ...

    def load(self) -> BackendLoad:
        """Current running/waiting counts, for metrics and routing."""
        ...

    def describe(self) -> ModelInfo:
        """The model's family, size and context, as far as the backend knows them."""
        ...
