"""The scheduler interface: engine slots per pool, and the queue in front of them.

A *pool* is one backend instance's capacity: ``max_sequences`` of the embedded
engine, llama-server's slots, a configured concurrency for vLLM or Ollama. A
request runs only once it holds a :class:`Grant` for its slots, so the engines'
own queues stay empty and waiting happens in one place, in fair order (see
:mod:`gateway.scheduler.fairness`).

    grant = await scheduler.acquire("gemma@embedded", rid, tenant="a", weight=1.0,
                                    priority="interactive", slots=1)
    try:
        ...                    # generate; grant.charge(tokens) as tokens are produced
    finally:
        grant.release()        # hands the slots to the next waiter at once

Refusals are :class:`~gateway.errors.SchedulerRefusal` subclasses: ``QueueFull``
(503), ``TenantQueueFull`` (429), ``QueueTimeout`` (503), each with a retry delay.
A waiter whose task is cancelled (its client left) leaves the queue at once.

Implementations: :class:`~gateway.scheduler.memory.MemoryScheduler` (one process)
and :class:`~gateway.scheduler.redis_scheduler.RedisScheduler` (replicas sharing Redis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.errors import QueueFull, QueueTimeout, TenantQueueFull
from gateway.tenancy.records import Priority

Policy = Literal["fair", "fcfs"]


@dataclass(frozen=True, slots=True)
class PoolLimits:
    capacity: int  # slots
    max_queue: int = 256  # waiting requests, all tenants
    max_queue_per_tenant: int = 64
    max_wait: float = 30.0  # seconds in the queue before QueueTimeout

    # The refusals, worded once for every implementation.
    def full(self, waiting: int, retry_after: float) -> QueueFull:
        return QueueFull(
            f"The queue for this model is full ({waiting} waiting); retry later.",
            retry_after=retry_after,
        )

    def tenant_full(self, retry_after: float) -> TenantQueueFull:
        return TenantQueueFull(
            f"Too many of your requests are already queued for this model "
            f"(at most {self.max_queue_per_tenant}).",
            retry_after=retry_after,
        )

    def timed_out(self, retry_after: float) -> QueueTimeout:
        return QueueTimeout(
            f"No capacity for this model within {self.max_wait:g}s.", retry_after=retry_after
        )


@dataclass(frozen=True, slots=True)
class PoolLoad:
    running: int  # slots in use
    capacity: int
    waiting: dict[str, int] = field(default_factory=dict)  # priority → queued requests
    drain_per_second: float = 0.0  # slots freed per second, smoothed (0: not known yet)


class GrantOwner(Protocol):
    def _release(self, grant: Grant) -> None: ...
    def _charge(self, grant: Grant, tokens: int) -> None: ...


@dataclass(slots=True, eq=False)
class Grant:
    """Slots held by one request; release exactly once (again is a no-op)."""

    owner: GrantOwner
    pool: str
    request_id: str
    tenant: str
    weight: float
    slots: int = 1
    queued_seconds: float = 0.0
    released: bool = False

    def charge(self, tokens: int) -> None:
        """Count served tokens (prompt and generated, as produced) toward the tenant's share."""
        if tokens > 0 and not self.released:
            self.owner._charge(self, tokens)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner._release(self)


class Scheduler(Protocol):
    async def start(self) -> None:
        """Start background work (heartbeats, grant delivery); called from the lifespan."""
        ...

    async def stop(self) -> None: ...

    def add_pool(self, pool: str, limits: PoolLimits) -> None:
        """Declare a pool (before or after start); again with new limits resizes it."""
        ...

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
        """Wait for ``slots`` free slots (capped at the pool's capacity) in fair order."""
        ...

    def load(self, pool: str) -> PoolLoad:
        """For metrics at scrape time: no I/O, so a shared pool's figures may lag a little."""
        ...

    async def snapshot(self, pool: str) -> PoolLoad:
        """Exact figures now (a shared pool asks Redis)."""
        ...
