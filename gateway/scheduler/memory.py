"""Engine slots and the queue in front of them, in one process (the default scheduler).

A freed slot is handed to the next waiter inside :meth:`Grant.release` — no polling.
Admission happens before a request waits: a full pool refuses with ``QueueFull``
(503), a tenant with too many waiting requests with ``TenantQueueFull`` (429); both
carry a retry delay estimated from the queue position and the rate at which slots
have been freeing up. A waiter that times out gets ``QueueTimeout`` (503); one whose
task is cancelled (the client left) leaves the queue; neither holds a slot.

    scheduler = MemoryScheduler()
    scheduler.add_pool("gemma@embedded", PoolLimits(capacity=16))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.scheduler.base import Grant, Policy, PoolLimits, PoolLoad
from gateway.scheduler.fairness import Entry, FairQueue
from gateway.tenancy.records import Priority


@dataclass(slots=True)
class DrainRate:
    """Slots freed per second, smoothed: the basis of every Retry-After.

    It averages the time *per slot* between releases and inverts that, rather than
    averaging instantaneous rates: slots often free together (one engine step, an
    ``n > 1`` request), and a rate sample of 1000/s for each would swamp the mean.
    """

    per_second: float = 0.0
    last: float | None = None
    interval: float | None = None  # seconds per freed slot, smoothed

    def freed(self, now: float, slots: int = 1) -> None:
        if self.last is not None:
            sample = (now - self.last) / slots
            self.interval = sample if self.interval is None else 0.8 * self.interval + 0.2 * sample
            self.per_second = 1.0 / max(self.interval, 1e-3)
        self.last = now

    def retry_after(self, position: int) -> float:
        """Seconds until ``position`` waiters ahead have drained (at least 1)."""
        if self.per_second <= 0:
            return 1.0
        return max(1.0, (position + 1) / self.per_second)


@dataclass(slots=True)
class _Pool:
    limits: PoolLimits
    queue: FairQueue
    running: int = 0
    waiters: dict[Entry, asyncio.Future[None]] = field(default_factory=dict)
    per_tenant: dict[str, int] = field(default_factory=dict)
    drain: DrainRate = field(default_factory=DrainRate)


class MemoryScheduler:
    def __init__(
        self, *, policy: Policy = "fair", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pools: dict[str, _Pool] = {}
        self._policy = policy
        self._clock = clock

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def add_pool(self, pool: str, limits: PoolLimits) -> None:
        existing = self._pools.get(pool)
        if existing is None:
            self._pools[pool] = _Pool(limits, FairQueue(self._policy))
        else:
            existing.limits = limits
            self._dispatch(existing)  # more capacity: hand it out now

    def load(self, pool: str) -> PoolLoad:
        p = self._pools[pool]
        waiting = {"interactive": p.queue.depth("interactive"), "batch": p.queue.depth("batch")}
        return PoolLoad(p.running, p.limits.capacity, waiting, p.drain.per_second)

    async def snapshot(self, pool: str) -> PoolLoad:
        return self.load(pool)

    async def acquire(
        self,
        pool: str,
        request_id: str,
        *,
        tenant: str,
        weight: float,
        priority: Priority,
        slots: int = 1,
    ) -> Grant:
        p = self._pools[pool]
        limits = p.limits
        slots = max(1, min(slots, limits.capacity))
        grant = Grant(self, pool, request_id, tenant, weight, slots)
        if p.running + slots <= limits.capacity and not p.waiters:
            p.running += slots
            return grant
        waiting = len(p.queue)
        if waiting >= limits.max_queue:
            raise limits.full(waiting, p.drain.retry_after(waiting))
        if p.per_tenant.get(tenant, 0) >= limits.max_queue_per_tenant:
            raise limits.tenant_full(p.drain.retry_after(waiting))
        entry = p.queue.push(
            request_id, tenant=tenant, weight=weight, priority=priority, slots=slots
        )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        p.waiters[entry] = future  # by entry, not request id: ids come from clients too
        p.per_tenant[tenant] = p.per_tenant.get(tenant, 0) + 1
        started = self._clock()
        try:
            async with asyncio.timeout(limits.max_wait):
                await future
        except BaseException as exc:
            granted = future.done() and not future.cancelled()
            if granted and isinstance(exc, TimeoutError):
                pass  # the slot came at the deadline: serve it
            elif granted:  # the client left in the instant its slot came: pass it on
                grant.release()
                raise
            else:
                # Still queued, unless a release popped it in the same loop pass (and
                # already did this bookkeeping).
                if p.queue.remove(entry):
                    del p.waiters[entry]
                    p.per_tenant[tenant] -= 1
                self._dispatch(p)  # a wide head that left may unblock narrower ones
                if isinstance(exc, TimeoutError):
                    raise limits.timed_out(p.drain.retry_after(len(p.queue))) from None
                raise
        grant.queued_seconds = self._clock() - started
        return grant

    def _release(self, grant: Grant) -> None:
        p = self._pools[grant.pool]
        p.running -= grant.slots
        p.drain.freed(self._clock(), grant.slots)
        self._dispatch(p)

    def _charge(self, grant: Grant, tokens: int) -> None:
        self._pools[grant.pool].queue.charge(grant.tenant, tokens, weight=grant.weight)

    def _dispatch(self, p: _Pool) -> None:
        # Strict order: a head needing more slots than are free waits, and so does
        # everyone behind it, rather than being overtaken forever by narrow requests.
        while (head := p.queue.peek()) is not None:
            if p.running + head.slots > p.limits.capacity:
                return
            p.queue.pop()
            future = p.waiters.pop(head)
            p.per_tenant[head.tenant] -= 1
            if future.done():  # cancelled in the same instant: the slots stay free
                continue
            p.running += head.slots
            future.set_result(None)
