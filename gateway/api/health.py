"""Liveness, readiness and the Prometheus scrape endpoint.

``/health/ready`` is about this gateway, not every upstream: it is 200 once start-up
has finished, every model served in this process is loaded and, where the limits
need it (``limits_on_redis_outage: fail_closed``), Redis answers. A remote upstream
that is down makes only its own model unavailable; the body lists every model's
backends and their state, and ``?model=NAME`` asks about one model (200 if one of
its backends can serve, 503 if none, 404 for a name not served). While the server
drains (:mod:`gateway.drain`) both answer 503 with ``"status": "draining"``::

    {"status": "ready", "redis": "up",
     "models": {"gemma": {"ready": true, "backends": {"embedded": "ready"}},
                "big": {"ready": false, "backends": {"vllm-0": "unreachable"}}}}
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.drain import Drain
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.registry import ModelRegistry, ServedModel
from gateway.tenancy.redis_link import RedisLink

router = APIRouter()


@dataclass(frozen=True, slots=True)
class Readiness:
    """What readiness reads: the drain, the models, which are still starting, and Redis
    if needed."""

    drain: Drain
    registry: ModelRegistry
    starting: Callable[[], Collection[ServedModel]]
    redis: RedisLink | None = None
    redis_required: bool = False  # fail_closed: without Redis, requests are refused

    def state(self, m: ServedModel) -> str:
        if m.backend.ready:
            return "ready"
        if m in self.starting():
            return "loading"
        return "unreachable" if m.remote else "failed"

    async def report(self) -> tuple[bool, dict[str, object]]:
        models: dict[str, object] = {}
        ready = not self.starting()
        for name, instances in self.registry.by_name().items():
            states = {m.public_id: self.state(m) for m in instances}
            models[name] = {"ready": "ready" in states.values(), "backends": states}
            ready = ready and all(states[m.public_id] == "ready" for m in instances if not m.remote)
        redis = "off"
        if self.redis is not None:
            redis = "up" if await self.redis.ping() else "down"
            ready = ready and (redis == "up" or not self.redis_required)
        if self.drain.draining:  # first: a load balancer must stop sending at once
            ready = False
        body: dict[str, object] = {
            "status": "draining" if self.drain.draining else "ready" if ready else "not_ready",
            "redis": redis,
            "models": models,
        }
        return ready, body


def _json(payload: object, status: int) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


@router.get("/health/live")
async def live() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/health/ready")
async def ready(request: Request, model: str | None = None) -> Response:
    readiness: Readiness = request.app.state.readiness
    if model is not None:
        instances = readiness.registry.by_name().get(model)
        if instances is None:
            return _json({"status": "unknown_model", "model": model}, 404)
        states = {m.public_id: readiness.state(m) for m in instances}
        serving = "ready" in states.values() and not readiness.drain.draining
        status = "draining" if readiness.drain.draining else "ready" if serving else "not_ready"
        one = {"status": status, "model": model, "backends": states}
        return _json(one, 200 if serving else 503)
    ok, body = await readiness.report()
    return _json(body, 200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
