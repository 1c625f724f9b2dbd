"""A backend whose behaviour is chosen by the model name, for tests of the layers above.

It needs no model and no threads. Names (a prefix selects the behaviour):

* ``echo``: repeats the prompt (or last chat message) back word by word.
* ``slow``: like echo, with ``delay`` seconds before every word.
* ``overloaded``: raises BackendOverloaded before the first chunk.
* ``unavailable``: raises BackendUnavailable before the first chunk.
* ``fail_midstream``: sends two words, then raises BackendUnavailable.

Given ``tools`` (and a tool_choice other than "none"), any behaviour answers with
one call to the first tool, its arguments ``{"echo": <the last message>}``.

Token counts are word counts; ``context_length`` applies as for a real engine.

    >>> backend = FakeBackend("echo", context_length=64)
"""

from __future__ import annotations

import asyncio
import json
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
    ToolCall,
)


class FakeBackend:
    def __init__(
        self,
        behaviour: str = "echo",
        *,
        context_length: int = 4096,
        delay: float = 0.0,
        capacity: int = 8,
    ) -> None:
        self.behaviour = behaviour
        self.capacity = capacity
        self.peak = 0  # most requests generating at once
        self._context_length = context_length
        self.delay = delay
        self.running = 0
        self.started = False
        self.closed = False
        self.seen: list[GenerationRequest] = []

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def ready(self) -> bool:
        return self.started and not self.closed

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def load(self) -> BackendLoad:
        return BackendLoad(running=self.running, waiting=0, capacity=self.capacity)

    def validate(self, request: GenerationRequest) -> None:
        words = _source(request).split()
        limit = request.sampling.max_tokens
        if len(words) + (limit or 1) > self._context_length:
            raise ContextLengthExceeded(
                prompt_tokens=len(words),
                max_tokens=limit or 1,
                context_length=self._context_length,
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.seen.append(request)
        if self.behaviour.startswith("overloaded"):
            raise BackendOverloaded("fake backend is full", retry_after=2.5)
        if self.behaviour.startswith("unavailable"):
            raise BackendUnavailable("fake backend is down")
        self.validate(request)
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
                if self.behaviour.startswith("fail_midstream") and i == 3:
                    raise BackendUnavailable("fake backend failed mid-stream")
                last = i == len(out)
                reason: FinishReason | None = None
                if last:
                    reason = "length" if budget < len(words) else "stop"
                yield GenerationChunk(
                    (" " if i > 1 else "") + word, len(words), i, finish_reason=reason
                )
            if not out:
                yield GenerationChunk("", len(words), 0, finish_reason="stop")
        finally:
            self.running -= 1

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        if self.behaviour.startswith("unavailable"):
            raise BackendUnavailable("fake backend is down")
        vectors = [[float(len(t)), float(len(t.split())), 1.0] for t in texts]
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(len(t.split()) for t in texts))


def _source(request: GenerationRequest) -> str:
    text = request.prompt if request.messages is None else request.messages[-1].content
    return text or ""
