"""The app factory: the one place that wires settings, backends and routes.

    app = create_app(load_settings(path))                  # embedded engines
    app = create_app(settings, backends={"m": FakeBackend()})  # tests

Every route is on the one FastAPI application: the front doors (``/v1`` OpenAI,
``/v1/responses``, ``/api`` Ollama) as plain ASGI endpoints
(:mod:`gateway.api.endpoint`), admin, health and metrics as FastAPI routes. Each
route is checked at start-up for a key guard (default deny). Errors render in the
wire format of the door the path belongs to.

Models load in the background after start-up, so ``/health/live`` answers at
once and ``/health/ready`` turns 200 when the gateway can serve
(:mod:`gateway.api.health`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Route

from backends.base import Backend, BackendError
from gateway.access import AccessLog
from gateway.api import admin, batches, health, ollama, openai, responses
from gateway.api.disconnect import ClientDisconnected
from gateway.api.endpoint import Endpoint, ErrorFormat, FastDispatch
from gateway.api.health import Readiness
from gateway.api.openapi import openapi_document
from gateway.api.security import GUARDS, PUBLIC
from gateway.batch.files import FileStorage
from gateway.batch.redis_store import RedisBatchStore
from gateway.batch.runner import BatchRunner, RunnerSettings
from gateway.batch.service import BatchService, FileLimits
from gateway.batch.store import BatchStore, SQLiteBatchStore
from gateway.drain import Drain, DrainGate
from gateway.drift import DriftTracker
from gateway.errors import (
    ErrorInfo,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
)
from gateway.fleet import Fleet
from gateway.limits import BodySizeLimit
from gateway.metrics import Metrics
from gateway.outliers_redis import RedisBoard
from gateway.registry import ServedModel
from gateway.reload import Reloader
from gateway.request_log import RequestLog
from gateway.router import Router
from gateway.scheduler.base import Scheduler
from gateway.scheduler.memory import MemoryScheduler
from gateway.scheduler.redis_scheduler import RedisScheduler
from gateway.service import InferenceService
from gateway.settings import (
    Settings,
)
from gateway.tenancy.records import ANONYMOUS, Tenant
from gateway.tenancy.runtime import Tenancy
from gateway.tenancy.store import StoreUnavailable

log = logging.getLogger(__name__)


def _errors_for(path: str) -> ErrorFormat:
    """The wire format of the door ``path`` belongs to."""
    return ollama.OLLAMA_ERRORS if path.startswith("/api/") else openai.OPENAI_ERRORS


async def _on_error(request: Request, exc: Exception) -> Response:
    return _errors_for(request.url.path).response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    path, errors = request.url.path, _errors_for(request.url.path)
    if exc.status_code == 404:
        if path.startswith(ollama.MODEL_MANAGEMENT):
            return errors.response(
                NotFound(
                    f"{path} is not available: Lockgate serves the models in its configuration"
                    " and does not pull, push, create, copy or delete models."
                )
            )
        return errors.response(NotFound(f"Unknown path: {path}"))
    if exc.status_code == 405:
        return errors.response(
            MethodNotAllowed(f"Method {request.method} is not allowed on {path}")
        )
    return errors.response(InvalidRequest(str(exc.detail)))


def _calls(dependant: Dependant) -> set[object]:
    found: set[object] = set()
    for d in dependant.dependencies:
        found.add(d.call)
        found |= _calls(d)
    return found


def _flatten(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, including those of included routers (FastAPI includes them lazily)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _flatten(included.routes)
        else:
            yield route


def require_guards(app: FastAPI) -> None:
    """Default deny: every route declares a key guard, or is listed as public."""
    for route in _flatten(app.routes):
        if isinstance(route, APIRoute):
            if route.path in PUBLIC:  # paths already carry the router's prefix
                continue
            if not _calls(route.dependant) & set(GUARDS):
                raise RuntimeError(f"route {route.path} has no auth dependency")
        elif isinstance(route, Route) and isinstance(route.endpoint, Endpoint):
            if route.endpoint.guard not in GUARDS:
                raise RuntimeError(f"route {route.path} has no auth guard")
        else:
            raise RuntimeError(f"route {route} is neither an APIRoute nor an Endpoint")


def _error_body(path: str, info: ErrorInfo) -> bytes:
    return _errors_for(path).body(info)


def create_app(
    settings: Settings,
    *,
    backends: Mapping[str, Backend] | None = None,
    drain: Drain | None = None,
    reload_from: Callable[[], Settings] | None = None,
    check_memory: bool = True,
) -> FastAPI:
    """Build the app; ``backends`` (name → backend) replaces the configured ones in tests,
    ``drain`` is the server's (:class:`gateway.drain.DrainingServer` begins it).

    ``reload_from`` reads the configuration again for a reload (``POST /admin/reload``;
    ``SIGHUP`` too when the app runs on the main thread), as the server was started;
    ``check_memory`` refuses a reload whose new embedded models would not fit."""
    created = int(time.time())
    drain = drain or Drain(settings.server.drain_seconds)
    request_log = RequestLog(settings.request_log)
    metrics = Metrics(tenant_label_cap=settings.auth.tenant_label_cap)
    tenancy = Tenancy(settings, metrics, models=None if backends is None else list(backends))
    policy = settings.scheduler.policy
    # An embedded engine's slots belong to this process; a remote engine's are shared by
    # every replica, through Redis when there is one.
    local = MemoryScheduler(policy=policy)
    shared: Scheduler = local
    if tenancy.link is not None:
        shared = RedisScheduler(tenancy.link, policy=policy, lease_ttl=settings.scheduler.lease_ttl)
    if backends is None:
        fleet = Fleet.from_settings(
            settings.models, settings.scheduler, local=local, shared=shared, created=created
        )
    else:
        limits = {m.name: m.max_n for m in settings.models}
        injected = [
            ServedModel(
                name,
                b,
                local,
                max_n=limits.get(name, 1),
                created=created,
                instance="injected",
                public_id="injected",
            )
            for name, b in backends.items()
        ]
        fleet = Fleet(injected, settings.scheduler)
    registry = fleet.registry
    metrics.watch(
        lambda: [(m.name, m.public_id, m.backend) for m in registry.instances()],
        lambda: [(m.name, m.public_id, m.scheduler.load(m.pool)) for m in registry.instances()],
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        request_log.start()
        await tenancy.start()
        schedulers = {id(s): s for s in (local, shared)}.values()
        for s in schedulers:
            await s.start()
        loading = asyncio.create_task(fleet.start())
        if board is not None:
            await board.start()
        await batch_store.open()
        if settings.batches.enabled:
            await runner.start()
        hangup = reload_from is not None and threading.current_thread() is threading.main_thread()
        if hangup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.reload_soon)
        try:
            yield
        finally:
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await reloader.stop()
            await runner.stop()  # its claims go back: another replica resumes at once
            await batch_store.close()
            if board is not None:
                await board.stop()
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            for s in schedulers:
                await s.stop()
            await fleet.close()
            await tenancy.stop()
            request_log.stop()

    app = FastAPI(
        title="Lockgate",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # not served (no unauthenticated surface beyond PUBLIC): app.openapi()
    )
    # /admin/tenants/ is not /admin/tenants: no redirect is answered before authentication.
    app.router.redirect_slashes = False
    app.state.metrics = metrics
    app.state.drain = drain
    app.state.readiness = Readiness(
        drain,
        registry,
        starting=lambda: fleet.starting,
        redis=tenancy.link,
        redis_required=settings.auth.limits_on_redis_outage == "fail_closed",
    )
    # Remote engines are shared by every replica, and so is the evidence against them.
    board = None
    if tenancy.link is not None:
        board = RedisBoard(tenancy.link, [m.pool for m in registry.instances() if m.remote])
    router = Router(registry.instances(), settings.routing, metrics, board=board)
    metrics.watch_router(
        lambda: [
            (m.name, m.public_id, router.weight(m), router.outliers.state(m.pool))
            for m in registry.instances()
        ]
    )
    app.state.router = router
    app.state.service = service = InferenceService(
        registry,
        metrics,
        tenancy.admission,
        router,
        drain=drain,
        request_log=request_log,
        drift=DriftTracker(settings.drift) if settings.drift.enabled else None,
    )
    metrics.watch_drift(lambda: [] if service.drift is None else service.drift.summary())
    app.state.reloader = reloader = Reloader(
        reload_from,
        settings,
        fleet=fleet,
        router=router,
        tenancy=tenancy,
        service=service,
        request_log=request_log,
        drain=drain,
        board=board,
        check_memory=check_memory,
    )
    b = settings.batches
    batch_store: BatchStore = (
        SQLiteBatchStore(b.database) if tenancy.link is None else RedisBatchStore(tenancy.link)
    )
    files = FileStorage(b.files_dir)

    def slots_of(model: str) -> int:
        try:
            return sum(m.scheduler.load(m.pool).capacity for m in registry.instances_of(model))
        except ModelNotFound:
            return 1

    async def tenant_of(tenant_id: str) -> Tenant | None:
        """A batch's tenant now (limits may have changed); without keys, the anonymous one."""
        if tenant_id == ANONYMOUS.tenant.id and not tenancy.auth.enabled:
            return ANONYMOUS.tenant
        return await tenancy.store.tenant(tenant_id)

    runner = BatchRunner(
        batch_store,
        files,
        service,
        tenant=tenant_of,
        capacity=slots_of,
        metrics=metrics,
        settings=RunnerSettings(
            lease_seconds=b.lease_seconds,
            poll_seconds=b.poll_seconds,
            max_active=b.max_active,
            interactive_reserve=b.interactive_reserve,
        ),
    )
    app.state.batches = BatchService(
        batch_store,
        files,
        limits=FileLimits(max_bytes=b.max_file_bytes, max_lines=b.max_file_lines),
        wake=runner.wake,
    )
    app.state.auth = tenancy.auth
    app.state.admin_key = tenancy.admin_key
    app.state.tenant_admin = tenancy.admin
    app.state.ledger = tenancy.ledger
    # The generation routes first: the router tries routes in order, and they are the hot ones.
    app.router.routes.extend([*openai.ROUTES, *responses.ROUTES, *ollama.ROUTES, *batches.ROUTES])
    for routes in (admin.router, health.router):
        app.include_router(routes)
    require_guards(app)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    # Expected errors are handled inside the app; `Exception` (the unexpected) by
    # Starlette's outermost middleware, which also logs the traceback.
    for expected in (
        GatewayError,
        BackendError,
        StoreUnavailable,
        ClientDisconnected,
        ClientDisconnect,
    ):
        app.add_exception_handler(expected, _on_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_error)
    # Middleware, innermost first (each added one wraps the ones before): the front doors'
    # fixed paths dispatched ahead of FastAPI's own layers, inside the size guard, which
    # sees a request before anything reads its body. Middleware users add wraps them all.
    app.add_middleware(FastDispatch, routes=app.router.routes)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.server.max_body_bytes,
        body=_error_body,
        # An upload's multipart body: the file's limit plus room for the form around it.
        larger={("POST", "/v1/files"): b.max_file_bytes + 64 * 1024},
    )
    app.add_middleware(DrainGate, drain=drain, body=_error_body)
    app.add_middleware(
        AccessLog, metrics=metrics, routes=app.router.routes, format=settings.server.access_log
    )
    return app
