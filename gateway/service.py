"""The request path without HTTP: pick the backend, queue for slots, generate, collect or stream.

A request becomes one :class:`~backends.base.GenerationRequest` per choice
(``n`` times the number of prompts), each needing one engine slot.
:meth:`InferenceService.open` validates them (context length...), waits in the
scheduler's queue for the slots, starts them all and waits for each first chunk,
so anything that fails early is raised before a status line is sent; afterwards
the caller either :meth:`collect`s the full text or :meth:`stream`s SSE bytes.
Tokens are charged to the tenant's fair share as they are produced, and the
slots are released when the tracker finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from backends.base import Backend, FinishReason, GenerationChunk, GenerationRequest, ToolCall
from gateway.errors import (
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    QueueTimeout,
    StateUnavailable,
    TenantQueueFull,
    describe,
)
from gateway.metrics import Metrics
from gateway.protocol import ChunkEncoder
from gateway.scheduler.base import Grant, Priority, Scheduler
from gateway.tenancy.admission import Admission, Ticket
from gateway.tenancy.records import Principal

T = TypeVar("T")

CLIENT_CLOSED = 499  # nginx's convention for "the client went away"


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    backend: Backend
    max_n: int
    created: int
    scheduler: Scheduler  # owns this instance's slots and the queue in front of them
    instance: str = "embedded"  # which engine serves it, for metrics: "embedded" or a URL

    @property
    def pool(self) -> str:
        """The scheduler's name for this instance's slots (the same on every replica)."""
        return f"{self.name}@{self.instance}"


class ModelRegistry:
    """Public model name → the backends that serve it, in configured order.

    Routing across several backends is a later concern; for now a request goes
    to the first one that is ready (else the first, which answers 503).
    """

    def __init__(self, models: Sequence[ServedModel]) -> None:
        self._models: dict[str, list[ServedModel]] = {}
        for m in models:
            self._models.setdefault(m.name, []).append(m)

    def get(self, name: str) -> ServedModel:
        try:
            candidates = self._models[name]
        except KeyError:
            raise ModelNotFound(name) from None
        return next((m for m in candidates if m.backend.ready), candidates[0])

    def names(self) -> list[ServedModel]:
        """One entry per public name (the first configured)."""
        return [entries[0] for entries in self._models.values()]

    def instances(self) -> list[ServedModel]:
        return [m for entries in self._models.values() for m in entries]

    def unready(self) -> list[str]:
        """Names with no ready backend."""
        return sorted(
            name
            for name, entries in self._models.items()
            if not any(m.backend.ready for m in entries)
        )


@dataclass(slots=True)
class Generation:
    """One choice in flight: its first chunk and the rest of its stream."""

    index: int
    first: GenerationChunk
    rest: AsyncIterator[GenerationChunk]
    counts_prompt: bool  # False for extra choices (n > 1) of the same prompt
    grant: Grant | None = None  # whose fair share the tokens count toward
    latest: GenerationChunk | None = None  # the last chunk read: counts so far, for billing
    charged: int = 0  # tokens already counted toward the fair share

    def advance(self, chunk: GenerationChunk) -> None:
        """Record ``chunk`` as the latest, and charge its new tokens to the tenant's share."""
        self.latest = chunk
        if self.grant is not None:
            served = chunk.completion_tokens + (chunk.prompt_tokens if self.counts_prompt else 0)
            self.grant.charge(served - self.charged)
            self.charged = served


def usage_of(generations: Sequence[Generation]) -> tuple[int, int]:
    """Prompt and completion tokens of everything read so far (counts are cumulative)."""
    prompt = completion = 0
    for g in generations:
        chunk = g.latest or g.first
        completion += chunk.completion_tokens
        if g.counts_prompt:
            prompt += chunk.prompt_tokens
    return prompt, completion


