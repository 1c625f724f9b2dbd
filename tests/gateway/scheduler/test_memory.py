"""In-process specifics: the drain-rate estimate and same-instant races."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import QueueFull, TenantQueueFull
from gateway.scheduler.base import PoolLimits
from gateway.scheduler.memory import MemoryScheduler


async def test_retry_after_follows_the_drain_rate() -> None:
    now = [0.0]
    s = MemoryScheduler(clock=lambda: now[0])
    s.add_pool("m", PoolLimits(1, max_queue=1))
    for i in range(5):  # one slot freed every 0.5 s: 2 per second
        grant = await s.acquire("m", f"r{i}", tenant="a", weight=1, priority="interactive")
        now[0] += 0.5
        grant.release()
    await s.acquire("m", "busy", tenant="a", weight=1, priority="interactive")
    waiter = asyncio.create_task(s.acquire("m", "w", tenant="a", weight=1, priority="interactive"))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as full:
        await s.acquire("m", "x", tenant="x", weight=1, priority="interactive")
    assert full.value.retry_after == pytest.approx(1.0)  # position 1 at 2 per second
    assert full.value.headers["Retry-After"] == "1"
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


async def test_a_client_leaving_as_its_slot_arrives_passes_the_slot_on() -> None:
    s = MemoryScheduler()
    s.add_pool("m", PoolLimits(1))
    running = await s.acquire("m", "r", tenant="a", weight=1, priority="interactive")
    leaving = asyncio.create_task(s.acquire("m", "w", tenant="a", weight=1, priority="interactive"))
    staying = asyncio.create_task(s.acquire("m", "s", tenant="b", weight=1, priority="interactive"))
    await asyncio.sleep(0)
    running.release()  # grants "w" (its future is set)...
    leaving.cancel()  # ...and its client leaves before it runs
    await asyncio.gather(leaving, return_exceptions=True)
    grant = await asyncio.wait_for(staying, 1)
    assert s.load("m").running == 1
    grant.release()
    assert s.load("m").running == 0


async def test_a_waiter_leaving_as_a_release_pops_it_is_counted_once() -> None:
    s = MemoryScheduler()
    s.add_pool("m", PoolLimits(1, max_queue_per_tenant=1))
    running = await s.acquire("m", "r", tenant="a", weight=1, priority="interactive")
    waiter = asyncio.create_task(s.acquire("m", "w", tenant="b", weight=1, priority="interactive"))
    await asyncio.sleep(0)
    waiter.cancel()  # the client leaves...
    running.release()  # ...and, before its task runs again, a release pops its entry
    await asyncio.gather(waiter, return_exceptions=True)
    assert s.load("m").running == 0
    # b's allowance of one waiting request is intact: not 0 (refused), not 2
    again = await s.acquire("m", "again", tenant="a", weight=1, priority="interactive")
    one = asyncio.create_task(s.acquire("m", "b1", tenant="b", weight=1, priority="interactive"))
    await asyncio.sleep(0)
    with pytest.raises(TenantQueueFull):
        await s.acquire("m", "b2", tenant="b", weight=1, priority="interactive")
    again.release()
    (await one).release()


async def test_slots_freed_together_do_not_inflate_the_drain_rate() -> None:
    now = [0.0]
    s = MemoryScheduler(clock=lambda: now[0])
    s.add_pool("m", PoolLimits(2, max_queue=1))
    for _ in range(6):  # two slots freed together every 2 s: 1 slot per second
        pair = [
            await s.acquire("m", f"r{i}", tenant="a", weight=1, priority="interactive")
            for i in range(2)
        ]
        now[0] += 2.0
        for grant in pair:
            grant.release()
    held = [await s.acquire("m", f"h{i}", tenant="a", weight=1, priority="interactive")
            for i in range(2)]  # fmt: skip
    waiter = asyncio.create_task(s.acquire("m", "w", tenant="a", weight=1, priority="interactive"))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as full:
        await s.acquire("m", "x", tenant="x", weight=1, priority="interactive")
    assert 1.5 <= full.value.retry_after <= 3  # position 1 at ~1 per second, not ~0
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    for grant in held:
        grant.release()
