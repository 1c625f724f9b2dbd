"""Admission: may this tenant send this request now? And, when it ends, settle the bill.

Token limits are charged up front with an estimate (prompt + ``max_tokens``)
and reconciled with the real usage when the request ends — whatever way it
ends: finished, failed, or cancelled mid-stream — so unused tokens are
refunded and overruns are charged.

    ticket = await admission.admit(principal, "gemma", tokens=300, request_id="r1")
    ...
    ticket.settle(status=200, prompt_tokens=40, completion_tokens=100, engine_seconds=1.2)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from gateway.errors import (
    BeyondLimit,
    QuotaExceeded,
    RateLimited,
    StateUnavailable,
    retry_after_header,
)
from gateway.metrics import Metrics
from gateway.tenancy.counters import Check, Counters, MemoryCounters, Verdict, duration, too_big
from gateway.tenancy.ledger import UsageLedger
from gateway.tenancy.records import Limits, Principal, Tenant
from gateway.tenancy.redis_link import RedisDown

log = logging.getLogger(__name__)

OutagePolicy = Literal["fail_closed", "fail_open"]


def scopes(tenant: Tenant, model: str) -> list[tuple[str, Limits]]:
    """Counter-key prefixes and their limits: the tenant's, then the model's own, if any."""
    found = [(f"t:{tenant.id}", tenant.limits)]
    if model in tenant.model_limits:
        found.append((f"t:{tenant.id}:m:{model}", tenant.model_limits[model]))
    return found


@dataclass(frozen=True, slots=True)
class Periods:
    """The current UTC day and month: budget key suffixes and bounds (built once a day)."""

    day: str
    month: str
    day_start: float
    day_end: float
    month_start: float
    month_end: float

    @classmethod
    def at(cls, now: float) -> Periods:
        t = datetime.fromtimestamp(now, UTC)
        day = datetime(t.year, t.month, t.day, tzinfo=UTC).timestamp()
        year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
        return cls(
            day=f"{t:%Y%m%d}",
            month=f"{t:%Y%m}",
            day_start=day,
            day_end=day + 86400,
            month_start=datetime(t.year, t.month, 1, tzinfo=UTC).timestamp(),
            month_end=datetime(year, month, 1, tzinfo=UTC).timestamp(),
        )


def plan(principal: Principal, model: str, tokens: int, periods: Periods) -> list[Check]:
    """The checks for one request, charging ``tokens`` (prompt + max_tokens estimate)."""
    checks = []
    for scope, limits in scopes(principal.tenant, model):
        if limits.requests_per_minute:
            rpm = limits.requests_per_minute
            checks.append(Check("rate", f"{scope}:rpm", rpm, 1, rpm / 60))
        if limits.tokens_per_minute:
            tpm = limits.tokens_per_minute
            checks.append(Check("rate", f"{scope}:tpm", tpm, tokens, tpm / 60, what="tokens"))
        if limits.max_concurrent:
            checks.append(
                Check("slots", f"{scope}:conc", limits.max_concurrent, what="concurrent requests")
            )
        if limits.tokens_per_day or limits.tokens_per_month:
            checks += budgets(scope, limits, tokens, periods)
    return checks


def budgets(scope: str, limits: Limits, tokens: int, periods: Periods) -> list[Check]:
    """The daily and monthly budget checks of one scope."""
    found = []
    if limits.tokens_per_day:
        key, limit, end = f"{scope}:day:{periods.day}", limits.tokens_per_day, periods.day_end
        found.append(Check("budget", key, limit, tokens, window_end=end, what="daily"))
    if limits.tokens_per_month:
        key, limit = f"{scope}:month:{periods.month}", limits.tokens_per_month
        end = periods.month_end
        found.append(Check("budget", key, limit, tokens, window_end=end, what="monthly"))
    return found


def rate_headers(checks: list[Check], verdict: Verdict) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers, from the tightest request and token rates."""
    headers: dict[str, str] = {}
    for what in ("requests", "tokens"):
        rows = [
            (verdict.remaining[i], verdict.reset[i], c)
            for i, c in enumerate(checks)
            if c.kind == "rate" and c.what == what
        ]
        if rows:
            remaining, reset, check = min(rows, key=lambda r: r[0])
            headers[f"x-ratelimit-limit-{what}"] = str(check.limit)
            headers[f"x-ratelimit-remaining-{what}"] = str(max(0, math.floor(remaining)))
            headers[f"x-ratelimit-reset-{what}"] = duration(reset)
    return headers


@dataclass(slots=True)
class Ticket:
    """An admitted request; :meth:`settle` it once when it ends (again is a no-op)."""

    admission: Admission
    principal: Principal
    model: str
    member: str
    checks: list[Check]
    counters: Counters | None
    charged: int
    headers: dict[str, str] = field(default_factory=dict)
    backend: str = ""
    settled: bool = False

    def settle(
        self, *, status: int, prompt_tokens: int, completion_tokens: int, engine_seconds: float
    ) -> None:
        if self.settled:
            return
        self.settled = True
        self.admission.settle(self, status, prompt_tokens, completion_tokens, engine_seconds)


