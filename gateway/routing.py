"""Placement: which instance of a model the next request queues on. Pure policy, no I/O.

The router (:mod:`gateway.router`) describes each instance of the requested model as
an :class:`InstanceState` — its tier, weight and health, and the live load it
already has: slots held and free, the gateway's queue, the pool's drain rate, the
engine's own queue — and queues the request on the one :func:`place` picks::

    >>> place([InstanceState("a", ready=False), InstanceState("b", ready=True)]).index
    1

The policy, in order:

1. **Tiers.** Tier 0 takes every request it can; a higher tier takes spillover only:
   when the lower tier has no healthy instance, or its least expected wait exceeds
   ``spill_after`` seconds and the higher tier would start the request sooner.
2. **Health.** Instances that are not ready, ejected (:mod:`gateway.outliers`) or
   already tried by this request are left out — unless more than half of a tier is
   ejected, when ejection is ignored for it (Envoy's panic threshold: a mass ejection
   says more about the traffic than about the instances).
3. **Least expected wait** (:func:`expected_wait`): free slots start at once; else the
   queue ahead divided by the pool's drain rate.
4. **Among equals, weights**: instances whose waits are within :data:`EQUAL_WAIT` of
   the best split requests by ``weight`` (a canary's share; 0 takes none).
5. **Affinity**: with a key (a prompt prefix or a session), rendezvous hashing picks
   the same instance for the same key while its load stays within ``load_bound``
   times the tier's mean (+1), else the next in its ranking (consistent hashing with
   bounded loads), so engine-side prompt caches keep hitting without piling a hot
   prefix onto one instance.

With no instance left at all, the first ready one (else the first) is returned, so
that its backend answers the 503 that says what is wrong.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Waits this close (seconds) are equal: the weights decide between them.
EQUAL_WAIT = 0.05
# What a slot is assumed to take before the pool has drained anything (seconds).
UNKNOWN_SERVICE_TIME = 1.0


@dataclass(frozen=True, slots=True)
class InstanceState:
    """One instance of a model as placement sees it."""

    id: str
    ready: bool  # loaded and passing its health probe
    running: int = 0  # slots held by requests (the scheduler's count)
    capacity: int = 1  # slots
    waiting: int = 0  # requests in the gateway's queue for it
    drain_per_second: float = 0.0  # slots freed per second, smoothed; 0 = not known yet
    engine_waiting: int = 0  # queued inside the engine itself (other clients of a vLLM)
    tier: int = 0
    weight: float = 100.0
    ejected: bool = False
    tried: bool = False  # this request already failed on it


@dataclass(frozen=True, slots=True)
class Placement:
    index: int
    wait: float  # the expected wait there, seconds
    spilled: bool = False  # placed on a higher tier than the lowest configured one


def expected_wait(s: InstanceState) -> float:
    """Seconds until a request queued now would hold a slot."""
    ahead = s.waiting + s.engine_waiting
    free = s.capacity - s.running
    if free > ahead:
        return 0.0
    rate = s.drain_per_second or s.capacity / UNKNOWN_SERVICE_TIME
    return (ahead - free + 1) / max(rate, 1e-6)


def affinity_rank(key: int, s: InstanceState) -> float:
    """Weighted rendezvous score of ``s`` for ``key``: the highest wins."""
    digest = hashlib.blake2b(f"{key}:{s.id}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)  # in (0, 1)
    return -max(s.weight, 1e-9) / math.log(u)


def place(
    instances: Sequence[InstanceState],
    *,
    spill_after: float = math.inf,
    spill: bool = True,
    key: int | None = None,
    load_bound: float = 1.25,
    draw: float = 0.0,
) -> Placement:
    """Where to queue; ``instances`` is never empty, ``draw`` is uniform in [0, 1)."""
    by_tier: dict[int, list[int]] = {}
    for i, s in enumerate(instances):
        by_tier.setdefault(s.tier, []).append(i)
    lowest = min(by_tier)
    live = [(t, ok) for t, m in sorted(by_tier.items()) if (ok := _eligible(instances, m))]
    if not spill:  # this request may not leave the primary tier
        live = live[:1] if live and live[0][0] == lowest else []
    if not live:
        scope = by_tier[lowest] if not spill else list(range(len(instances)))
        ready = [i for i in scope if instances[i].ready and not instances[i].tried]
        first = ready[0] if ready else scope[0]
        return Placement(first, expected_wait(instances[first]))
    tier, members = live[0]
    best = min(expected_wait(instances[i]) for i in members)
    if best > spill_after:
        for higher_tier, higher in live[1:]:
            wait = min(expected_wait(instances[i]) for i in higher)
            if wait < best:
                tier, members, best = higher_tier, higher, wait
                break
    index = _choose(instances, members, key=key, load_bound=load_bound, draw=draw)
    return Placement(index, expected_wait(instances[index]), spilled=tier != lowest)


def _eligible(instances: Sequence[InstanceState], members: list[int]) -> list[int]:
    up = [i for i in members if instances[i].ready and not instances[i].tried]
    healthy = [i for i in up if not instances[i].ejected]
    if len(healthy) * 2 < len(up):  # panic: most of the tier is ejected
        healthy = up
    return [i for i in healthy if instances[i].weight > 0]


def _choose(
    instances: Sequence[InstanceState],
    members: list[int],
    *,
    key: int | None,
    load_bound: float,
    draw: float,
) -> int:
    if len(members) == 1:
        return members[0]
    if key is not None:
        load = {i: instances[i].running + instances[i].waiting for i in members}
        bound = load_bound * sum(load.values()) / len(members) + 1
        ranked = sorted(members, key=lambda i: affinity_rank(key, instances[i]), reverse=True)
        for i in ranked:
            if load[i] <= bound:
                return i
    waits = {i: expected_wait(instances[i]) for i in members}
    best = min(waits.values())
    equals = [i for i in members if waits[i] <= best + EQUAL_WAIT]
    total = sum(instances[i].weight for i in equals)
    point = draw * total
    for i in equals:
        point -= instances[i].weight
        if point < 0:
            return i
    return equals[-1]
