"""The service's lifecycle, over the fake backend: every ending finishes once, frees its
slots, and bills what was produced (the fake backend is this module's unit-test double)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import pytest

from backends.base import (
    BackendUnavailable,
    ContextLengthExceeded,
    GenerationRequest,
    SamplingParams,
)
from backends.fake import FakeBackend
from gateway.choices import all_or_nothing
from gateway.errors import RateLimited
from gateway.events import Delta, Event, Failed, Finished, Plan, Started, collect
from gateway.metrics import Metrics
from gateway.registry import ModelRegistry, ServedModel
from gateway.router import Router
from gateway.scheduler.base import PoolLimits
from gateway.scheduler.memory import MemoryScheduler
from gateway.service import InferenceService
from gateway.settings import RoutingSettings
from gateway.tenancy.admission import Admission
from gateway.tenancy.counters import MemoryCounters
from gateway.tenancy.records import ANONYMOUS, Limits, Principal, Tenant


@dataclass
class Ledger:
    """Records what the service settles (the real ledger writes to SQLite)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def record(self, **row: Any) -> None:
        self.rows.append(row)


@dataclass
class World:
    service: InferenceService
    scheduler: MemoryScheduler
    ledger: Ledger
    metrics: Metrics
    backends: dict[str, FakeBackend]

    def running(self, model: str) -> int:
        return self.scheduler.load(f"{model}@fake").running

    def requests(self, model: str, status: int) -> float:
        value = self.metrics.registry.get_sample_value(
            "lockgate_requests_total", {"model": model, "endpoint": "test", "status": str(status)}
        )
        return value or 0.0


@pytest.fixture
async def world() -> World:
    metrics = Metrics()
    ledger = Ledger()
    scheduler = MemoryScheduler()
    backends = {
        "echo": FakeBackend("echo", capacity=2),
        "slow": FakeBackend("slow", delay=0.02, capacity=1),
        "fail_mid_stream": FakeBackend("fail_mid_stream"),
        "fail_before_first": FakeBackend("fail_before_first"),
        "tiny": FakeBackend("echo", context_length=4),
    }
    served = []
    for name, backend in backends.items():
        await backend.start()
        m = ServedModel(name, backend, scheduler, max_n=2, instance="fake", public_id="fake-0")
        scheduler.add_pool(m.pool, PoolLimits(capacity=backend.capacity, max_wait=5))
        served.append(m)
    admission = Admission(MemoryCounters(), ledger, metrics)  # type: ignore[arg-type]
    router = Router(served, RoutingSettings(), metrics)
    service = InferenceService(ModelRegistry(served), metrics, admission, router)
    return World(service, scheduler, ledger, metrics, backends)


def plan(
    model: str, text: str = "one two three four five", *, n: int = 1, stream: bool = True, **kw: Any
) -> Plan:
    requests = tuple(
        GenerationRequest(f"r-{i}", SamplingParams(**kw), prompt=text, stream=stream)
        for i in range(n)
    )
    return Plan(model, "test", "r", requests, tokens=10, n=n)


async def events(run: AsyncGenerator[Event, None], *, stop_after: int | None = None) -> list[Event]:
    got: list[Event] = []
    try:
        async for event in run:
            got.append(event)
            if stop_after is not None and len(got) >= stop_after:
                break
    finally:
        await run.aclose()
    return got


def run(w: World, p: Plan, principal: Principal = ANONYMOUS) -> AsyncGenerator[Event, None]:
    return w.service.run(principal, p, priority="interactive")


