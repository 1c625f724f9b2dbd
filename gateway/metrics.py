"""Every Prometheus object Lockgate exports, on a registry of its own.

Names carry the ``lockgate_`` prefix and small fixed label sets (model,
endpoint, status, tenant). The tenant label is bounded: the first
``tenant_label_cap`` tenants seen by a process get their own value, later ones
are counted under ``other``. Engine state is read from the backends at scrape time by
:class:`EngineCollector`, so the decode loop pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Self

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.base import Backend
from gateway.scheduler.base import PoolLoad

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

BATCH_STATUSES = (
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
    "cancelled",
)  # fmt: skip

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _RememberChildren:
    """``labels()`` that remembers its children.

    prometheus_client validates the values and takes a lock on every call; the request
    path asks for the same few children (model, endpoint, status...) over and over, and
    ten such calls were 8% of a request's CPU. The children are kept by the metric
    anyway, so remembering them adds no series.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remembered: dict[tuple[object, ...], Self] = {}

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        if labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc,no-any-return]
        remembered = self._remembered.get(labelvalues)
        if remembered is not None:
            return remembered
        child: Self = super().labels(*labelvalues)  # type: ignore[misc]
        self._remembered[labelvalues] = child
        return child


class _Counter(_RememberChildren, Counter):
    pass


class _Histogram(_RememberChildren, Histogram):
    pass


class EngineCollector(Collector):
    """Per-backend state, read from ``Backend.load()`` and ``ready`` on each scrape.

    Labelled by public model name and ``backend_id`` (``embedded``, ``llamacpp-0``...:
    the id clients see in ``x-lockgate-backend``, never an upstream URL; not
    ``instance``, which Prometheus sets on every scraped series). A figure a backend
    does not report (``None``) is no series, not a 0: the decode counters exist for
    the embedded engine only, engine-side waiting and KV use where the upstream says.
    """

    _GAUGES = (
        ("running", "lockgate_engine_running_sequences", "Sequences in the engine's batch"),
        ("waiting", "lockgate_engine_waiting_sequences", "Sequences queued inside the engine"),
        ("capacity", "lockgate_engine_capacity_sequences", "Sequence slots"),
        ("last_batch_size", "lockgate_engine_batch_size", "Sequences in the last decode step"),
        ("kv_cache_usage", "lockgate_engine_kv_cache_usage", "KV cache in use, 0 to 1"),
        (
            "prefix_cache_cells",
            "lockgate_prefix_cache_cells",
            "KV cells cached prompt prefixes hold (shared with running sequences included)",
        ),
    )
    _COUNTERS = (
        ("decode_steps", "lockgate_engine_decode_steps", "Decode steps run"),
        (
            "decoded_sequences",
            "lockgate_engine_decoded_sequences",
            "Sum of batch sizes over all decode steps (÷ steps = mean batch size)",
        ),
        (
            "prefix_cache_hit_tokens",
            "lockgate_prefix_cache_hit_tokens",
            "Prompt tokens whose KV cells were shared from a cached or running sequence",
        ),
        (
            "prefix_cache_queried_tokens",
            "lockgate_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache (÷ into hits = hit rate)",
        ),
    )

    def __init__(self, backends: Callable[[], Iterable[tuple[str, str, Backend]]]) -> None:
        self._backends = backends

    def collect(self) -> Iterable[Metric]:
        labels = ["model", "backend_id"]
        up = GaugeMetricFamily(
            "lockgate_backend_up", "1 while the backend can serve (loaded, or its probe passes)",
            labels=labels,
        )  # fmt: skip
        families: list[tuple[str, GaugeMetricFamily | CounterMetricFamily]] = [
            (field, GaugeMetricFamily(name, doc, labels=labels))
            for field, name, doc in self._GAUGES
        ]
        families += [
            (field, CounterMetricFamily(name, doc, labels=labels))
            for field, name, doc in self._COUNTERS
        ]
        for model, backend_id, backend in self._backends():
            values = [model, backend_id]
            up.add_metric(values, 1 if backend.ready else 0)
            load = backend.load()
            for field, family in families:
                value = getattr(load, field)
                if value is not None:
                    family.add_metric(values, value)
        return [up, *(family for _, family in families)]


