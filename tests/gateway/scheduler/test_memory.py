from __future__ import annotations

import asyncio

import pytest

from gateway.scheduler.memory import (
    Grant,
    MemoryScheduler,
    PoolFull,
    QueueTimeout,
    TenantQueueFull,
)


async def take(s: MemoryScheduler, rid: str, tenant: str = "a", priority: str = "interactive",
               weight: float = 1.0) -> Grant:  # fmt: skip
    return await s.acquire("m", rid, tenant=tenant, weight=weight, priority=priority)  # type: ignore[arg-type]


async def test_free_slots_are_granted_at_once_and_never_oversubscribed() -> None:
    s = MemoryScheduler({"m": 2})
    a, b = await take(s, "a"), await take(s, "b")
    waiting = asyncio.create_task(take(s, "c"))
    await asyncio.sleep(0)
    assert s.load("m") == (2, 1, 2)
    assert not waiting.done()
    s.release(a)
    c = await waiting  # handed over inside release(): no polling
    assert s.load("m") == (2, 0, 2)
    s.release(a)  # twice is a no-op
    assert s.load("m") == (2, 0, 2)
    s.release(b)
    s.release(c)
    assert s.load("m") == (0, 0, 2)


async def test_a_freed_slot_goes_to_the_light_tenant_first() -> None:
    s = MemoryScheduler({"m": 1})
    running = await take(s, "h0", tenant="heavy")
    s.charge(running, 5000)
    order: list[str] = []

    async def queued(rid: str, tenant: str) -> None:
        grant = await take(s, rid, tenant=tenant)
        order.append(rid)
        s.charge(grant, 100)
        s.release(grant)

    tasks = [asyncio.create_task(queued(f"h{i}", "heavy")) for i in range(1, 4)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(queued("l1", "light")))
    await asyncio.sleep(0)
    # light arrived level with heavy (no banked credit); heavy's running request keeps
    # producing tokens while light waits, so light is behind when the slot frees
    s.charge(running, 50)
    s.release(running)
    await asyncio.gather(*tasks)
    assert order[0] == "l1"


async def test_interactive_before_batch() -> None:
    s = MemoryScheduler({"m": 1})
    running = await take(s, "r")
    batch = asyncio.create_task(take(s, "b", priority="batch"))
    await asyncio.sleep(0)
    chat = asyncio.create_task(take(s, "i", priority="interactive"))
    await asyncio.sleep(0)
    s.release(running)
    first = await chat
    assert not batch.done()
    s.release(first)
    s.release(await batch)


async def test_queue_limits_refuse_before_waiting() -> None:
    s = MemoryScheduler({"m": 1}, max_queue=3, max_queue_per_tenant=2)
    await take(s, "r")
    waiting = [asyncio.create_task(take(s, f"a{i}")) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(TenantQueueFull):
        await take(s, "a9")
    waiting.append(asyncio.create_task(take(s, "b1", tenant="b")))
    await asyncio.sleep(0)
    with pytest.raises(PoolFull) as full:
        await take(s, "c1", tenant="c")
    assert full.value.retry_after >= 1
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert s.load("m") == (1, 0, 1)


async def test_timeout_and_cancellation_leave_no_slot_behind() -> None:
    s = MemoryScheduler({"m": 1}, max_wait=0.05)
    running = await take(s, "r")
    with pytest.raises(QueueTimeout):
        await take(s, "late")
    gone = asyncio.create_task(take(s, "gone"))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert s.load("m") == (1, 0, 1)
    s.release(running)
    assert s.load("m") == (0, 0, 1)
    assert (await take(s, "next")).request_id == "next"


async def test_retry_after_follows_the_drain_rate() -> None:
    now = [0.0]
    s = MemoryScheduler({"m": 1}, max_queue=1, clock=lambda: now[0])
    for i in range(5):  # one slot freed every 0.5 s: 2 per second
        grant = await take(s, f"r{i}")
        now[0] += 0.5
        s.release(grant)
    await take(s, "busy")
    waiter = asyncio.create_task(take(s, "w"))
    await asyncio.sleep(0)
    with pytest.raises(PoolFull) as full:
        await take(s, "x", tenant="x")
    assert full.value.retry_after == pytest.approx(1.0)  # position 1 at 2 per second
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
