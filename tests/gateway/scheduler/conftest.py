"""Every scheduler implementation runs the same contract (``test_contract.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from gateway.scheduler.base import Policy, PoolLimits, Scheduler
from gateway.scheduler.memory import MemoryScheduler

MakeScheduler = Callable[..., Scheduler]


@pytest.fixture(params=["memory"])
async def make_scheduler(request: pytest.FixtureRequest) -> AsyncIterator[MakeScheduler]:
    """``make_scheduler(capacity=1, policy="fair", **limits)``: a started scheduler, pool "m"."""
    made: list[Scheduler] = []

    def make(capacity: int = 1, *, policy: Policy = "fair", **limits: float) -> Scheduler:
        scheduler = MemoryScheduler(policy=policy)
        scheduler.add_pool("m", PoolLimits(capacity, **limits))  # type: ignore[arg-type]
        made.append(scheduler)
        return scheduler

    yield make
    for s in made:
        await s.stop()