@dataclass(slots=True)
class Outcome:
    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Tracker:
    """Times one HTTP request and records its metrics exactly once."""

    __slots__ = (
        "_choices",
        "_dispatched",
        "_done",
        "_first_seen",
        "_metrics",
        "endpoint",
        "grant",
        "model",
        "started",
        "ticket",
    )

    def __init__(self, metrics: Metrics, model: str, endpoint: str, *, choices: int = 1) -> None:
        self._metrics = metrics
        self.model = model
        self.endpoint = endpoint
        self._choices = choices
        self.started = time.perf_counter()
        self._dispatched: float | None = None
        self._first_seen: float | None = None
        self._done = False
        self.ticket: Ticket | None = None  # set once admitted; settled by finish()
        self.grant: Grant | None = None  # set once scheduled; released by finish()

    def dispatched(self) -> None:
        self._dispatched = time.perf_counter()

    def first_token(self) -> None:
        if self._first_seen is None:
            self._first_seen = time.perf_counter()
            self._metrics.time_to_first_token.labels(self.model).observe(
                self._first_seen - self.started
            )

    def finish(self, status: int, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if self._done:
            return
        self._done = True
        if self.grant is not None:
            self.grant.release()
        m, now = self._metrics, time.perf_counter()
        if self.ticket is not None:
            engine = 0.0 if self._dispatched is None else now - self._dispatched
            self.ticket.settle(
                status=status,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                engine_seconds=engine,
            )
        m.requests.labels(self.model, self.endpoint, str(status)).inc()
        m.request_duration.labels(self.model, self.endpoint).observe(now - self.started)
        if prompt_tokens:
            m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        if completion_tokens:
            m.completion_tokens.labels(self.model).inc(completion_tokens)
        # Token gaps are only meaningful for one sequence; n > 1 interleaves several.
        if self._first_seen is not None and completion_tokens > 1 and self._choices == 1:
            m.time_per_output_token.labels(self.model).observe(
                (now - self._first_seen) / (completion_tokens - 1)
            )


class InferenceService:
    def __init__(self, registry: ModelRegistry, metrics: Metrics, admission: Admission) -> None:
        self.registry = registry
        self.metrics = metrics
        self.admission = admission

    def resolve(self, model: str, *, n: int, principal: Principal) -> ServedModel:
        if not principal.tenant.allows(model):
            self.metrics.rejected(principal.tenant.id, "forbidden")
            raise Forbidden(f"This key may not use the model '{model}'.", param="model")
        served = self.registry.get(model)
        if n > served.max_n:
            raise InvalidRequest(f"n must be at most {served.max_n} for model '{model}'", param="n")
        return served

    async def admit(
        self, principal: Principal, served: ServedModel, *, tokens: int, request_id: str
    ) -> Ticket:
        """Charge the tenant's limits or raise 429/503; the ticket settles at the end."""
        ticket = await self.admission.admit(
            principal, served.name, tokens=tokens, request_id=request_id
        )
        ticket.backend = served.instance
        return ticket

    async def open(
        self,
        served: ServedModel,
        requests: Sequence[GenerationRequest],
        *,
        n: int,
        tracker: Tracker,
        request_id: str,
        tenant: str,
        weight: float,
        priority: Priority,
    ) -> list[Generation]:
        """Validate, queue for one slot per choice, start every choice; all or nothing."""
        # A request that can never run is refused before it queues; the n choices of
        # one prompt are alike, so each prompt is checked once.
        for r in requests[::n]:
            served.backend.validate(r)
        tracker.grant = grant = await self._schedule(
            served,
            request_id,
            tenant=tenant,
            weight=weight,
            priority=priority,
            slots=len(requests),
        )
        tracker.dispatched()
        streams = [served.backend.generate(r) for r in requests]
        try:
            firsts = await _first_chunks(streams)
        except BaseException:  # an early error, or the client left
            await _close_all(streams)
            raise
        tracker.first_token()
        generations = [
            Generation(i, first, stream, counts_prompt=i % n == 0, grant=grant)
            for i, (first, stream) in enumerate(zip(firsts, streams, strict=True))
        ]
        for g in generations:
            g.advance(g.first)
        return generations

    async def _schedule(
        self,
        served: ServedModel,
        request_id: str,
        *,
        tenant: str,
        weight: float,
        priority: Priority,
        slots: int,
    ) -> Grant:
        outcomes = self.metrics.queue_outcomes
        try:
            grant = await served.scheduler.acquire(
                served.pool,
                request_id,
                tenant=tenant,
                weight=weight,
                priority=priority,
                slots=slots,
            )
        except TenantQueueFull:
            outcomes.labels(served.name, "rejected_tenant").inc()
            raise
        except QueueFull:
            outcomes.labels(served.name, "rejected_full").inc()
            raise
        except QueueTimeout:
            outcomes.labels(served.name, "expired").inc()
            raise
        except StateUnavailable:  # a shared queue with Redis unreachable
            outcomes.labels(served.name, "unavailable").inc()
            raise
        except asyncio.CancelledError:  # the client left while queued
            outcomes.labels(served.name, "cancelled").inc()
            raise
        outcomes.labels(served.name, "granted").inc()
        self.metrics.queue_wait.labels(served.name).observe(grant.queued_seconds)
        return grant

    async def collect(self, generations: Sequence[Generation]) -> list[Outcome]:
        """Run every choice to the end, concurrently; one failure stops them all."""
        try:
            if len(generations) == 1:  # the common case needs no tasks
                return [await _drain(generations[0])]
            return await _all_or_nothing([_drain(g) for g in generations])
        finally:
            await _close_all([g.rest for g in generations])

    async def stream(
        self,
        generations: Sequence[Generation],
        encoder: ChunkEncoder,
        *,
        chat: bool,
        include_usage: bool,
        tracker: Tracker,
    ) -> AsyncGenerator[bytes, None]:
        """SSE bytes for every choice, interleaved as tokens arrive.

        One write per chunk produced (its text, tool calls and finish together, the
        role events with the first), so a client is woken once per token.
        """
        by_index = {g.index: g for g in generations}
        status = CLIENT_CLOSED
        events = [encoder.role(g.index) for g in generations] if chat else []
        try:
            async with contextlib.aclosing(_merge(generations)) as merged:
                async for index, chunk in merged:
                    by_index[index].advance(chunk)
                    if chunk.text:
                        events.append(encoder.text(index, chunk.text))
                    if chunk.tool_calls:
                        events.append(encoder.tool_calls(index, chunk.tool_calls))
                    if chunk.finish_reason is not None:
                        events.append(encoder.finish(index, chunk.finish_reason))
                    if events:
                        yield b"".join(events)
                        events = []
            if include_usage:
                events.append(encoder.usage(*usage_of(generations)))
            yield b"".join(events) + ChunkEncoder.DONE
            status = 200
        except Exception as exc:  # the status line is gone: report in-band
            info = describe(exc)
            status = info.status
            yield b"".join(events) + info.sse_event() + ChunkEncoder.DONE
        finally:
            await _close_all([g.rest for g in generations])
            # Billed for what was produced, however the stream ended.
            tracker.finish(status, *usage_of(generations))

    async def abandon(self, generations: Sequence[Generation], tracker: Tracker) -> None:
        """End a stream whose body may never have started (the client left before it did).

        Once :meth:`stream` has run, this changes nothing: finishing twice is a no-op.
        """
        tracker.finish(CLIENT_CLOSED, *usage_of(generations))  # frees the slots first
        await _close_all([g.rest for g in generations])


async def _first_chunks(
    streams: Sequence[AsyncIterator[GenerationChunk]],
) -> list[GenerationChunk]:
    if len(streams) == 1:  # the common case needs no tasks
        return [await anext(streams[0])]
    return await _all_or_nothing([anext(s) for s in streams])


async def _all_or_nothing(work: Sequence[Awaitable[T]]) -> list[T]:
    """Await all of ``work``; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _drain(g: Generation) -> Outcome:
    out = Outcome(text=[g.first.text], tool_calls=list(g.first.tool_calls))
    chunk = g.first
    while chunk.finish_reason is None:
        chunk = await anext(g.rest)
        g.advance(chunk)
        out.text.append(chunk.text)
        out.tool_calls.extend(chunk.tool_calls)
    out.finish_reason = chunk.finish_reason
    out.prompt_tokens = chunk.prompt_tokens if g.counts_prompt else 0
    out.completion_tokens = chunk.completion_tokens
    return out


async def _merge(
    generations: Sequence[Generation],
) -> AsyncGenerator[tuple[int, GenerationChunk], None]:
    if len(generations) == 1:  # the common case needs no tasks
        g = generations[0]
        yield g.index, g.first
        if g.first.finish_reason is None:
            async for chunk in g.rest:
                yield g.index, chunk
        return
    inbox: asyncio.Queue[tuple[int, GenerationChunk] | BaseException | None] = asyncio.Queue()

    async def pump(g: Generation) -> None:
        try:
            await inbox.put((g.index, g.first))
            if g.first.finish_reason is None:
                async for chunk in g.rest:
                    await inbox.put((g.index, chunk))
            await inbox.put(None)
        except Exception as exc:
            await inbox.put(exc)

    tasks = [asyncio.create_task(pump(g)) for g in generations]
    try:
        remaining = len(tasks)
        while remaining:
            item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _close_all(streams: Sequence[AsyncIterator[GenerationChunk]]) -> None:
    for s in streams:
        aclose = getattr(s, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
