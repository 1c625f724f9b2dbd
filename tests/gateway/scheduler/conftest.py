"""Every scheduler implementation runs the same contract (``test_contract.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.scheduler.base import Policy, PoolLimits, Scheduler
from gateway.scheduler.memory import MemoryScheduler
from gateway.scheduler.redis_scheduler import RedisScheduler
from gateway.tenancy.redis_link import RedisLink

MakeScheduler = Callable[..., Scheduler]


@pytest.fixture(params=["memory", "redis"])
async def make_scheduler(request: pytest.FixtureRequest) -> AsyncIterator[MakeScheduler]:
    """``make_scheduler(capacity=1, policy="fair", **limits)``: a started scheduler, pool "m"."""
    made: list[Scheduler] = []
    links: list[RedisLink] = []
    starting: list[asyncio.Task[None]] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""

    def make(capacity: int = 1, *, policy: Policy = "fair", **limits: float) -> Scheduler:
        scheduler: Scheduler
        if request.param == "memory":
            scheduler = MemoryScheduler(policy=policy)
        else:
            links.append(RedisLink(url, timeout=0.25))
            scheduler = RedisScheduler(links[-1], policy=policy)
        scheduler.add_pool("m", PoolLimits(capacity, **limits))  # type: ignore[arg-type]
        # make() is synchronous: start() runs at the test's first await, before any grant
        # could need delivering (grants wait in the replica's inbox until then anyway).
        starting.append(asyncio.get_running_loop().create_task(scheduler.start()))
        made.append(scheduler)
        return scheduler

    yield make
    await asyncio.gather(*starting)
    for s in made:
        await s.stop()
    for link in links:
        await link.close()
