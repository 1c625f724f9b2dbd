"""Placement: which instance of a model the next request queues on. Pure policy, no I/O.

The service describes each instance of the requested model as an
:class:`InstanceState` (from its backend and the scheduler's view of its pool)
and queues the request on the one :func:`place` picks:

    >>> place([InstanceState("a", ready=False), InstanceState("b", ready=True)])
    1

Today's policy is the first ready instance in configured order, else the first
(whose backend then answers 503, which says what is wrong). Load-aware placement,
tiers and weights replace it without changing the seam.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InstanceState:
    """One instance of a model as placement sees it."""

    id: str  # "embedded", an upstream URL...
    ready: bool  # loaded and passing its health probe
    running: int = 0  # slots held by requests
    capacity: int = 1  # slots
    waiting: int = 0  # requests queued for a slot


def place(instances: Sequence[InstanceState]) -> int:
    """The index of the instance to queue on; ``instances`` is never empty."""
    for i, instance in enumerate(instances):
        if instance.ready:
            return i
    return 0
