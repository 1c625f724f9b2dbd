"""The app factory: the one place that wires settings, backends and routes.

    app = create_app(load_settings(path))                  # embedded engines
    app = create_app(settings, backends={"m": FakeBackend()})  # tests

Models load in the background after start-up, so ``/health/live`` answers at
once and ``/health/ready`` turns 200 when every model is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from backends.base import Backend, BackendError
from backends.llama.backend import EmbeddedBackend, EmbeddedConfig
from gateway.api import admin, health, openai
from gateway.api.disconnect import ClientDisconnected
from gateway.api.routing import Route, Routes, error_response
from gateway.api.security import GUARDS, PUBLIC
from gateway.errors import GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from gateway.limits import BodySizeLimit
from gateway.metrics import Metrics
from gateway.remote import build_remote_backend
from gateway.scheduler.base import PoolLimits, Scheduler
from gateway.scheduler.memory import MemoryScheduler
from gateway.scheduler.redis_scheduler import RedisScheduler
from gateway.service import InferenceService, ModelRegistry, ServedModel
from gateway.settings import ModelSettings, RemoteModelSettings, Settings
from gateway.tenancy.runtime import Tenancy

log = logging.getLogger(__name__)


def build_backend(model: ModelSettings | RemoteModelSettings) -> Backend:
    if isinstance(model, ModelSettings):
        return EmbeddedBackend(
            EmbeddedConfig(
                path=model.path,
                context_length=model.n_ctx,
                max_sequences=model.max_sequences,
                threads=model.threads,
                template=model.template,
                prefill_chunk=model.prefill_chunk,
                default_top_k=model.default_top_k,
            )
        )
    return build_remote_backend(model)


def _instance(model: ModelSettings | RemoteModelSettings) -> str:
    return "embedded" if isinstance(model, ModelSettings) else model.base_url


async def _start_all(backends: Sequence[tuple[str, Backend]]) -> None:
    async def start(name: str, backend: Backend) -> None:
        started = time.perf_counter()
        try:
            await backend.start()
        except Exception:
            log.exception("model %s failed to load; it will answer 503", name)
            return
        log.info("model %s ready in %.1fs", name, time.perf_counter() - started)

    await asyncio.gather(*(start(n, b) for n, b in backends))


async def _on_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"Unknown path: {request.url.path}"))
    if exc.status_code == 405:
        return error_response(
            MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}")
        )
    return error_response(InvalidRequest(str(exc.detail)))


def _calls(dependant: Dependant) -> set[object]:
    found: set[object] = set()
    for d in dependant.dependencies:
        found.add(d.call)
        found |= _calls(d)
    return found


def _require_guards(routers: Sequence[APIRouter], routes: Sequence[Route] = ()) -> None:
    """Default deny: every route declares a key guard, or is listed as public."""
    for plain in routes:  # the plain ASGI routes cannot be declared without one
        if plain.guard not in GUARDS:
            raise RuntimeError(f"route {plain.path} has no auth dependency")
    for router in routers:
        for route in router.routes:
            if not isinstance(route, APIRoute):
                raise RuntimeError(f"route {route} is not an APIRoute: its guard cannot be checked")
            if route.path in PUBLIC:  # paths already carry the router's prefix
                continue
            if not _calls(route.dependant) & set(GUARDS):
                raise RuntimeError(f"route {route.path} has no auth dependency")


def _pool_limits(settings: Settings, backend: Backend) -> PoolLimits:
    s = settings.scheduler
    return PoolLimits(
        capacity=backend.load().capacity,
        max_queue=s.max_queue,
        max_queue_per_tenant=s.max_queue_per_tenant,
        max_wait=s.max_wait,
    )


def create_app(settings: Settings, *, backends: Mapping[str, Backend] | None = None) -> FastAPI:
    """Build the app; ``backends`` (name → backend) replaces the configured ones in tests."""
    created = int(time.time())
    metrics = Metrics(tenant_label_cap=settings.auth.tenant_label_cap)
    tenancy = Tenancy(settings, metrics)
    policy = settings.scheduler.policy
    # An embedded engine's slots belong to this process; a remote engine's are shared by
    # every replica, through Redis when there is one.
    local = MemoryScheduler(policy=policy)
    shared: Scheduler = local
    if tenancy.link is not None:
        shared = RedisScheduler(tenancy.link, policy=policy, lease_ttl=settings.scheduler.lease_ttl)
    if backends is None:
        served = [
            ServedModel(
                m.name,
                build_backend(m),
                m.max_n,
                created,
                local if isinstance(m, ModelSettings) else shared,
                _instance(m),
            )
            for m in settings.models
        ]
    else:
        limits = {m.name: m.max_n for m in settings.models}
        served = [
            ServedModel(name, b, limits.get(name, 1), created, local, "injected")
            for name, b in backends.items()
        ]
    registry = ModelRegistry(served)
    for m in served:
        m.scheduler.add_pool(m.pool, _pool_limits(settings, m.backend))
    metrics.watch(
        lambda: [(m.name, m.instance, m.backend) for m in registry.instances()],
        lambda: [(m.name, m.instance, m.scheduler.load(m.pool)) for m in registry.instances()],
    )
    pairs = [(m.name, m.backend) for m in served]

    async def load_models() -> None:
        await _start_all(pairs)
        for m in served:  # llama-server reports its real slot count once it is up
            m.scheduler.add_pool(m.pool, _pool_limits(settings, m.backend))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await tenancy.start()
        schedulers = {id(s): s for s in (local, shared)}.values()
        for s in schedulers:
            await s.start()
        loading = asyncio.create_task(load_models())
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            for s in schedulers:
                await s.stop()
            await asyncio.gather(*(b.close() for _, b in pairs), return_exceptions=True)
            await tenancy.stop()

    app = FastAPI(
        title="Lockgate",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # no unauthenticated surface beyond PUBLIC
    )
    app.state.metrics = metrics
    app.state.service = InferenceService(registry, metrics, tenancy.admission)
    app.state.auth = tenancy.auth
    app.state.admin_key = tenancy.admin_key
    app.state.tenant_admin = tenancy.admin
    app.state.ledger = tenancy.ledger
    routers = (admin.router, health.router)
    _require_guards(routers, openai.ROUTES)
    for router in routers:
        app.include_router(router)
    app.add_exception_handler(GatewayError, _on_error)
    app.add_exception_handler(BackendError, _on_error)
    app.add_exception_handler(ClientDisconnected, _on_error)
    app.add_exception_handler(ClientDisconnect, _on_error)  # left mid-upload
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_error)
    # Middleware, innermost first (Starlette wraps in reverse order of adding): the
    # OpenAI routes, plain ASGI, inside the size guard, which sees a request before
    # anything reads its body.
    app.add_middleware(Routes, routes=openai.ROUTES)
    app.add_middleware(BodySizeLimit, max_bytes=settings.server.max_body_bytes)
    return app
