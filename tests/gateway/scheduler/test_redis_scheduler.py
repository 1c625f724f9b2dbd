"""Replicas sharing one pool through a real redis-server (the contract runs in test_contract.py)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from gateway.errors import QueueFull, SchedulerRefusal, StateUnavailable
from gateway.scheduler.base import Grant, PoolLimits
from gateway.scheduler.redis_scheduler import RedisScheduler
from gateway.tenancy.redis_link import RedisLink
from tests.gateway.scheduler.test_contract import queued, settle, take
from tests.redis_server import RedisServer

Replicas = Callable[..., Awaitable[list[RedisScheduler]]]


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[Replicas]:
    """``await replicas(capacity, n=2, lease_ttl=10.0, **limits)``: started, one link each."""
    made: list[tuple[RedisScheduler, RedisLink]] = []

    async def make(
        capacity: int, *, n: int = 2, lease_ttl: float = 10.0, **limits: float
    ) -> list[RedisScheduler]:
        for i in range(n):
            link = RedisLink(redis_url, timeout=0.25)
            scheduler = RedisScheduler(link, lease_ttl=lease_ttl, replica=f"replica-{i}")
            scheduler.add_pool("m", PoolLimits(capacity, **limits))  # type: ignore[arg-type]
            await scheduler.start()
            made.append((scheduler, link))
        return [s for s, _ in made[-n:]]

    yield make
    for scheduler, link in made:
        await scheduler.stop()
        await link.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def kill(scheduler: RedisScheduler) -> None:
    """Like kill -9: background work stops, nothing is given back."""
    scheduler._stopping = True  # as stop() does: redis-py may swallow the inbox's cancel
    for task in scheduler._tasks:
        task.cancel()
    await asyncio.gather(*scheduler._tasks, return_exceptions=True)


async def test_capacity_is_shared_and_a_release_on_one_grants_a_waiter_on_the_other(
    replicas: Replicas,
) -> None:
    a, b = await replicas(3)
    held = [await take(a, "a1"), await take(b, "b1"), await take(a, "a2")]
    waiting = await queued(b, "b2")  # three slots in use in total: B must wait
    load = await a.snapshot("m")
    assert (load.running, load.waiting["interactive"]) == (3, 1)
    held[0].release()
    grant = await asyncio.wait_for(waiting, 2)
    assert grant.request_id == "b2" and grant.queued_seconds > 0
    for g in [*held[1:], grant]:
        g.release()
    await settle()
    assert (await b.snapshot("m")).running == 0


async def test_fairness_and_priority_hold_across_replicas(replicas: Replicas) -> None:
    a, b = await replicas(1)
    running = await take(a, "h0", "heavy")
    running.charge(5000)
    tasks = [await queued(a, f"h{i}", "heavy") for i in (1, 2)]
    tasks.append(await queued(a, "bulk", "batchy", "batch"))
    tasks.append(await queued(b, "l1", "light"))
    running.charge(50)
    running.release()
    order: list[str] = []
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=2, return_when="FIRST_COMPLETED")
        assert len(done) == 1
        grant: Grant = done.pop().result()
        order.append(grant.request_id)
        grant.release()
    assert order == ["l1", "h1", "h2", "bulk"]


async def test_a_killed_replica_loses_its_slots_and_queue_within_the_lease(
    replicas: Replicas,
) -> None:
    a, b = await replicas(2, lease_ttl=1.0)
    mine, theirs = await take(a, "a1"), await take(b, "b1")
    waiting = await queued(a, "wa")
    orphan = await queued(b, "wb", "other")
    killed = time.monotonic()
    await kill(b)
    grant = await asyncio.wait_for(waiting, 3)  # b1's lease ran out, nobody released it
    for _ in range(60):  # wb goes when B's replica key expires
        if not sum((await a.snapshot("m")).waiting.values()):
            break
        await asyncio.sleep(0.05)
    assert time.monotonic() - killed < 1.0 + 1.0 / 3 + 0.5  # a lease and a heartbeat, + slack
    load = await a.snapshot("m")
    assert (load.running, sum(load.waiting.values())) == (2, 0)  # wb dropped, not granted
    assert theirs.released is False
    mine.release()
    grant.release()
    await settle()
    assert (await a.snapshot("m")).running == 0 and not orphan.done()
    orphan.cancel()
    await asyncio.gather(orphan, return_exceptions=True)


async def test_a_grant_whose_waiter_left_goes_to_the_next(replicas: Replicas) -> None:
    a, b = await replicas(1)
    running = await take(a, "r")
    gone = await queued(b, "gone")
    nxt = await queued(a, "next", "t2")
    await kill(b)  # B's inbox stops: the grant for "gone" will sit undelivered
    running.release()
    await settle()
    assert not gone.done() and not nxt.done()
    gone.cancel()  # the client leaves with its grant in flight
    await asyncio.gather(gone, return_exceptions=True)
    grant = await asyncio.wait_for(nxt, 2)
    assert (await a.snapshot("m")).running == 1
    grant.release()


async def test_many_requests_never_oversubscribe_and_leave_nothing_behind(
    replicas: Replicas,
) -> None:
    capacity = 3
    pair = await replicas(capacity, max_queue=40, max_queue_per_tenant=6, max_wait=0.2)
    rng = random.Random(42)
    loop = asyncio.get_running_loop()
    held = peak = 0
    outcome: dict[str, str] = {}
    clients = asyncio.Semaphore(24)

    def record(rid: str, what: str) -> None:
        assert rid not in outcome, f"{rid}: {outcome[rid]}, then {what}"
        outcome[rid] = what

    async def client(i: int) -> None:
        nonlocal held, peak
        rid, s = f"r{i}", pair[i % 2]
        slots, hold = rng.choice((1, 1, 1, 2)), rng.random() * (0.1 if i % 50 == 0 else 0.006)
        leave_after = rng.random() * 0.1 if rng.random() < 0.1 else None
        async with clients:
            acquiring = asyncio.create_task(
                s.acquire(
                    "m",
                    rid,
                    tenant=f"t{rng.randrange(5)}",
                    weight=rng.choice((1.0, 2.0)),
                    priority=rng.choice(("interactive", "batch")),
                    slots=slots,
                )
            )
            if leave_after is not None:
                loop.call_later(leave_after, acquiring.cancel)
            try:
                grant = await acquiring
            except SchedulerRefusal as exc:
                return record(rid, type(exc).__name__)
            except asyncio.CancelledError:
                return record(rid, "cancelled")
            record(rid, "granted")
            held += grant.slots
            peak = max(peak, held)
            assert held <= capacity
            await asyncio.sleep(hold)
            grant.charge(rng.randrange(1, 100))
            held -= grant.slots
            grant.release()

    await asyncio.gather(*(client(i) for i in range(1000)))
    assert len(outcome) == 1000
    assert peak == capacity and list(outcome.values()).count("granted") > 500
    await settle()
    for s in pair:
        load = await s.snapshot("m")
        assert (load.running, sum(load.waiting.values())) == (0, 0)


async def test_entries_are_plain_json(replicas: Replicas, raw: aioredis.Redis) -> None:
    (s,) = await replicas(1, n=1, max_wait=5)
    running = await take(s, "r")
    waiting = await queued(s, "w", "team", "batch", weight=2.0, slots=1)
    [(entry_id, blob)] = (await raw.hgetall("lg:sched:m:entries")).items()
    entry = json.loads(blob)
    assert entry["id"].encode() == entry_id and entry["id"].startswith("w/")
    assert entry["rid"] == "w"
    assert (entry["tenant"], entry["priority"], entry["weight"]) == ("team", "batch", 2)
    assert (entry["replica"], entry["pool"], entry["slots"]) == (s.replica, "m", 1)
    assert entry["deadline"] - entry["enqueued"] == 5000 and entry["seq"] >= 1
    running.release()
    (await asyncio.wait_for(waiting, 2)).release()


async def test_retry_after_follows_the_drain_rate_all_replicas_share(
    replicas: Replicas, raw: aioredis.Redis
) -> None:
    a, b = await replicas(1, max_queue=2)
    for i in range(4):  # A frees a slot every 0.4 s: 2.5 per second
        grant = await take(a, f"r{i}")
        await asyncio.sleep(0.4)
        grant.release()
    running = await take(a, "busy")
    waiting = [await queued(a, "w1"), await queued(b, "w2", "t2")]
    with pytest.raises(QueueFull) as full:
        await take(b, "x", "t3")  # B never freed a slot, yet knows the rate
    rate = float(await raw.hget("lg:sched:m:stats", "rate") or 0)
    assert rate == pytest.approx(2.5, rel=0.2)
    assert full.value.retry_after == pytest.approx(3 / rate)  # 2 ahead, then this one
    running.release()
    for task in waiting:
        (await asyncio.wait_for(task, 2)).release()


async def test_charges_reach_the_counter_while_the_request_runs(
    replicas: Replicas, raw: aioredis.Redis
) -> None:
    (s,) = await replicas(1, n=1)
    grant = await take(s, "r", weight=2.0)
    for _ in range(10):
        grant.charge(10)  # per chunk; batched into one call
    await asyncio.sleep(0.25)
    assert float(await raw.hget("lg:sched:m:vtc", "a") or 0) == 50  # 100 tokens at weight 2
    grant.release()


async def test_acquire_fails_closed_while_redis_is_down(own_redis: RedisServer) -> None:
    link = RedisLink(own_redis.url, timeout=0.25, probe_interval=0.1)
    s = RedisScheduler(link, replica="r")
    s.add_pool("m", PoolLimits(1))
    await s.start()
    try:
        grant = await take(s, "before")
        own_redis.stop()
        with pytest.raises(StateUnavailable):
            await take(s, "during")
        grant.charge(10)  # skipped, not raised: the lease frees the slot
        grant.release()
        await asyncio.sleep(0.3)  # the heartbeat and inbox keep retrying meanwhile
        own_redis.start()  # empty: what the old server held is gone, as after a failover
        for _ in range(50):
            if not link.degraded:
                break
            await asyncio.sleep(0.05)
        running = await take(s, "after")
        waiting = await queued(s, "w")
        running.release()
        (await asyncio.wait_for(waiting, 2)).release()  # the inbox survived the outage
    finally:
        await s.stop()
        await link.close()
