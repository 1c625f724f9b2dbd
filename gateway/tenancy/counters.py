"""Fast counters: token-bucket rates, concurrency slots and token budgets.

One admission is a list of :class:`Check`\\ s that pass or fail together: if any
fails nothing is charged, so a request refused for its token rate does not use
up a request. :class:`MemoryCounters` keeps them in this process;
``RedisCounters`` keeps the same state in Redis, updated by Lua scripts so that
every replica sees one count.

    verdict = await counters.acquire(checks, member="req-1")
    ...
    await counters.release(checks, member="req-1", refunds=[0, 120])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

CheckKind = Literal["rate", "slots", "budget"]


@dataclass(frozen=True, slots=True)
class Check:
    """One limit to test and charge.

    ``rate``: a bucket of ``limit`` that drains at ``per_second``; ``cost`` is added.
    ``slots``: at most ``limit`` members at once (concurrency).
    ``budget``: a total of ``limit`` until the wall-clock time ``window_end``.
    """

    kind: CheckKind
    key: str
    limit: int
    cost: int = 1
    per_second: float = 0.0
    window_end: float = 0.0
    what: str = "requests"  # for messages and headers: requests, tokens, ...


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    failed: int  # index of the first failing check, or -1
    retry_after: float  # seconds, when not ok
    remaining: tuple[float, ...]  # per check, after this admission (or now, if refused)
    reset: tuple[float, ...]  # per check, seconds until fully replenished


class Counters(Protocol):
    async def acquire(self, checks: Sequence[Check], member: str) -> Verdict:
        """Test every check; if all pass, charge them all (atomically)."""

    async def release(self, checks: Sequence[Check], member: str, refunds: Sequence[int]) -> None:
        """Give back what was not used (a negative refund charges more) and free slots."""

    def release_nowait(self, checks: Sequence[Check], member: str, refunds: Sequence[int]) -> None:
        """:meth:`release` without waiting for it: what a finishing request uses."""

    async def close(self) -> None: ...


class MemoryCounters:
    """In-process counters; also the bounded fallback when Redis is down (``fail_open``)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._levels: dict[str, tuple[float, float]] = {}  # key → (level, at)
        self._slots: dict[str, set[str]] = {}
        self._spent: dict[str, tuple[int, float]] = {}  # key → (tokens, window end)

    def _level(self, check: Check, now: float) -> float:
        level, at = self._levels.get(check.key, (0.0, now))
        return max(0.0, level - max(0.0, now - at) * check.per_second)

    def _used(self, check: Check, now: float) -> float:
        if check.kind == "rate":
            return self._level(check, now)
        if check.kind == "slots":
            return len(self._slots.get(check.key, ()))
        spent, end = self._spent.get(check.key, (0, 0.0))
        return spent if now < end else 0

    async def acquire(self, checks: Sequence[Check], member: str) -> Verdict:
        now = self._clock()
        used = [self._used(c, now) for c in checks]
        for i, (c, u) in enumerate(zip(checks, used, strict=True)):
            cost = 1 if c.kind == "slots" else c.cost
            if u + cost > c.limit:
                return Verdict(
                    False,
                    i,
                    _retry_after(c, u, now),
                    tuple(c.limit - u for c, u in zip(checks, used, strict=True)),
                    tuple(_reset(c, u, now) for c, u in zip(checks, used, strict=True)),
                )
        after = []
        for c, u in zip(checks, used, strict=True):
            if c.kind == "rate":
                self._levels[c.key] = (u + c.cost, now)
                after.append(u + c.cost)
            elif c.kind == "slots":
                self._slots.setdefault(c.key, set()).add(member)
                after.append(u + 1)
            else:
                self._spent[c.key] = (int(u) + c.cost, c.window_end)
                after.append(u + c.cost)
        self._forget_old(now)
        return Verdict(
            True,
            -1,
            0.0,
            tuple(c.limit - a for c, a in zip(checks, after, strict=True)),
            tuple(_reset(c, a, now) for c, a in zip(checks, after, strict=True)),
        )

    async def release(self, checks: Sequence[Check], member: str, refunds: Sequence[int]) -> None:
        self.release_nowait(checks, member, refunds)

    def release_nowait(self, checks: Sequence[Check], member: str, refunds: Sequence[int]) -> None:
        now = self._clock()
        for c, refund in zip(checks, refunds, strict=True):
            if c.kind == "slots":
                self._slots.get(c.key, set()).discard(member)
            elif c.kind == "rate" and refund:
                self._levels[c.key] = (max(0.0, self._level(c, now) - refund), now)
            elif c.kind == "budget" and refund:
                spent, end = self._spent.get(c.key, (0, c.window_end))
                self._spent[c.key] = (max(0, spent - refund), end)

    def seed(self, check: Check, spent: int) -> None:
        """Start a budget at ``spent`` (after a restart, from the usage ledger)."""
        self._spent[check.key] = (spent, check.window_end)

    def _forget_old(self, now: float) -> None:
        # Bounded by tenants x models x periods: drop budget windows that have ended.
        if len(self._spent) > 1024:
            self._spent = {k: v for k, v in self._spent.items() if v[1] > now}

    async def close(self) -> None:
        return None


def _retry_after(check: Check, used: float, now: float) -> float:
    if check.kind == "rate":
        return max(0.0, (used + check.cost - check.limit) / check.per_second)
    if check.kind == "slots":
        return 1.0  # a slot frees when some request ends: no way to know when
    return max(0.0, check.window_end - now)


def _reset(check: Check, used: float, now: float) -> float:
    if check.kind == "rate":
        return used / check.per_second
    if check.kind == "budget":
        return max(0.0, check.window_end - now)
    return 0.0


def too_big(check: Check) -> bool:
    """A cost that no amount of waiting lets through."""
    return check.kind != "slots" and check.cost > check.limit


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``6s``, ``1m30s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
