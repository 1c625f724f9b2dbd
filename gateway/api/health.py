"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.service import InferenceService

router = APIRouter()


@router.get("/health/live")
async def live() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    service: InferenceService = request.app.state.service
    waiting = service.registry.unready()
    if waiting:
        body = orjson.dumps({"status": "loading", "models_not_ready": waiting})
        return Response(body, status_code=503, media_type="application/json")
    return Response(b'{"status":"ready"}', media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