class SchedulerCollector(Collector):
    """Queue depth and slot use per backend, read from the scheduler on each scrape.

    For a pool shared through Redis the figures are the cluster's, as of the
    replica's last heartbeat or queue operation.
    """

    def __init__(self, pools: Callable[[], Iterable[tuple[str, str, PoolLoad]]]) -> None:
        self._pools = pools

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "lockgate_queue_depth",
            "Requests waiting for a slot, by priority class",
            labels=["model", "backend_id", "priority"],
        )
        used = GaugeMetricFamily(
            "lockgate_slots_used", "Engine slots held by requests", labels=["model", "backend_id"]
        )
        capacity = GaugeMetricFamily(
            "lockgate_slots_capacity", "Engine slots", labels=["model", "backend_id"]
        )
        for name, backend_id, load in self._pools():
            for priority in ("interactive", "batch"):
                depth.add_metric([name, backend_id, priority], load.waiting.get(priority, 0))
            used.add_metric([name, backend_id], load.running)
            capacity.add_metric([name, backend_id], load.capacity)
        return [depth, used, capacity]


class RouterCollector(Collector):
    """Each instance's run-time weight and ejection, read from the router on each scrape."""

    def __init__(self, instances: Callable[[], Iterable[tuple[str, str, float, str]]]) -> None:
        self._instances = instances

    def collect(self) -> Iterable[Metric]:
        labels = ["model", "backend_id"]
        weight = GaugeMetricFamily(
            "lockgate_backend_weight", "Share of new requests among equals (0: none)", labels=labels
        )
        ejected = GaugeMetricFamily(
            "lockgate_backend_ejected",
            "1 while ejected for failures, 0.5 while half-open (one trial request)",
            labels=labels,
        )
        for model, backend_id, w, state in self._instances():
            weight.add_metric([model, backend_id], w)
            ejected.add_metric(
                [model, backend_id], {"ejected": 1.0, "half_open": 0.5}.get(state, 0.0)
            )
        return [weight, ejected]


class DriftCollector(Collector):
    """Drift scores per model and feature (gateway/drift.py), computed on each scrape.

    A model gets series once its reference and current windows hold enough requests:
    before that there is nothing to compare, and no score is exported (never a 0).
    """

    def __init__(
        self, models: Callable[[], Iterable[tuple[str, int, int, list[tuple[str, str, float]]]]]
    ) -> None:
        self._models = models  # (model, reference size, current size, scores)

    def collect(self) -> Iterable[Metric]:
        psi = GaugeMetricFamily(
            "lockgate_drift_psi",
            "Population stability index of a numeric feature, current window vs reference"
            " (0.1: moderate, 0.25: significant shift)",
            labels=["model", "feature"],
        )
        js = GaugeMetricFamily(
            "lockgate_drift_jensen_shannon",
            "Jensen-Shannon divergence (base 2, 0 to 1) of a categorical feature,"
            " current window vs reference",
            labels=["model", "feature"],
        )
        sizes = GaugeMetricFamily(
            "lockgate_drift_window_requests",
            "Requests in a model's drift windows (reference, current)",
            labels=["model", "window"],
        )
        for model, reference, current, scores in self._models():
            sizes.add_metric([model, "reference"], reference)
            sizes.add_metric([model, "current"], current)
            for feature, test, value in scores:
                (psi if test == "psi" else js).add_metric([model, feature], value)
        return [psi, js, sizes]


