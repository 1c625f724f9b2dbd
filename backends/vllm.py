"""vLLM: the OpenAI-compatible client plus vLLM's own health and load signals.

vLLM exposes ``GET /health`` (200 once the engine runs) and Prometheus metrics
at ``/metrics``. Every probe interval the adapter reads
``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and the KV-cache
usage (``vllm:kv_cache_usage_perc``; ``vllm:gpu_cache_usage_perc`` before
v0.10) and reports them as the backend's load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from prometheus_client.parser import text_string_to_metric_families

from backends.base import BackendLoad
from backends.openai_compat import OpenAICompatBackend

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def parse_vllm_metrics(text: str, model: str | None = None) -> dict[str, float]:
    """Sum each gauge over vLLM's label sets (one per served model name).

    With ``model``, only series whose ``model_name`` label matches count.
    """
    wanted = {_RUNNING, _WAITING, *_KV_USAGE}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in wanted:
                continue
            if model is not None and sample.labels.get("model_name", model) != model:
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


class VLLMBackend(OpenAICompatBackend):
    renames: ClassVar[Mapping[str, str]] = {"repeat_penalty": "repetition_penalty"}
    _running = 0
    _waiting = 0
    _kv_usage: float | None = None

    async def probe(self) -> bool:
        if (await self.get("/health"))[0] != 200:
            return False
        status, text = await self.get("/metrics")
        if status == 200:  # otherwise healthy, just without fresh load figures
            values = parse_vllm_metrics(text.decode(), self.config.upstream_model)
            self._running = int(values.get(_RUNNING, 0))
            self._waiting = int(values.get(_WAITING, 0))
            self._kv_usage = next((values[k] for k in _KV_USAGE if k in values), None)
        return True

    def load(self) -> BackendLoad:
        # vLLM's own counts include other clients of the same server; ours are a floor.
        return BackendLoad(
            running=max(self._running, self.in_flight),
            waiting=self._waiting,
            capacity=self.config.concurrency,
            kv_cache_usage=self._kv_usage,
        )
