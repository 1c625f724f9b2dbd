"""Engine slots and the queue in front of them, in one process (the default scheduler).

A request runs only in a free slot, so the engines' own queues stay empty and the
waiting happens here, in :class:`~gateway.scheduler.fairness.FairQueue` order. A
freed slot is handed to the next waiter at once, inside :meth:`release` — no polling.

Admission happens before a request waits: a pool whose queue is full refuses with
``PoolFull`` (503), a tenant with too many waiting requests with ``TenantQueueFull``
(429); both carry a ``retry_after`` estimated from the queue position and the rate
at which slots have been freeing up. A waiter that times out gets ``QueueTimeout``
(503); one whose client leaves is cancelled; neither holds a slot.

    grant = await slots.acquire("gemma", "req-1", tenant="a", weight=1.0, priority="batch")
    try: ... finally: slots.release(grant)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.scheduler.fairness import Entry, FairQueue, Priority


class SchedulerRefusal(Exception):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class PoolFull(SchedulerRefusal):
    """The pool's queue holds ``max_queue`` requests already."""


class TenantQueueFull(SchedulerRefusal):
    """This tenant has ``max_queue_per_tenant`` requests waiting already."""


class QueueTimeout(SchedulerRefusal):
    """No slot freed within ``max_wait``."""


@dataclass(slots=True)
class Grant:
    pool: str
    request_id: str
    tenant: str
    weight: float
    queued_seconds: float = 0.0
    released: bool = False


@dataclass(slots=True)
class _Pool:
    capacity: int
    running: int = 0
    queue: FairQueue = field(default_factory=FairQueue)
    waiters: dict[str, tuple[asyncio.Future[None], Entry]] = field(default_factory=dict)
    per_tenant: dict[str, int] = field(default_factory=dict)
    drain_rate: float = 0.0  # slots freed per second, smoothed
    last_release: float | None = None


class MemoryScheduler:
    def __init__(
        self,
        capacities: dict[str, int],
        *,
        max_queue: int = 256,
        max_queue_per_tenant: int = 64,
        max_wait: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pools = {name: _Pool(capacity) for name, capacity in capacities.items()}
        self._max_queue = max_queue
        self._max_per_tenant = max_queue_per_tenant
        self._max_wait = max_wait
        self._clock = clock

    def load(self, pool: str) -> tuple[int, int, int]:
        """(running, waiting, capacity)."""
        p = self._pools[pool]
        return p.running, len(p.queue), p.capacity

    async def acquire(
        self, pool: str, request_id: str, *, tenant: str, weight: float, priority: Priority
    ) -> Grant:
        p = self._pools[pool]
        grant = Grant(pool, request_id, tenant, weight)
        if p.running < p.capacity and not p.waiters:
            p.running += 1
            return grant
        waiting = len(p.queue)
        if waiting >= self._max_queue:
            raise PoolFull(f"The queue for '{pool}' is full.", self._retry_after(p, waiting))
        if p.per_tenant.get(tenant, 0) >= self._max_per_tenant:
            raise TenantQueueFull(
                f"Too many queued requests for this tenant on '{pool}'.",
                self._retry_after(p, waiting),
            )
        entry = p.queue.push(request_id, tenant=tenant, weight=weight, priority=priority)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        p.waiters[request_id] = (future, entry)
        p.per_tenant[tenant] = p.per_tenant.get(tenant, 0) + 1
        started = self._clock()
        try:
            async with asyncio.timeout(self._max_wait):
                await future
        except TimeoutError:
            raise QueueTimeout(
                f"No capacity on '{pool}' within {self._max_wait:g}s.", self._retry_after(p, 0)
            ) from None
        finally:
            if not future.done() or future.cancelled():  # timed out or the client left
                p.queue.remove(entry)
                p.waiters.pop(request_id, None)
                p.per_tenant[tenant] -= 1
        grant.queued_seconds = self._clock() - started
        return grant

    def release(self, grant: Grant) -> None:
        """Free the grant's slot (once) and hand it to the next waiter, if any."""
        if grant.released:
            return
        grant.released = True
        p = self._pools[grant.pool]
        p.running -= 1
        now = self._clock()
        if p.last_release is not None:
            instant = 1.0 / max(now - p.last_release, 1e-3)
            p.drain_rate = instant if p.drain_rate == 0 else 0.8 * p.drain_rate + 0.2 * instant
        p.last_release = now
        self._dispatch(p)

    def charge(self, grant: Grant, tokens: int) -> None:
        """Count served tokens toward the tenant's fair share (as they are produced)."""
        self._pools[grant.pool].queue.charge(grant.tenant, tokens, weight=grant.weight)

    def _dispatch(self, p: _Pool) -> None:
        while p.running < p.capacity:
            entry = p.queue.pop()
            if entry is None:
                return
            future, _ = p.waiters.pop(entry.id)
            p.per_tenant[entry.tenant] -= 1
            if future.done():  # cancelled in the same instant: the slot stays free
                continue
            p.running += 1
            future.set_result(None)

    @staticmethod
    def _retry_after(p: _Pool, position: int) -> float:
        if p.drain_rate <= 0:
            return 1.0
        return max(1.0, (position + 1) / p.drain_rate)
