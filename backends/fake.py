"""A backend whose behaviour is chosen by the model name, for tests of the layers above.

It needs no model and no threads, and can be served by a real gateway process
(``backend: fake`` in the config), as TensorZero's dummy provider is. The name's
prefix selects the behaviour:

* ``echo``: repeats the prompt (or last chat message) back word by word.
* ``slow``: like echo, with ``delay`` seconds before every word.
* ``fail_before_first``: raises BackendUnavailable before the first chunk.
* ``fail_mid_stream``: sends two words, then raises BackendUnavailable.
* ``overloaded``: raises BackendOverloaded (retry in 2.5 s) before the first chunk.

Given ``tools`` (and a tool_choice other than "none"), any behaviour answers with
one call to the first tool, its arguments ``{"echo": <the last message>}``.

Token counts are word counts; ``context_length`` applies as for a real engine.

    >>> backend = FakeBackend("echo", context_length=64)
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Sequence

from backends.base import (
    BackendLoad,
    BackendOverloaded,
    BackendUnavailable,
    ContextLengthExceeded,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    ToolCall,
)

BEHAVIOURS = ("echo", "slow", "fail_before_first", "fail_mid_stream", "overloaded")


def behaviour_of(name: str) -> str:
    """The behaviour a model name selects (its longest matching prefix), else ``echo``."""
    matches = [b for b in BEHAVIOURS if name.startswith(b)]
    return max(matches, key=len) if matches else "echo"


class FakeBackend:
    def __init__(
        self,
        behaviour: str = "echo",
        *,
        context_length: int = 4096,
        delay: float = 0.05,
        capacity: int = 8,
    ) -> None:
        self.behaviour = behaviour_of(behaviour)
        self.capacity = capacity
        self.context_length = context_length
        self.delay = delay if self.behaviour == "slow" else 0.0
        self.peak = 0  # most requests generating at once
        self.running = 0
        self.started = False
        self.closed = False
        # The latest requests, for tests to inspect; bounded, as it also serves real
        # servers (backend: fake), where a list grew ~650 bytes a request in a soak.
        self.seen: deque[GenerationRequest] = deque(maxlen=256)

    @property
    def ready(self) -> bool:
        return self.started and not self.closed

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def load(self) -> BackendLoad:
        return BackendLoad(running=self.running, capacity=self.capacity)

    def describe(self) -> ModelInfo:
        return ModelInfo(family="fake", context_length=self.context_length)

    async def validate(self, request: GenerationRequest) -> None:
        self._check(request)

    def _check(self, request: GenerationRequest) -> None:
        words = _source(request).split()
        limit = request.sampling.max_tokens
        if len(words) + (limit or 1) > self.context_length:
            raise ContextLengthExceeded(
                prompt_tokens=len(words),
                max_tokens=limit or 1,
                context_length=self.context_length,
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.seen.append(request)
        if self.behaviour == "overloaded":
            raise BackendOverloaded("fake backend is full", retry_after=2.5)
        if self.behaviour == "fail_before_first":
            raise BackendUnavailable("fake backend failed before the first token")
        self._check(request)
        source = _source(request)
        words = source.split()
        limit = request.sampling.max_tokens
        if request.tools and request.tool_choice != "none":
            name = request.tools[0]["function"]["name"]
            call = ToolCall("call_0", name, json.dumps({"echo": source}))
            yield GenerationChunk("", len(words), 1, "tool_calls", tool_calls=(call,))
            return
        budget = limit if limit is not None else len(words)
        out = words[:budget]
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            for i, word in enumerate(out, start=1):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.behaviour == "fail_mid_stream" and i == 3:
                    raise BackendUnavailable("fake backend failed mid-stream")
                reason: FinishReason | None = None
                if i == len(out):
                    reason = "length" if budget < len(words) else "stop"
                yield GenerationChunk(
                    (" " if i > 1 else "") + word, len(words), i, finish_reason=reason
                )
            if not out:
                yield GenerationChunk("", len(words), 0, finish_reason="stop")
        finally:
            self.running -= 1

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        if self.behaviour in ("fail_before_first", "fail_mid_stream"):
            raise BackendUnavailable("fake backend is down")
        vectors = [[float(len(t)), float(len(t.split())), 1.0] for t in texts]
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(len(t.split()) for t in texts))


def _source(request: GenerationRequest) -> str:
    text = request.prompt if request.messages is None else request.messages[-1].content
    return text or ""
