"""What a front door and the service say to each other: plans in, events out.

A door builds a :class:`Plan` (or an :class:`EmbedPlan`) from its wire format;
:meth:`gateway.service.InferenceService.run` answers with :class:`Started`, then
:class:`Delta` events (for a streamed plan), then :class:`Finished` or :class:`Failed`.
None of them knows a wire format.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from backends.base import (
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    TokenLogprob,
    ToolCall,
)

# The per-request records below are not frozen: a frozen dataclass's __init__ costs about
# 2.4x a plain one's, and five of them are built for every request. Nothing mutates them.


@dataclass(slots=True)
class Plan:
    """A generation request in no wire format: what a front door asks the service for."""

    model: str
    endpoint: str  # the metrics label of the door and operation: chat, ollama_chat...
    request_id: str
    requests: tuple[GenerationRequest, ...]  # one per choice, the n choices of a prompt adjacent
    tokens: int  # the admission charge: prompt estimate + completion limits
    n: int = 1  # choices per prompt (their prompt is validated and billed once)
    session: str | None = None  # for session affinity: OpenAI's `user`, or x-session-id

    @property
    def stream(self) -> bool:
        return self.requests[0].stream

    @classmethod
    def single(cls, model: str, endpoint: str, request: GenerationRequest, *, tokens: int) -> Plan:
        """One choice of one prompt: the plan of every door but OpenAI's ``n`` and lists."""
        return cls(model, endpoint, request.request_id, (request,), tokens)


@dataclass(frozen=True, slots=True)
class EmbedPlan:
    model: str
    endpoint: str
    request_id: str
    texts: tuple[str, ...]
    tokens: int


@dataclass(slots=True)
class Timings:
    """Where the time went, in seconds; the Ollama door reports them in nanoseconds."""

    queued: float  # arrival → dispatch: admission and the wait for a slot
    prefill: float  # dispatch → first token
    decode: float  # first token → last
    total: float  # arrival → end


@dataclass(slots=True)
class Started:
    """The request holds its slots and every choice has produced its first chunk."""

    request_id: str
    model: str
    backend_id: str  # the serving instance's public id
    created: int  # Unix time of arrival
    headers: Mapping[str, str]  # rate limits, queue time, serving instance: for every door


@dataclass(slots=True)  # not frozen: one per token, and frozen costs 2.4x to build
class Delta:
    """New output of choice ``index`` (text, whole tool calls, or its finish reason)."""

    index: int
    chunk: GenerationChunk


@dataclass(slots=True)
class Finished:
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    # A non-streamed plan gets no Delta events: its whole choices come here.
    choices: list[Choice] | None = None
    cached_tokens: int = 0  # of prompt_tokens, those the engine's prefix cache had


@dataclass(frozen=True, slots=True)
class Failed:
    """The request failed after it started; ``error`` is typed (``describe`` renders it)."""

    error: Exception


Event = Started | Delta | Finished | Failed


@dataclass(slots=True)
class Choice:
    """One choice's whole output (a non-streamed answer)."""

    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, chunk: GenerationChunk) -> None:
        if chunk.text:
            self.text.append(chunk.text)
        if chunk.tool_calls:
            self.tool_calls.extend(chunk.tool_calls)
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason


@dataclass(slots=True)
class Result:
    """A whole non-streamed answer."""

    started: Started
    choices: list[Choice]
    finished: Finished


@dataclass(frozen=True, slots=True)
class Embedded:
    result: EmbeddingResult
    model: str
    headers: Mapping[str, str]


async def collect(run: AsyncIterator[Event], started: Started) -> Result:
    """The rest of a non-streamed ``run``: its whole answer; a :class:`Failed` is raised.

    It reads to the run's end rather than stopping at :class:`Finished`, so the run
    finishes by returning, not by being closed (an exception thrown into it).
    """
    finished = None
    async for event in run:
        if type(event) is Finished:
            finished = event
        elif isinstance(event, Failed):
            raise event.error
    if finished is None or finished.choices is None:  # pragma: no cover - a service bug
        raise RuntimeError("the run ended without a whole answer")
    return Result(started, finished.choices, finished)