class Metrics:
    """Built once per app; pass it to whatever records."""

    def __init__(self, *, tenant_label_cap: int = 100) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._tenant_cap = tenant_label_cap
        self._tenants_labelled: set[str] = set()
        self.requests = _Counter(
            "lockgate_requests",
            "Requests by outcome (HTTP status; 499: client went away)",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_duration = _Histogram(
            "lockgate_request_duration_seconds",
            "End-to-end request latency",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = _Histogram(
            "lockgate_time_to_first_token_seconds",
            "Time from arrival to the first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = _Histogram(
            "lockgate_time_per_output_token_seconds",
            "Mean gap between output tokens",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = _Counter(
            "lockgate_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.completion_tokens = _Counter(
            "lockgate_completion_tokens", "Completion tokens generated", ["model"], registry=r
        )
        self.tenant_requests = _Counter(
            "lockgate_tenant_requests",
            "Admitted requests by tenant, model and outcome",
            ["tenant", "model", "status"],
            registry=r,
        )
        self.tenant_tokens = _Counter(
            "lockgate_tenant_tokens",
            "Tokens by tenant, model and kind (prompt or completion)",
            ["tenant", "model", "kind"],
            registry=r,
        )
        self.rejections = _Counter(
            "lockgate_tenant_rejections",
            "Requests refused before dispatch, by reason"
            " (unauthenticated, forbidden, rate, quota, too_large, unavailable)",
            ["tenant", "reason"],
            registry=r,
        )
        self.budget_used_share = Gauge(
            "lockgate_tenant_budget_used_ratio",
            "Share of a token budget spent (1: spent, a request was refused), by period"
            " (daily or monthly): the tightest of the tenant's budgets at its last request,"
            " that request's reservation included; cleared when the day turns",
            ["tenant", "period"],
            registry=r,
        )
        self.redis_degraded = Gauge(
            "lockgate_redis_degraded",
            "1 while Redis is unreachable and auth/limits run on their outage policy",
            registry=r,
        )
        self.queue_wait = _Histogram(
            "lockgate_queue_wait_seconds",
            "Time granted requests waited for an engine slot",
            ["model"],
            buckets=(0, *_LATENCY_BUCKETS),
            registry=r,
        )
        self.queue_outcomes = _Counter(
            "lockgate_queue_requests",
            "Scheduling outcomes: granted, rejected_full (503), rejected_tenant (429),"
            " expired (waited max_wait, 503), cancelled (the client left while queued),"
            " unavailable (a shared queue with Redis unreachable, 503)",
            ["model", "outcome"],
            registry=r,
        )

        self.backend_outcomes = _Counter(
            "lockgate_backend_outcomes",
            "Requests an instance took, by outcome: ok (its first token came) or failed"
            " (unreachable, 5xx, 429 or timed out; a client's 4xx is neither)",
            ["model", "backend_id", "outcome"],
            registry=r,
        )
        self.retries = _Counter(
            "lockgate_retries",
            "Requests tried again on another instance after this one failed before the first token",
            ["model", "backend_id"],
            registry=r,
        )
        self.ejections = _Counter(
            "lockgate_ejections",
            "Times an instance was ejected for consecutive failures",
            ["model", "backend_id"],
            registry=r,
        )
        self.spillovers = _Counter(
            "lockgate_spillovers",
            "Requests placed on a higher tier (this instance) because tier 0 was busy or down",
            ["model", "backend_id"],
            registry=r,
        )
        self.canary_rollbacks = _Counter(
            "lockgate_canary_rollbacks",
            "Canaries rolled back (weight 0) for doing worse than their tier",
            ["model", "backend_id"],
            registry=r,
        )
        self.placement_wait = _Histogram(
            "lockgate_placement_wait_seconds",
            "The expected wait of the instance each request was placed on",
            ["model"],
            buckets=(0, *_LATENCY_BUCKETS),
            registry=r,
        )

        self.batches = Gauge(
            "lockgate_batches",
            "Batches by status, in the store every replica shares (a replica's view, polled)",
            ["status"],
            registry=r,
        )
        self.batch_lines = _Counter(
            "lockgate_batch_lines",
            "Batch lines this replica finished, by outcome (completed or failed)",
            ["outcome"],
            registry=r,
        )
        self.batch_tokens = Counter(
            "lockgate_batch_tokens",
            "Prompt and completion tokens of the batch lines this replica ran (rate: tokens/s)",
            registry=r,
        )
        self.batch_oldest_pending = Gauge(
            "lockgate_batch_oldest_pending_seconds",
            "Age of the oldest batch not finished yet (0: none)",
            registry=r,
        )

    def batch_status(self, counts: dict[str, int]) -> None:
        """Set the by-status gauge; every status is exported, 0 when it has no batch."""
        for status in BATCH_STATUSES:
            self.batches.labels(status).set(counts.get(status, 0))

    def watch(
        self,
        backends: Callable[[], Iterable[tuple[str, str, Backend]]],
        pools: Callable[[], Iterable[tuple[str, str, PoolLoad]]],
    ) -> None:
        """Read engine load and scheduler pools at each scrape (once the app has them)."""
        self.registry.register(EngineCollector(backends))
        self.registry.register(SchedulerCollector(pools))

    def watch_drift(
        self, models: Callable[[], Iterable[tuple[str, int, int, list[tuple[str, str, float]]]]]
    ) -> None:
        self.registry.register(DriftCollector(models))

    def watch_router(self, instances: Callable[[], Iterable[tuple[str, str, float, str]]]) -> None:
        self.registry.register(RouterCollector(instances))

    def tenant_label(self, tenant: str) -> str:
        if tenant in self._tenants_labelled:
            return tenant
        if len(self._tenants_labelled) < self._tenant_cap:
            self._tenants_labelled.add(tenant)
            return tenant
        return "other"

    def tenant_usage(
        self, tenant: str, model: str, status: int, prompt_tokens: int, completion_tokens: int
    ) -> None:
        label = self.tenant_label(tenant)
        self.tenant_requests.labels(label, model, str(status)).inc()
        if prompt_tokens:
            self.tenant_tokens.labels(label, model, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tenant_tokens.labels(label, model, "completion").inc(completion_tokens)

    def budget_used(self, tenant: str, period: str, share: float) -> None:
        self.budget_used_share.labels(self.tenant_label(tenant), period).set(share)

    def rejected(self, tenant: str, reason: str) -> None:
        self.rejections.labels(self.tenant_label(tenant), reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