async def test_a_finished_request_is_billed_once_and_frees_its_slot(world: World) -> None:
    got = await events(run(world, plan("echo")))
    assert isinstance(got[0], Started)
    assert got[0].backend_id == "fake-0"
    assert "".join(e.chunk.text for e in got if isinstance(e, Delta)) == "one two three four five"
    assert isinstance(got[-1], Finished)
    assert (got[-1].prompt_tokens, got[-1].completion_tokens) == (5, 5)
    assert [
        (r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in world.ledger.rows
    ] == [(200, 5, 5)]
    assert world.running("echo") == 0
    assert world.requests("echo", 200) == 1


async def test_collect_gathers_whole_choices(world: World) -> None:
    r = run(world, plan("echo", n=2, max_tokens=2, stream=False))
    started = await anext(r)
    assert isinstance(started, Started)
    result = await collect(r, started)
    await r.aclose()
    assert ["".join(c.text) for c in result.choices] == ["one two", "one two"]
    assert [c.finish_reason for c in result.choices] == ["length", "length"]
    # n choices of one prompt: the prompt is billed once, both completions in full.
    assert (world.ledger.rows[0]["prompt_tokens"], world.ledger.rows[0]["completion_tokens"]) == (
        5,
        4,
    )
    assert world.running("echo") == 0


async def test_a_client_that_leaves_mid_stream_is_499_and_billed_what_was_sent(
    world: World,
) -> None:
    got = await events(run(world, plan("slow")), stop_after=3)  # Started + two words
    assert [type(e) for e in got] == [Started, Delta, Delta]
    assert len(world.ledger.rows) == 1
    assert world.ledger.rows[0]["status"] == 499
    assert world.ledger.rows[0]["completion_tokens"] == 2
    assert world.running("slow") == 0
    assert world.backends["slow"].running == 0  # the engine stopped the sequence too
    assert world.requests("slow", 499) == 1


async def test_a_failure_mid_stream_is_an_event_and_bills_what_was_produced(world: World) -> None:
    got = await events(run(world, plan("fail_mid_stream")))
    assert isinstance(got[-1], Failed)
    assert isinstance(got[-1].error, BackendUnavailable)
    assert sum(isinstance(e, Delta) for e in got) == 2
    assert [(r["status"], r["completion_tokens"]) for r in world.ledger.rows] == [(503, 2)]
    assert world.running("fail_mid_stream") == 0


async def test_a_failure_before_the_first_token_is_raised_and_frees_the_slot(world: World) -> None:
    r = run(world, plan("fail_before_first"))
    with pytest.raises(BackendUnavailable):
        await anext(r)
    assert [(r["status"], r["completion_tokens"]) for r in world.ledger.rows] == [(503, 0)]
    assert world.running("fail_before_first") == 0


async def test_a_request_that_cannot_fit_is_refused_before_it_queues(world: World) -> None:
    with pytest.raises(ContextLengthExceeded):
        await anext(run(world, plan("tiny", max_tokens=3)))
    assert world.ledger.rows[0]["status"] == 400
    assert (
        world.metrics.registry.get_sample_value(
            "lockgate_queue_requests_total", {"model": "tiny", "outcome": "granted"}
        )
        is None
    )


async def test_cancelled_while_queued_or_mid_stream_both_finish_once(world: World) -> None:
    holder = run(world, plan("slow"))
    await anext(holder)  # holds slow's only slot
    waiting = asyncio.create_task(anext(run(world, plan("slow"))))
    await asyncio.sleep(0.05)
    assert world.scheduler.load("slow@fake").waiting["interactive"] == 1
    waiting.cancel()  # a shutdown, or a client gone while queued
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (
        world.metrics.registry.get_sample_value(
            "lockgate_queue_requests_total", {"model": "slow", "outcome": "cancelled"}
        )
        == 1
    )
    streaming = asyncio.create_task(events(holder))
    await asyncio.sleep(0.05)
    streaming.cancel()
    with pytest.raises(asyncio.CancelledError):
        await streaming
    assert sorted(r["status"] for r in world.ledger.rows) == [499, 499]
    assert world.running("slow") == 0
    assert world.backends["slow"].running == 0


async def test_an_admission_refusal_takes_no_slot(world: World) -> None:
    limited = Principal(tenant=Tenant(id="t", limits=Limits(requests_per_minute=1)), key_id="k")
    await events(run(world, plan("echo"), limited))
    with pytest.raises(RateLimited):
        await anext(run(world, plan("echo"), limited))
    assert [r["status"] for r in world.ledger.rows] == [200]  # a refusal is never admitted
    assert world.requests("echo", 429) == 1
    assert world.running("echo") == 0


async def test_first_failure_cancels_the_rest_at_once() -> None:
    cancelled = asyncio.Event()

    async def slow() -> int:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    async def refused() -> int:
        raise ValueError("queue full")

    started = time.perf_counter()
    with pytest.raises(ValueError, match="queue full"):
        await all_or_nothing([slow(), refused()])
    assert time.perf_counter() - started < 1
    assert cancelled.is_set()


async def test_results_keep_their_order() -> None:
    async def value(v: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return v

    assert await all_or_nothing([value(1, 0.02), value(2, 0.0)]) == [1, 2]


class SlowToClose(FakeBackend):
    """Its streams take a while to close, as an upstream connection's teardown may."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Any, None]:
        try:
            async for chunk in super().generate(request):
                yield chunk
        finally:
            await asyncio.sleep(0.2)


async def test_finish_runs_even_when_closing_a_stream_is_cancelled(world: World) -> None:
    backend = SlowToClose("slow", delay=0.01, capacity=1)
    await backend.start()
    served = ServedModel("closing", backend, world.scheduler, instance="fake")
    world.scheduler.add_pool(served.pool, PoolLimits(capacity=1))
    world.service.registry = ModelRegistry([served])

    async def slow_client() -> None:
        r = run(world, plan("closing"))
        try:
            async for _ in r:
                await asyncio.sleep(10)  # its writes block: the run waits at a yield
        finally:
            await r.aclose()

    reading = asyncio.create_task(slow_client())
    await asyncio.sleep(0.05)
    reading.cancel()  # the client is gone: the run closes its stream...
    await asyncio.sleep(0.05)
    reading.cancel()  # ...and a shutdown interrupts that
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert [r["status"] for r in world.ledger.rows] == [499]
    assert world.scheduler.load(served.pool).running == 0
