"""The router's state: run-time weights, outlier ejection, canary verdicts, the retry budget.

The service asks it where a request goes and tells it how that went::

    served, placement = router.place(instances, tried=(), spill=True, key=key)
    router.succeeded(served, instances, ttft)   # its first token arrived
    router.failed(served, instances)        # the instance failed it (5xx, timeout...)

Placement itself is pure policy (:mod:`gateway.routing`); ejection is
:mod:`gateway.outliers`. A canary (``canary: true``) is judged over a sliding window
against the other instances of its tier: worse by the configured margins — error rate
or TTFT p95 — and it is rolled back (weight 0), with a log line and
``lockgate_canary_rollbacks_total`` saying why. Weights can be changed at run time
(``set_weight``, the admin API), which also clears a rollback.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from gateway.errors import NotFound
from gateway.metrics import Metrics
from gateway.outliers import Board, Outliers
from gateway.registry import ServedModel
from gateway.routing import InstanceState, Placement, place
from gateway.settings import RoutingSettings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Outcome:
    at: float
    ok: bool
    ttft: float | None


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


class Router:
    def __init__(
        self,
        instances: Sequence[ServedModel],
        settings: RoutingSettings,
        metrics: Metrics,
        *,
        board: Board | None = None,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.outliers = Outliers(
            eject_after=settings.eject_after,
            eject_seconds=settings.eject_seconds,
            board=board,
            clock=clock,
        )
        self._clock = clock
        self._draw = draw
        self._weights = {m.pool: m.weight for m in instances}
        self.rolled_back: dict[str, str] = {}  # pool → why
        self._windows: dict[str, deque[_Outcome]] = {m.pool: deque() for m in instances}
        self.in_flight = 0  # requests being served (the retry budget's base)
        self.retrying = 0  # of which are on a retry

    # -- placement -------------------------------------------------------------

    def weight(self, m: ServedModel) -> float:
        return self._weights.get(m.pool, m.weight)

    def place(
        self,
        instances: Sequence[ServedModel],
        *,
        tried: Collection[str] = (),
        spill: bool = True,
        key: int | None = None,
    ) -> tuple[ServedModel, Placement]:
        if len(instances) == 1 and not tried:  # the common case needs no states
            return instances[0], Placement(0, 0.0)
        states = []
        for m in instances:
            load = m.scheduler.load(m.pool)
            engine = m.backend.load()
            states.append(
                InstanceState(
                    m.public_id,
                    m.backend.ready,
                    running=load.running,
                    capacity=load.capacity,
                    waiting=sum(load.waiting.values()),
                    drain_per_second=load.drain_per_second,
                    engine_waiting=engine.waiting or 0,
                    tier=m.tier,
                    weight=self.weight(m),
                    ejected=not self.outliers.takes_requests(m.pool),
                    tried=m.pool in tried,
                )
            )
        s = self.settings
        placement = place(
            states,
            spill_after=s.spill_after,
            spill=spill,
            key=key,
            load_bound=s.load_bound,
            draw=self._draw(),
        )
        served = instances[placement.index]
        self.outliers.placed(served.pool)
        self.metrics.placement_wait.labels(served.name).observe(placement.wait)
        if placement.spilled:
            self.metrics.spillovers.labels(served.name, served.public_id).inc()
        return served, placement

    def affinity_key(self, prefix: str, session: str | None) -> int | None:
        """The key that keeps a prompt prefix (or a session) on one instance, if any.

        ``prefix`` is what requests share: a chat's system prompt (else its first
        message), a completion's prompt; its first ``affinity_chars`` count.
        """
        mode = self.settings.affinity
        if mode == "none":
            return None
        source = session if mode == "session" else prefix[: self.settings.affinity_chars]
        if not source:
            return None
        digest = hashlib.blake2b(source.encode(errors="replace"), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    # -- outcomes --------------------------------------------------------------

    def may_retry(self) -> bool:
        """Envoy's retry budget: retries at most ``retry_budget`` of the requests in flight,
        but always ``min_retry_concurrency`` of them."""
        s = self.settings
        return self.retrying < max(s.min_retry_concurrency, s.retry_budget * self.in_flight)

    def succeeded(
        self, served: ServedModel, instances: Sequence[ServedModel], ttft: float | None
    ) -> None:
        """Its first token (or whole answer) arrived."""
        self.outliers.succeeded(served.pool)
        self.metrics.backend_outcomes.labels(served.name, served.public_id, "ok").inc()
        self._record(served, ok=True, ttft=ttft)
        self.review(served, instances)

    def abandoned(self, served: ServedModel) -> None:
        """A request placed on ``served`` ended saying nothing of the instance."""
        self.outliers.abandoned(served.pool)

    def failed(self, served: ServedModel, instances: Sequence[ServedModel]) -> None:
        """The instance failed a request (unreachable, 5xx, 429, timed out; not a 4xx)."""
        self.metrics.backend_outcomes.labels(served.name, served.public_id, "failed").inc()
        tier = [m.pool for m in instances if m.tier == served.tier]
        if self.outliers.failed(served.pool, tier=tier):
            self.metrics.ejections.labels(served.name, served.public_id).inc()
        self._record(served, ok=False, ttft=None)
        self.review(served, instances)

    # -- canaries --------------------------------------------------------------

    def _record(self, served: ServedModel, *, ok: bool, ttft: float | None) -> None:
        window = self._windows.get(served.pool)
        if window is None:
            return
        now = self._clock()
        window.append(_Outcome(now, ok, ttft))
        horizon = now - self.settings.canary_window
        while window and window[0].at < horizon:
            window.popleft()
        if len(window) > 100_000:
            window.popleft()

    def judge(self, canary: ServedModel, instances: Sequence[ServedModel]) -> str | None:
        """Why ``canary`` should be rolled back now, or None."""
        s = self.settings
        mine = list(self._windows.get(canary.pool, ()))
        if canary.pool in self.rolled_back or len(mine) < s.canary_min_requests:
            return None
        others = [
            o
            for m in instances
            if m.tier == canary.tier and not m.canary
            for o in self._windows.get(m.pool, ())
        ]
        if not others:
            return None
        errors = sum(not o.ok for o in mine) / len(mine)
        baseline = sum(not o.ok for o in others) / len(others)
        if errors > baseline + s.canary_error_margin:
            return (
                f"error rate {errors:.0%} against {baseline:.0%} on the other instances"
                f" (allowed: +{s.canary_error_margin * 100:g} points) over {len(mine)} requests"
            )
        fast = [o.ttft for o in mine if o.ttft is not None]
        base = [o.ttft for o in others if o.ttft is not None]
        if len(fast) >= s.canary_min_requests and base:
            p95, base95 = _p95(fast), _p95(base)
            if p95 > base95 * s.canary_ttft_ratio:
                return (
                    f"TTFT p95 {p95 * 1000:.0f} ms against {base95 * 1000:.0f} ms on the other"
                    f" instances (allowed: x{s.canary_ttft_ratio:g}) over {len(fast)} requests"
                )
        return None

    def review(self, served: ServedModel, instances: Sequence[ServedModel]) -> None:
        """After an outcome on a canary: roll it back if it is worse."""
        if not served.canary:
            return
        why = self.judge(served, instances)
        if why is None:
            return
        self._weights[served.pool] = 0.0
        self.rolled_back[served.pool] = why
        self.metrics.canary_rollbacks.labels(served.name, served.public_id).inc()
        log.warning("canary %s of model %s rolled back (weight 0): %s", served.public_id,
                    served.name, why)  # fmt: skip

    # -- run-time changes ----------------------------------------------------------

    def set_weight(self, instances: Sequence[ServedModel], backend_id: str, weight: float) -> None:
        found = [m for m in instances if m.public_id == backend_id]
        if not found:
            ids = ", ".join(m.public_id for m in instances)
            raise NotFound(f"No instance '{backend_id}' of this model (it has {ids}).")
        pool = found[0].pool
        self._weights[pool] = weight
        self.rolled_back.pop(pool, None)
        self._windows[pool] = deque()  # judged afresh from here
        log.info("instance %s of model %s: weight %g", backend_id, found[0].name, weight)

    def configure(
        self,
        settings: RoutingSettings,
        before: Sequence[ServedModel],
        after: Sequence[ServedModel],
    ) -> None:
        """A reload: new settings; an instance that is new, or whose configured weight or
        canary flag changed, starts at its configured weight and is judged afresh; any
        other keeps its run-time weight (and rollback)."""
        self.settings = settings
        self.outliers.eject_after = settings.eject_after
        self.outliers.eject_seconds = settings.eject_seconds
        was = {m.pool: m for m in before}
        for m in after:
            old = was.get(m.pool)
            if old is None or (old.weight, old.canary) != (m.weight, m.canary):
                self._weights[m.pool] = m.weight
                self.rolled_back.pop(m.pool, None)
                self._windows[m.pool] = deque()
        kept = {m.pool for m in after}
        for pool in [p for p in self._weights if p not in kept]:
            del self._weights[pool]
            self._windows.pop(pool, None)
            self.rolled_back.pop(pool, None)

    def status(self, instances: Sequence[ServedModel]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for m in instances:
            load = m.scheduler.load(m.pool)
            state = self.outliers.state(m.pool) if m.backend.ready else "not_ready"
            out.append(
                {
                    "id": m.public_id,
                    "tier": m.tier,
                    "weight": self.weight(m),
                    "canary": m.canary,
                    "state": "ready" if state == "healthy" else state,
                    "rolled_back": self.rolled_back.get(m.pool),
                    "running": load.running,
                    "capacity": load.capacity,
                    "waiting": sum(load.waiting.values()),
                }
            )
        return out
