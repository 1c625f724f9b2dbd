"""The request path without HTTP: one call owns a request from admission to its end.

A front door parses its wire format into a :class:`Plan` (the model, one
:class:`~backends.base.GenerationRequest` per choice, the token charge) and hands
it to :meth:`InferenceService.run`, an async generator of wire-neutral events::

    run = service.run(principal, plan, priority="interactive")
    started = await anext(run)   # admitted, placed, queued, first chunks in hand; or raises
    async for event in run:      # Delta(index, chunk)..., then Finished or Failed
        ...
    await run.aclose()           # always; a run closed before its end counts as 499

The stages run in one order (as TGI's router does): **admit** (the tenant's
limits) → **place** (:func:`gateway.routing.place` over the model's instances) →
**validate** (on the chosen backend: context length...) → **queue** (the
scheduler's grant of one slot per choice) → **generate**. Whatever fails before
the first chunks arrive is raised from the first ``anext``, so the door can still
answer with a plain HTTP error; afterwards a failure is a :class:`Failed` event.

Exactly one place finishes a request, :meth:`_Request.finish`, called from the
``finally`` of the operation, however it ended (success, an upstream failure, the
client gone, a shutdown): it frees the slots, settles the tenant's bill with the
tokens produced, and records the metrics, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import replace

from backends.base import (
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    GenerationChunk,
    GenerationRequest,
)
from gateway.choices import ChoiceStream, close_all, first_chunks, merge
from gateway.drain import Drain
from gateway.drift import DriftTracker
from gateway.errors import (
    CLIENT_CLOSED,
    Forbidden,
    InvalidRequest,
    queue_outcome,
    status_of,
)
from gateway.events import (
    Choice,
    Delta,
    Embedded,
    EmbedPlan,
    Event,
    Failed,
    Finished,
    Plan,
    Started,
    Timings,
)
from gateway.metrics import Metrics
from gateway.observers import log_request, observe
from gateway.registry import ModelRegistry, ServedModel
from gateway.request_log import RequestLog
from gateway.router import Router
from gateway.scheduler.base import Grant
from gateway.tenancy.admission import Admission, Ticket
from gateway.tenancy.records import Principal, Priority

QUEUED_HEADER = "x-lockgate-queued-ms"  # time spent waiting for an engine slot
BACKEND_HEADER = "x-lockgate-backend"  # the instance that served the request


class _Request:
    """One request's clock, bill and slots; :meth:`finish` is the one place it ends."""

    __slots__ = (
        "_done",
        "_metrics",
        "choices",
        "dispatched",
        "endpoint",
        "first_seen",
        "grant",
        "held",
        "model",
        "retried",
        "started",
        "streams",
        "ticket",
        "usage",
    )

    def __init__(self, metrics: Metrics, model: str, endpoint: str, choices: int) -> None:
        self._metrics = metrics
        self.model = model
        self.endpoint = endpoint
        self.choices = choices
        self.started = time.perf_counter()
        self.dispatched: float | None = None
        self.first_seen: float | None = None
        self.ticket: Ticket | None = None  # settled by finish()
        self.grant: Grant | None = None  # released by finish()
        self.held: ServedModel | None = None  # the instance placed on; let go by finish()
        self.streams: Sequence[ChoiceStream] = ()
        self.usage: tuple[int, int] | None = None  # set by embeddings, which have no streams
        self.retried = False  # it counts against the router's retry budget
        self._done = False

    def hold(self, served: ServedModel) -> None:
        """Placed on ``served`` (a retry lets the previous instance go)."""
        if self.held is not None:
            self.held.in_use.leave()
        served.in_use.enter()
        self.held = served

    def first_token(self) -> None:
        self.first_seen = time.perf_counter()
        self._metrics.time_to_first_token.labels(self.model).observe(self.first_seen - self.started)

    def produced(self) -> tuple[int, int]:
        """Prompt and completion tokens so far (chunk counts are cumulative)."""
        if self.usage is not None:
            return self.usage
        prompt = completion = 0
        for s in self.streams:
            completion += s.latest.completion_tokens
            if s.counts_prompt:
                prompt += s.latest.prompt_tokens
        return prompt, completion

    def cached(self) -> int:
        """Of the prompt tokens counted, those an engine's prefix cache already had."""
        return sum(s.latest.cached_tokens for s in self.streams if s.counts_prompt)

    def timings(self) -> Timings:
        now = time.perf_counter()
        dispatched = self.dispatched or now
        first = self.first_seen or now
        return Timings(
            dispatched - self.started, first - dispatched, now - first, now - self.started
        )

    def finish(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        if self.grant is not None:
            self.grant.release()  # first: the next waiter starts at once
        if self.held is not None:
            self.held.in_use.leave()  # a retired instance closes once none hold it
        prompt_tokens, completion_tokens = self.produced()
        m, now = self._metrics, time.perf_counter()
        if self.ticket is not None:
            engine = 0.0 if self.dispatched is None else now - self.dispatched
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
        if self.first_seen is not None and completion_tokens > 1 and self.choices == 1:
            m.time_per_output_token.labels(self.model).observe(
                (now - self.first_seen) / (completion_tokens - 1)
            )


class InferenceService:
    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        admission: Admission,
        router: Router,
        *,
        drain: Drain | None = None,
        request_log: RequestLog | None = None,
        drift: DriftTracker | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.admission = admission
        self.router = router
        self.drain = drain  # past its deadline, a run closed early was cut (503), not left
        self.request_log = request_log
        self.drift = drift

    # -- reading the catalogue ------------------------------------------------

    def models(self, principal: Principal) -> list[ServedModel]:
        """The public models this principal may use."""
        return [m for m in self.registry.names() if principal.tenant.allows(m.name)]

    def model(self, principal: Principal, name: str) -> ServedModel:
        """The first instance of ``name``, if this principal may use it."""
        return self._instances(principal, name)[0]

    # -- serving ----------------------------------------------------------------

    async def run(
        self, principal: Principal, plan: Plan, *, priority: Priority, body: bytes | None = None
    ) -> AsyncGenerator[Event, None]:
        """Serve ``plan``: see the module docstring for the events and the stages.

        ``body`` is the request as the client sent it, for the request log."""
        # Counted under model "-" until the name is known to be served and allowed: a
        # client-chosen name never becomes a label value.
        request = _Request(self.metrics, "-", plan.endpoint, len(plan.requests))
        status = CLIENT_CLOSED  # unless it ends otherwise: the client left, or a shutdown
        log = self.request_log
        logged = log is not None and log.wants(principal)
        # The first choice's text, kept for the request log's bodies and the drift features.
        keep = self.drift is not None or (logged and log is not None and log.bodies)
        text: list[str] | None = [] if keep else None
        served: ServedModel | None = None
        self.router.in_flight += 1
        try:
            instances = self._instances(principal, plan.model)
            request.model = plan.model
            if plan.n > instances[0].max_n:
                raise InvalidRequest(
                    f"n must be at most {instances[0].max_n} for model '{plan.model}'", param="n"
                )
            request.ticket = await self.admission.admit(
                principal, plan.model, tokens=plan.tokens, request_id=plan.request_id
            )
            served, firsts, pending = await self._start(
                request, plan, principal, priority, instances
            )
            grant = request.grant
            assert grant is not None
            request.first_token()
            request.streams = streams = [
                ChoiceStream(first, rest, counts_prompt=i % plan.n == 0, grant=grant)
                for i, (first, rest) in enumerate(zip(firsts, pending, strict=True))
            ]
            headers = request.ticket.headers  # this request's own: no copy needed
            headers[QUEUED_HEADER] = f"{grant.queued_seconds * 1000:.0f}"
            headers[BACKEND_HEADER] = served.public_id
            yield Started(plan.request_id, plan.model, served.public_id, int(time.time()), headers)
            # A non-streamed answer is gathered here and sent whole: nobody reads its pieces.
            whole = None if plan.stream else [Choice() for _ in streams]
            try:
                if len(streams) == 1:  # the common case: no merging
                    only = streams[0]
                    if whole is None:
                        yield Delta(0, only.first)
                    else:
                        whole[0].add(only.first)
                    chunk = only.first
                    if text is not None:
                        text.append(chunk.text)
                    while chunk.finish_reason is None:  # then closed, not read to its end
                        chunk = await anext(only.rest)
                        only.advance(chunk)
                        if text is not None:
                            text.append(chunk.text)
                        if whole is None:
                            yield Delta(0, chunk)
                        else:
                            whole[0].add(chunk)
                else:
                    async with contextlib.aclosing(merge(streams)) as merged:
                        async for index, chunk in merged:
                            streams[index].advance(chunk)
                            if text is not None and index == 0:
                                text.append(chunk.text)
                            if whole is None:
                                yield Delta(index, chunk)
                            else:
                                whole[index].add(chunk)
            except Exception as exc:  # reported in-band: a stream's status line is gone
                status = status_of(exc)
                if _instance_failure(exc):
                    self.router.failed(served, instances)
                yield Failed(exc)
                return
            status = 200
            yield Finished(*request.produced(), request.timings(), whole, request.cached())
        except Exception as exc:
            status = status_of(exc)
            raise
        finally:
            # However it ended: the engines stop work nobody reads, then the slots go, even
            # if closing a stream is itself interrupted.
            if status == CLIENT_CLOSED and self.drain is not None and self.drain.cut_off:
                status = 503
            try:
                await close_all([s.rest for s in request.streams])
            finally:
                request.finish(status)
                self.router.in_flight -= 1
                if request.retried:
                    self.router.retrying -= 1
                if logged and log is not None:
                    log_request(log, principal, plan, request, served, status, priority, body, text)
                if status == 200 and self.drift is not None and text is not None:
                    observe(self.drift, self.registry, plan, request, "".join(text))

    async def embed(
        self, principal: Principal, plan: EmbedPlan, *, body: bytes | None = None
    ) -> Embedded:
        """Embed ``plan.texts`` on the model's placed instance; the same finish as run()."""
        request = _Request(self.metrics, "-", plan.endpoint, 1)
        status = CLIENT_CLOSED
        logged = self.request_log is not None and self.request_log.wants(principal)
        served: ServedModel | None = None
        try:
            instances = self._instances(principal, plan.model)
            request.model = plan.model
            request.ticket = ticket = await self.admission.admit(
                principal, plan.model, tokens=plan.tokens, request_id=plan.request_id
            )
            # Read again after admission's awaits: a reload may have retired an instance.
            instances = self.registry.instances_of(plan.model)
            served, _ = self.router.place(instances, spill=principal.tenant.spillover)
            request.hold(served)
            ticket.backend = served.instance
            request.dispatched = time.perf_counter()
            try:
                result = await served.backend.embed(plan.texts)
            except Exception as exc:
                if _instance_failure(exc):
                    self.router.failed(served, instances)
                else:
                    self.router.abandoned(served)
                raise
            except BaseException:
                self.router.abandoned(served)
                raise
            self.router.succeeded(served, instances, None)
            request.usage = (result.prompt_tokens, 0)
            status = 200
            return Embedded(
                result, plan.model, {**ticket.headers, BACKEND_HEADER: served.public_id}
            )
        except Exception as exc:
            status = status_of(exc)
            raise
        finally:
            if status == CLIENT_CLOSED and self.drain is not None and self.drain.cut_off:
                status = 503
            request.finish(status)
            if logged and self.request_log is not None:
                log_request(
                    self.request_log, principal, plan, request, served, status, "interactive",
                    body, None,
                )  # fmt: skip

    # -- the stages --------------------------------------------------------------

    async def _start(
        self,
        request: _Request,
        plan: Plan,
        principal: Principal,
        priority: Priority,
        instances: Sequence[ServedModel],
    ) -> tuple[ServedModel, list[GenerationChunk], list[AsyncIterator[GenerationChunk]]]:
        """Place, validate, queue and start the request; its first chunks in hand.

        An instance that fails before the first token (unreachable, 5xx, 429, timed out)
        hands the request to another, ``routing.retries`` times at most and within the
        retry budget; after the first token nothing is ever retried (no replay).
        """
        router, tried = self.router, list[str]()
        # Only a choice among instances needs the key (a hash of up to 1 KiB of prompt).
        key = None
        if len(instances) > 1:
            key = router.affinity_key(_shared_prefix(plan.requests[0]), plan.session)
        failure: Exception | None = None  # the last instance's, raised when none is left
        while True:
            # Read again after every await: a reload may have retired an instance since.
            instances = self.registry.instances_of(plan.model)
            served, _ = router.place(
                instances, tried=tried, spill=principal.tenant.spillover, key=key
            )
            request.hold(served)
            if failure is not None and served.pool in tried:
                raise failure  # nowhere else to go: never the same instance twice
            assert request.ticket is not None
            request.ticket.backend = served.instance
            try:
                firsts, pending = await self._attempt(request, plan, principal, priority, served)
            except Exception as exc:
                if not _instance_failure(exc):
                    router.abandoned(served)
                    raise
                router.failed(served, instances)
                tried.append(served.pool)
                if len(tried) > router.settings.retries:
                    raise
                if not request.retried and not router.may_retry():
                    raise
                assert request.grant is not None
                request.grant.release()
                request.grant = None
                self.metrics.retries.labels(served.name, served.public_id).inc()
                if not request.retried:
                    request.retried = True
                    router.retrying += 1
                failure = exc
                continue
            except BaseException:  # the client left, or a shutdown
                router.abandoned(served)
                raise
            assert request.dispatched is not None
            router.succeeded(served, instances, time.perf_counter() - request.dispatched)
            return served, firsts, pending

    async def _attempt(
        self,
        request: _Request,
        plan: Plan,
        principal: Principal,
        priority: Priority,
        served: ServedModel,
    ) -> tuple[list[GenerationChunk], list[AsyncIterator[GenerationChunk]]]:
        """One try on ``served``: validate, queue, start; the first chunks in hand."""
        # A request that can never run is refused before it queues; the n choices
        # of one prompt are alike, so each prompt is checked once.
        for r in plan.requests[:: plan.n]:
            await served.backend.validate(r)
        request.grant = await self._queue(served, plan, principal, priority)
        request.dispatched = time.perf_counter()
        tenant, background = principal.tenant.id, priority == "batch"
        pending = [
            served.backend.generate(replace(r, tenant=tenant, background=background))
            for r in plan.requests
        ]
        try:
            return await first_chunks(pending), pending
        except BaseException:  # an early error, or the client left
            await close_all(pending)
            raise

    def _instances(self, principal: Principal, model: str) -> Sequence[ServedModel]:
        if not principal.tenant.allows(model):
            self.metrics.rejected(principal.tenant.id, "forbidden")
            raise Forbidden(f"This key may not use the model '{model}'.", param="model")
        return self.registry.instances_of(model)

    async def _queue(
        self, served: ServedModel, plan: Plan, principal: Principal, priority: Priority
    ) -> Grant:
        outcomes = self.metrics.queue_outcomes
        try:
            grant = await served.scheduler.acquire(
                served.pool,
                plan.request_id,
                tenant=principal.tenant.id,
                weight=principal.tenant.weight,
                priority=priority,
                slots=len(plan.requests),
            )
        except asyncio.CancelledError:  # the client left while queued
            outcomes.labels(served.name, "cancelled").inc()
            raise
        except Exception as exc:
            outcomes.labels(served.name, queue_outcome(exc) or "error").inc()
            raise
        outcomes.labels(served.name, "granted").inc()
        self.metrics.queue_wait.labels(served.name).observe(grant.queued_seconds)
        return grant


def _shared_prefix(request: GenerationRequest) -> str:
    """What requests that can share an engine's prompt cache have in common: the system
    prompt of a chat (else its first message, which a conversation keeps), or a prompt."""
    if not request.messages:
        return request.prompt or ""
    system = [m.content for m in request.messages if m.role in ("system", "developer")]
    return "\n".join(system) if system else request.messages[0].content


def _instance_failure(exc: BaseException) -> bool:
    """The instance failed the request (the client's 4xx never counts against it)."""
    return isinstance(exc, BackendUnavailable | BackendOverloaded | BackendTimeout)