class Admission:
    """Checks limits on ``counters``; with Redis down, follows ``policy``.

    ``fail_closed`` refuses with 503; ``fail_open`` admits against ``fallback``, a
    per-process copy of the same limits, so a replica never runs unlimited.
    """

    def __init__(
        self,
        counters: Counters,
        ledger: UsageLedger,
        metrics: Metrics,
        *,
        policy: OutagePolicy = "fail_closed",
        fallback: MemoryCounters | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._counters = counters
        self._fallback = fallback or MemoryCounters()
        self._ledger = ledger
        self._metrics = metrics
        self._policy = policy
        self._wall = wall
        self._periods = Periods.at(wall())
        self._plans: dict[tuple[int, str], tuple[Tenant, list[Check]]] = {}

    async def admit(
        self, principal: Principal, model: str, *, tokens: int, request_id: str
    ) -> Ticket:
        checks = self._plan(principal, model, tokens)
        ticket = Ticket(self, principal, model, request_id, checks, None, tokens)
        if not checks:
            return ticket
        for check in checks:
            if too_big(check):
                self._reject(principal, "too_large")
                raise _too_large(check)
        try:
            verdict = await self._counters.acquire(checks, request_id)
            ticket.counters = self._counters
        except RedisDown:
            if self._policy == "fail_closed":
                self._reject(principal, "unavailable")
                raise StateUnavailable(
                    "Rate limiting is temporarily unavailable; retry shortly."
                ) from None
            verdict = await self._fallback.acquire(checks, request_id)
            ticket.counters = self._fallback
        ticket.headers = rate_headers(checks, verdict)
        if verdict.ok:
            self._budget_used(principal.tenant.id, checks, verdict)
        if not verdict.ok:
            check = checks[verdict.failed]
            if check.kind == "budget":  # as spent as it gets: the request is refused
                self._metrics.budget_used(principal.tenant.id, check.what, 1.0)
            self._reject(principal, "quota" if check.kind == "budget" else "rate")
            raise _refusal(check, verdict, ticket.headers)
        return ticket

    def _budget_used(self, tenant: str, checks: list[Check], verdict: Verdict) -> None:
        """The tightest budget of each period (the tenant's own, or a model's) as spent,
        this request's reservation (prompt + max_tokens) included; refunds come later."""
        used: dict[str, float] = {}
        for check, left in zip(checks, verdict.remaining, strict=True):
            if check.kind == "budget":
                share = 1.0 - max(0.0, left) / check.limit
                used[check.what] = max(used.get(check.what, 0.0), share)
        for period, share in used.items():
            self._metrics.budget_used(tenant, period, share)

    def _plan(self, principal: Principal, model: str, tokens: int) -> list[Check]:
        # The checks differ between requests of one tenant and model only in their cost, so
        # they are built once per tenant record, model and day, then re-costed.
        now = self._wall()
        if now >= self._periods.day_end:
            self._periods = Periods.at(now)
            self._plans.clear()
            self._metrics.budget_used_share.clear()  # a new day (or month): nothing spent
        tenant = principal.tenant
        cached = self._plans.get((id(tenant), model))
        if cached is None or cached[0] is not tenant:
            if len(self._plans) > 4096:
                self._plans.clear()
            cached = (tenant, plan(principal, model, 0, self._periods))
            self._plans[id(tenant), model] = cached
        return [
            c
            if c.kind == "slots" or c.what == "requests"
            else Check(c.kind, c.key, c.limit, tokens, c.per_second, c.window_end, c.what)
            for c in cached[1]
        ]

    def settle(
        self,
        ticket: Ticket,
        status: int,
        prompt_tokens: int,
        completion_tokens: int,
        engine_seconds: float,
    ) -> None:
        tenant = ticket.principal.tenant.id
        self._ledger.record(
            tenant=tenant,
            key_id=ticket.principal.key_id,
            model=ticket.model,
            backend=ticket.backend,
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            engine_seconds=engine_seconds,
        )
        self._metrics.tenant_usage(tenant, ticket.model, status, prompt_tokens, completion_tokens)
        if ticket.counters is None:
            return
        refund = ticket.charged - (prompt_tokens + completion_tokens)
        refunds = [0 if c.what == "requests" else refund for c in ticket.checks]
        ticket.counters.release_nowait(ticket.checks, ticket.member, refunds)

    def _reject(self, principal: Principal, reason: str) -> None:
        self._metrics.rejected(principal.tenant.id, reason)


def _too_large(check: Check) -> Exception:
    limit = (
        f"the whole {check.what} budget of {check.limit}"
        if check.kind == "budget"
        else f"the limit of {check.limit} tokens per minute"
    )
    return BeyondLimit(
        f"This request may use {check.cost} tokens (prompt + max_tokens), more than {limit}:"
        " it can never be admitted. Lower max_tokens or shorten the prompt.",
        param="max_tokens",
    )


def human_duration(seconds: float) -> str:
    """``45 s``, ``12 min 5 s``, ``8 h 58 min``, ``3 d 4 h``: for people, not parsers."""
    total = max(1, math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs and minutes < 10 else f"{minutes} min"
    return f"{secs} s"


def _refusal(check: Check, verdict: Verdict, rate: dict[str, str]) -> Exception:
    wait = retry_after_header(verdict.retry_after)
    seconds = wait["Retry-After"]
    headers = {**rate, **wait, "retry-after-ms": str(max(1, math.ceil(verdict.retry_after * 1000)))}
    if check.kind == "budget":
        left = max(0, int(verdict.remaining[verdict.failed]))
        resets = f"it resets in {human_duration(verdict.retry_after)}"
        if left:
            message = (
                f"This request may use {check.cost} tokens (prompt + max_tokens) and {left} of"
                f" the {check.what} budget of {check.limit} are left; {resets}."
            )
        else:
            message = f"The {check.what} budget of {check.limit} tokens is spent; {resets}."
        return QuotaExceeded(message, headers=headers)
    if check.kind == "slots":
        return RateLimited(
            f"Too many concurrent requests: the limit is {check.limit}.",
            kind="requests",
            headers=headers,
        )
    per = "requests" if check.what == "requests" else "tokens"
    return RateLimited(
        f"Rate limit reached: {check.limit} {per} per minute. Retry in {seconds}s.",
        kind=per,
        headers=headers,
    )
