"""The order in which queued requests get engine slots: pure policy, no I/O, no clock.

1. Priority class first: every ``interactive`` request before any ``batch`` one.
2. Within a class, the tenant whose weighted service so far is smallest: the Virtual
   Token Counter of Sheng et al., "Fairness in Serving Large Language Models" (OSDI '24).
   Each tenant's counter grows by ``tokens / weight`` as its requests are served, so
   between two backlogged tenants the service gap stays bounded, and an idle engine
   is never held back for fairness (work-conserving).
3. A tenant that was not waiting is lifted, on arrival, to the smallest counter among
   the waiting tenants (or to the last served tenant's, if nobody waits): being idle
   earns no credit to spend later in a burst.
4. First in, first out within a tenant.

With ``policy="fcfs"`` the queue ignores all of that and serves in arrival order (what
llama-server and Ollama do): the baseline the fairness benchmark compares against.

    queue = FairQueue()
    queue.push("r1", tenant="team-a", weight=1.0, priority="interactive")
    queue.charge("team-a", 120, weight=1.0)  # as tokens are produced
    entry = queue.pop()
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from gateway.scheduler.base import Policy
from gateway.tenancy.records import Priority

_RANK: dict[str, int] = {"interactive": 0, "batch": 1}


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    tenant: str
    priority: Priority
    seq: int  # arrival order, to break ties
    slots: int = 1


class FairQueue:
    def __init__(self, policy: Policy = "fair") -> None:
        self._fcfs = policy == "fcfs"
        self._queues: dict[tuple[int, str], deque[Entry]] = {}  # (rank, tenant) → FIFO
        self._waiting: dict[str, int] = {}  # tenant → entries queued, all classes
        self._counters: dict[str, float] = {}
        self._last_served: str | None = None
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(self._waiting.values())

    def depth(self, priority: Priority) -> int:
        rank = _RANK[priority]
        return sum(len(q) for (r, _), q in self._queues.items() if r == rank)

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def push(
        self, entry_id: str, *, tenant: str, weight: float, priority: Priority, slots: int = 1
    ) -> Entry:
        if not self._waiting.get(tenant):
            self._lift(tenant)
        entry = Entry(entry_id, tenant, priority, next(self._seq), slots)
        self._queues.setdefault((_RANK[priority], tenant), deque()).append(entry)
        self._waiting[tenant] = self._waiting.get(tenant, 0) + 1
        return entry

    def _lift(self, tenant: str) -> None:
        waiting = [t for t, n in self._waiting.items() if n]
        if waiting:
            floor = min(self.counter(t) for t in waiting)
        elif self._last_served is not None:
            floor = self.counter(self._last_served)
        else:
            floor = 0.0
        self._counters[tenant] = max(self.counter(tenant), floor)

    def peek(self) -> Entry | None:
        """The entry :meth:`pop` would return, left in place."""
        best: tuple[int, float, int] | None = None
        head: Entry | None = None
        for (rank, tenant), queue in self._queues.items():
            first = queue[0]
            if self._fcfs:
                candidate = (0, 0.0, first.seq)
            else:
                candidate = (rank, self.counter(tenant), first.seq)
            if best is None or candidate < best:
                best, head = candidate, first
        return head

    def pop(self) -> Entry | None:
        """The next entry to serve, or None if nothing waits."""
        entry = self.peek()
        if entry is None:
            return None
        self._take((_RANK[entry.priority], entry.tenant))
        self._last_served = entry.tenant
        return entry

    def remove(self, entry: Entry) -> bool:
        """Take ``entry`` out (its client left, or it waited too long); False if not queued."""
        key = (_RANK[entry.priority], entry.tenant)
        queue = self._queues.get(key)
        if queue is None or entry not in queue:
            return False
        queue.remove(entry)
        if not queue:
            del self._queues[key]
        self._waiting[entry.tenant] -= 1
        return True

    def _take(self, key: tuple[int, str]) -> Entry:
        queue = self._queues[key]
        entry = queue.popleft()
        if not queue:
            del self._queues[key]
        self._waiting[entry.tenant] -= 1
        return entry

    def charge(self, tenant: str, tokens: int, *, weight: float) -> None:
        """Count served tokens (prompt and generated, as they happen) against the tenant."""
        self._counters[tenant] = self.counter(tenant) + tokens / weight
