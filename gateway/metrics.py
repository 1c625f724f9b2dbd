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
    """Per-backend load gauges, read from ``Backend.load()`` on each scrape.

    Labelled by public model name and instance (``embedded`` or the upstream URL),
    since several backends may serve one name.
    """

    def __init__(self, backends: Callable[[], Iterable[tuple[str, str, Backend]]]) -> None:
        self._backends = backends

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily(
            "lockgate_engine_running_sequences",
            "Sequences in the decode batch",
            labels=["model", "instance"],
        )
        waiting = GaugeMetricFamily(
            "lockgate_engine_waiting_sequences",
            "Sequences waiting for a slot",
            labels=["model", "instance"],
        )
        capacity = GaugeMetricFamily(
            "lockgate_engine_capacity_sequences", "Sequence slots", labels=["model", "instance"]
        )
        batch = GaugeMetricFamily(
            "lockgate_engine_batch_size",
            "Sequences in the last decode step",
            labels=["model", "instance"],
        )
        steps = CounterMetricFamily(
            "lockgate_engine_decode_steps", "Decode steps run", labels=["model", "instance"]
        )
        decoded = CounterMetricFamily(
            "lockgate_engine_decoded_sequences",
            "Sum of batch sizes over all decode steps (÷ steps = mean batch size)",
            labels=["model", "instance"],
        )
        for name, instance, backend in self._backends():
            load = backend.load()
            labels = [name, instance]
            running.add_metric(labels, load.running)
            waiting.add_metric(labels, load.waiting)
            capacity.add_metric(labels, load.capacity)
            batch.add_metric(labels, load.last_batch_size)
            steps.add_metric(labels, load.decode_steps)
            decoded.add_metric(labels, load.decoded_sequences)
        return [running, waiting, capacity, batch, steps, decoded]


class SchedulerCollector(Collector):
    """Queue depth and slot use per backend instance, read from the scheduler on each scrape.

    For a pool shared through Redis the figures are the cluster's, as of the
    replica's last heartbeat or queue operation.
    """

    def __init__(self, pools: Callable[[], Iterable[tuple[str, str, PoolLoad]]]) -> None:
        self._pools = pools

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "lockgate_queue_depth",
            "Requests waiting for a slot, by priority class",
            labels=["model", "instance", "priority"],
        )
        used = GaugeMetricFamily(
            "lockgate_slots_used", "Engine slots held by requests", labels=["model", "instance"]
        )
        capacity = GaugeMetricFamily(
            "lockgate_slots_capacity", "Engine slots", labels=["model", "instance"]
        )
        for name, instance, load in self._pools():
            for priority in ("interactive", "batch"):
                depth.add_metric([name, instance, priority], load.waiting.get(priority, 0))
            used.add_metric([name, instance], load.running)
            capacity.add_metric([name, instance], load.capacity)
        return [depth, used, capacity]


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

    def watch(
        self,
        backends: Callable[[], Iterable[tuple[str, str, Backend]]],
        pools: Callable[[], Iterable[tuple[str, str, PoolLoad]]],
    ) -> None:
        """Read engine load and scheduler pools at each scrape (once the app has them)."""
        self.registry.register(EngineCollector(backends))
        self.registry.register(SchedulerCollector(pools))

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

    def rejected(self, tenant: str, reason: str) -> None:
        self.rejections.labels(self.tenant_label(tenant), reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
