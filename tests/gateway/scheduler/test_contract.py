"""The scheduler contract, run against every implementation (see conftest.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import QueueFull, QueueTimeout, TenantQueueFull
from gateway.scheduler.base import Grant, Scheduler
from gateway.tenancy.records import Priority
from tests.gateway.scheduler.conftest import MakeScheduler


async def take(
    s: Scheduler,
    rid: str,
    tenant: str = "a",
    priority: Priority = "interactive",
    *,
    weight: float = 1.0,
    slots: int = 1,
) -> Grant:
    return await s.acquire("m", rid, tenant=tenant, weight=weight, priority=priority, slots=slots)


async def queued(s: Scheduler, *args: str, **kwargs: object) -> asyncio.Task[Grant]:
    """Start an acquire and wait until it is really queued."""
    before = sum((await s.snapshot("m")).waiting.values())
    task = asyncio.create_task(take(s, *args, **kwargs))  # type: ignore[arg-type]
    for _ in range(200):
        await asyncio.sleep(0.005)
        if task.done() or sum((await s.snapshot("m")).waiting.values()) > before:
            return task
    raise AssertionError("the request never reached the queue")


async def settle() -> None:
    await asyncio.sleep(0.05)  # grants may travel (Redis: to another connection)


async def test_free_slots_are_granted_at_once_and_never_oversubscribed(
    make_scheduler: MakeScheduler,
) -> None:
    s = make_scheduler(2)
    a, b = await take(s, "a"), await take(s, "b")
    waiting = await queued(s, "c")
    load = await s.snapshot("m")
    assert (load.running, load.capacity, load.waiting["interactive"]) == (2, 2, 1)
    assert not waiting.done()
    a.release()
    c = await asyncio.wait_for(waiting, 2)  # handed over on release: no polling
    assert c.request_id == "c"
    a.release()  # twice is a no-op
    assert (await s.snapshot("m")).running == 2
    b.release()
    c.release()
    await settle()
    assert (await s.snapshot("m")).running == 0


async def test_a_freed_slot_goes_to_the_light_tenant_first(make_scheduler: MakeScheduler) -> None:
    s = make_scheduler(1)
    running = await take(s, "h0", tenant="heavy")
    running.charge(5000)
    heavy = [await queued(s, f"h{i}", "heavy") for i in range(1, 4)]
    light = await queued(s, "l1", "light")
    # light arrives level with heavy (no banked credit); heavy's running request keeps
    # producing tokens while light waits, so light is ahead when the slot frees
    running.charge(50)
    running.release()
    first = await asyncio.wait_for(light, 2)
    assert not any(t.done() for t in heavy)
    first.charge(10)
    first.release()
    for t in heavy:
        grant = await asyncio.wait_for(t, 2)
        grant.release()


async def test_weights_scale_the_share(make_scheduler: MakeScheduler) -> None:
    s = make_scheduler(1)
    blocker = await take(s, "x", tenant="x")
    order: list[str] = []
    tasks = []
    for i in range(4):
        tasks.append(await queued(s, f"a{i}", "a", weight=1.0))
        tasks.append(await queued(s, f"b{i}", "b", weight=3.0))
    blocker.release()
    pending = set(tasks)
    while pending:  # one slot: one grant at a time
        done, pending = await asyncio.wait(pending, timeout=2, return_when="FIRST_COMPLETED")
        assert len(done) == 1
        grant = done.pop().result()
        order.append(grant.tenant)
        grant.charge(30)
        grant.release()
    # b pays a third of what a pays per token: it gets more of the early turns
    assert order[:4].count("b") >= 3


async def test_interactive_before_batch(make_scheduler: MakeScheduler) -> None:
    s = make_scheduler(1)
    running = await take(s, "r")
    batch = await queued(s, "b", "batchy", "batch")
    chat = await queued(s, "i", "chatty", "interactive")
    load = await s.snapshot("m")
    assert load.waiting == {"interactive": 1, "batch": 1}
    running.release()
    first = await asyncio.wait_for(chat, 2)
    await settle()
    assert not batch.done()
    first.release()
    (await asyncio.wait_for(batch, 2)).release()


async def test_fcfs_ignores_priority_and_service(make_scheduler: MakeScheduler) -> None:
    s = make_scheduler(1, policy="fcfs")
    running = await take(s, "r", tenant="heavy")
    running.charge(10_000)
    first = await queued(s, "h1", "heavy", "batch")
    second = await queued(s, "l1", "light", "interactive")
    running.release()
    grant = await asyncio.wait_for(first, 2)
    assert grant.request_id == "h1" and not second.done()
    grant.release()
    (await asyncio.wait_for(second, 2)).release()


async def test_queue_limits_refuse_before_waiting(make_scheduler: MakeScheduler) -> None:
    s = make_scheduler(1, max_queue=3, max_queue_per_tenant=2)
    running = await take(s, "r")
    waiting = [await queued(s, f"a{i}") for i in range(2)]
    with pytest.raises(TenantQueueFull) as mine:
        await take(s, "a9")
    assert mine.value.retry_after >= 1
    waiting.append(await queued(s, "b1", "b"))
    with pytest.raises(QueueFull) as full:
        await take(s, "c1", "c")
    assert full.value.retry_after >= 1
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await settle()
    load = await s.snapshot("m")
    assert (load.running, sum(load.waiting.values())) == (1, 0)
    running.release()


async def test_timeout_and_cancellation_leave_no_slot_behind(
    make_scheduler: MakeScheduler,
) -> None:
    s = make_scheduler(1, max_wait=0.2)
    running = await take(s, "r")
    with pytest.raises(QueueTimeout) as late:
        await take(s, "late")
    assert late.value.retry_after >= 1
    gone = await queued(s, "gone")
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    load = await s.snapshot("m")
    assert (load.running, sum(load.waiting.values())) == (1, 0)
    running.release()
    await settle()
    assert (await s.snapshot("m")).running == 0
    nxt = await asyncio.wait_for(take(s, "next"), 2)
    assert nxt.request_id == "next"
    nxt.release()


async def test_wide_requests_hold_several_slots_in_strict_order(
    make_scheduler: MakeScheduler,
) -> None:
    s = make_scheduler(3)
    one = await take(s, "one")
    wide = await queued(s, "wide", slots=3)  # n=3: needs every slot
    narrow = await queued(s, "narrow")
    await settle()
    assert not wide.done() and not narrow.done()  # narrow may not overtake the head
    one.release()
    grant = await asyncio.wait_for(wide, 2)
    assert grant.slots == 3 and (await s.snapshot("m")).running == 3
    grant.release()
    (await asyncio.wait_for(narrow, 2)).release()
    capped = await asyncio.wait_for(take(s, "capped", slots=10), 2)
    assert capped.slots == 3  # never more than the pool has
    capped.release()


async def test_a_larger_pool_grants_its_waiters(make_scheduler: MakeScheduler) -> None:
    from gateway.scheduler.base import PoolLimits

    s = make_scheduler(1)
    running = await take(s, "r")
    waiting = await queued(s, "w")
    s.add_pool("m", PoolLimits(2))
    grant = await asyncio.wait_for(waiting, 2)
    grant.release()
    running.release()


async def test_queued_time_is_reported(make_scheduler: MakeScheduler) -> None:
    s = make_scheduler(1)
    running = await take(s, "r")
    assert running.queued_seconds == 0
    waiting = await queued(s, "w")
    await asyncio.sleep(0.2)
    running.release()
    grant = await asyncio.wait_for(waiting, 2)
    assert 0.15 <= grant.queued_seconds < 2
    grant.release()
