"""Outlier ejection: request outcomes, not only health probes, decide whether an instance
takes traffic (after Envoy's outlier detection).

    outliers = Outliers(eject_after=5, eject_seconds=30.0)
    outliers.failed("chat@gpu-a", tier=["chat@gpu-a", "chat@gpu-b"])   # True once ejected
    outliers.state("chat@gpu-a")          # "healthy" | "ejected" | "half_open"

``eject_after`` consecutive failures eject an instance for ``eject_seconds`` times the
number of times it has been ejected (at most 300 s). Never more than half of a tier is ejected at
once (the routing policy also ignores ejection for a tier that is mostly ejected).
When the time is over the instance is *half-open*: it takes one trial request (if its
health probe passes — placement only picks ready instances); success readmits it, a
failure ejects it again for longer. A failed probe while ejected changes nothing.

With a :class:`Board` (Redis, :mod:`gateway.outliers_redis`), an ejection decided by
one replica is published, and every replica takes the others' ejections from it: one
replica's evidence ejects the instance for all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger(__name__)

State = Literal["healthy", "ejected", "half_open"]
MAX_EJECTION = 300.0  # seconds


@dataclass(slots=True)
class _Instance:
    consecutive: int = 0
    times_ejected: int = 0
    until: float = 0.0  # monotonic; ejected before it
    trial: bool = False  # a half-open trial request is in flight


class Board(Protocol):
    """Where replicas share ejections: pool → (wall-clock end, times ejected)."""

    def publish(self, pool: str, until_wall: float, times: int) -> None: ...
    def ejections(self) -> Mapping[str, tuple[float, int]]: ...


class Outliers:
    def __init__(
        self,
        *,
        eject_after: int,
        eject_seconds: float,
        board: Board | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.eject_after = eject_after
        self.eject_seconds = eject_seconds
        self.board = board
        self._clock = clock
        self._wall = wall
        self._instances: dict[str, _Instance] = {}

    def _get(self, pool: str) -> _Instance:
        found = self._instances.get(pool)
        if found is None:
            found = self._instances[pool] = _Instance()
        self._merge(pool, found)
        return found

    def _merge(self, pool: str, mine: _Instance) -> None:
        """Take an ejection another replica published, if it ends later than ours."""
        if self.board is None:
            return
        shared = self.board.ejections().get(pool)
        if shared is None or shared[0] <= self._wall():  # none, or over already
            return
        until = self._clock() + (shared[0] - self._wall())
        if until > mine.until + 0.5:  # a new ejection, not our own published one
            mine.until, mine.times_ejected, mine.consecutive = until, shared[1], 0
            mine.trial = False

    def state(self, pool: str) -> State:
        me = self._get(pool)
        if me.until == 0.0:
            return "healthy"
        return "ejected" if self._clock() < me.until else "half_open"

    def takes_requests(self, pool: str) -> bool:
        """Whether placement may pick it now: not ejected, and no half-open trial running."""
        state = self.state(pool)
        return state == "healthy" or (state == "half_open" and not self._get(pool).trial)

    def placed(self, pool: str) -> None:
        """A request was placed on it; in half-open state it is the trial."""
        if self.state(pool) == "half_open":
            self._get(pool).trial = True

    def abandoned(self, pool: str) -> None:
        """A request placed on it ended saying nothing of it (a 4xx, a full queue, the
        client gone): if it was the half-open trial, the next request is."""
        self._get(pool).trial = False

    def succeeded(self, pool: str) -> None:
        me = self._get(pool)
        me.consecutive = 0
        if me.until and self._clock() >= me.until:  # the half-open trial (or a late one)
            log.info("instance %s answered again: readmitted", pool)
            me.until, me.trial = 0.0, False

    def failed(self, pool: str, *, tier: Sequence[str]) -> bool:
        """Count a failure; True when it ejected the instance (just now)."""
        me = self._get(pool)
        now = self._clock()
        if now < me.until:
            return False  # already out (a request placed before the ejection)
        half_open = me.until != 0.0
        if half_open and not me.trial:
            return False  # a request placed before the ejection, failing late: no evidence
        me.trial = False
        me.consecutive += 1
        if not half_open:
            if me.consecutive < self.eject_after:
                return False
            ejected = sum(1 for p in tier if p != pool and self.state(p) == "ejected")
            if (ejected + 1) * 2 > len(tier):
                return False  # never more than half a tier
        me.times_ejected += 1
        # Longer each time, up to Envoy's max_ejection_time (300 s) or one period if longer.
        seconds = min(self.eject_seconds * me.times_ejected, max(self.eject_seconds, MAX_EJECTION))
        me.until, me.consecutive = now + seconds, 0
        if self.board is not None:
            self.board.publish(pool, self._wall() + seconds, me.times_ejected)
        log.warning(
            "instance %s ejected for %gs (%s; ejection %d)",
            pool,
            seconds,
            "its half-open trial failed" if half_open else f"{self.eject_after} failures in a row",
            me.times_ejected,
        )
        return True
