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
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Route

from backends.base import Backend, BackendError
from backends.fake import FakeBackend
from backends.llama.backend import EmbeddedBackend
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
from gateway.limits import BodySizeLimit
from gateway.memory_plan import embedded_config
from gateway.metrics import Metrics
from gateway.outliers_redis import RedisBoard
from gateway.registry import ModelRegistry, ServedModel
from gateway.remote import build_remote_backend
from gateway.request_log import RequestLog
from gateway.router import Router
from gateway.scheduler.base import PoolLimits, Scheduler
from gateway.scheduler.memory import MemoryScheduler
from gateway.scheduler.redis_scheduler import RedisScheduler
from gateway.service import InferenceService
from gateway.settings import (
    AnyModelSettings,
    ConfigError,
    FakeModelSettings,
    ModelSettings,
    RemoteModelSettings,
    Settings,
)
from gateway.tenancy.records import ANONYMOUS, Tenant
from gateway.tenancy.runtime import Tenancy
from gateway.tenancy.store import StoreUnavailable

log = logging.getLogger(__name__)


def build_backend(model: AnyModelSettings) -> Backend:
    if isinstance(model, ModelSettings):
        return EmbeddedBackend(embedded_config(model))
    if isinstance(model, FakeModelSettings):
        return FakeBackend(
            model.behaviour or model.name,
            context_length=model.context_length,
            delay=model.delay,
            capacity=model.capacity,
        )
    return build_remote_backend(model)


def _public_ids(models: Sequence[AnyModelSettings]) -> list[str]:
    """What clients are told served them: the configured ``id``, else the backend kind —
    numbered among a name's remote instances (``llamacpp-0``), and from the second on
    among its local ones (``embedded``, ``embedded-1``) — never an upstream's URL."""
    remote: dict[str, int] = {}
    local: dict[tuple[str, str], int] = {}
    ids: list[str] = []
    for m in models:
        if m.id is not None:
            ids.append(m.id)
        elif isinstance(m, ModelSettings | FakeModelSettings):
            n = local.get((m.name, m.backend), 0)
            local[m.name, m.backend] = n + 1
            ids.append(m.backend if n == 0 else f"{m.backend}-{n}")
        else:
            n = remote.get(m.name, 0)
            remote[m.name] = n + 1
            ids.append(f"{m.backend}-{n}")
    seen: set[tuple[str, str]] = set()
    for m, id in zip(models, ids, strict=True):
        if (m.name, id) in seen:  # a configured id equal to a generated one
            raise ConfigError(
                f"model '{m.name}': two instances would both be '{id}'; give each an `id`"
            )
        seen.add((m.name, id))
    return ids


def _kind(m: ServedModel) -> str:
    """What a newcomer needs to know of a loaded model: a base model garbles chats."""
    info = m.backend.describe()
    facts = [f for f in (info.family, info.quantization) if f]
    if info.parameters:
        facts.append(f"{info.parameters / 1e6:,.0f}M parameters")
    said = f": {', '.join(facts)}" if facts else ""
    if info.chat_template is False:
        said += (
            "; a base model (its GGUF has no chat template): completions suit it, chats"
            " get a built-in template and answers of little sense. For chat, serve an"
            " instruction-tuned GGUF: lockgate serve --model PATH"
        )
    elif info.chat_template:
        said += "; a chat model (its GGUF carries a chat template)"
    return said


async def _start_all(models: Sequence[ServedModel], starting: set[ServedModel]) -> None:
    """Start every backend at once; each leaves ``starting`` when its start has ended."""

    async def start(m: ServedModel) -> None:
        began = time.perf_counter()
        try:
            await m.backend.start()
        except Exception:
            log.exception("model %s (%s) failed to load; it answers 503", m.name, m.public_id)
            return
        finally:
            starting.discard(m)
        took = time.perf_counter() - began
        if m.backend.ready:
            log.info("model %s (%s) ready in %.1fs%s", m.name, m.public_id, took, _kind(m))
        else:  # the backend has said why (an upstream not answering)
            log.info("model %s (%s) started, not ready yet", m.name, m.public_id)

    await asyncio.gather(*(start(m) for m in models))


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


def _pool_limits(settings: Settings, backend: Backend) -> PoolLimits:
    s = settings.scheduler
    return PoolLimits(
        capacity=backend.load().capacity,
        max_queue=s.max_queue,
        max_queue_per_tenant=s.max_queue_per_tenant,
        max_wait=s.max_wait,
    )


def _error_body(path: str, info: ErrorInfo) -> bytes:
    return _errors_for(path).body(info)


def create_app(
    settings: Settings, *, backends: Mapping[str, Backend] | None = None, drain: Drain | None = None
) -> FastAPI:
    """Build the app; ``backends`` (name → backend) replaces the configured ones in tests,
    ``drain`` is the server's (:class:`gateway.drain.DrainingServer` begins it)."""
    created = int(time.time())
    drain = drain or Drain(settings.server.drain_seconds)
    request_log = RequestLog(settings.request_log)
    metrics = Metrics(tenant_label_cap=settings.auth.tenant_label_cap)
    drift = DriftTracker(settings.drift) if settings.drift.enabled else None
    if drift is not None:
        metrics.watch_drift(drift.summary)
    tenancy = Tenancy(settings, metrics, models=None if backends is None else list(backends))
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
                local if isinstance(m, ModelSettings | FakeModelSettings) else shared,
                max_n=m.max_n,
                created=created,
                # A remote engine's slots are named by its URL, the same on every replica.
                instance=m.base_url if isinstance(m, RemoteModelSettings) else public_id,
                public_id=public_id,
                remote=isinstance(m, RemoteModelSettings),
                tier=m.tier,
                weight=m.weight,
                canary=m.canary,
            )
            for m, public_id in zip(settings.models, _public_ids(settings.models), strict=True)
        ]
    else:
        limits = {m.name: m.max_n for m in settings.models}
        served = [
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
    registry = ModelRegistry(served)
    for m in served:
        m.scheduler.add_pool(m.pool, _pool_limits(settings, m.backend))
    metrics.watch(
        lambda: [(m.name, m.public_id, m.backend) for m in registry.instances()],
        lambda: [(m.name, m.public_id, m.scheduler.load(m.pool)) for m in registry.instances()],
    )
    starting = set(served)

    async def load_models() -> None:
        await _start_all(served, starting)
        for m in served:  # llama-server reports its real slot count once it is up
            m.scheduler.add_pool(m.pool, _pool_limits(settings, m.backend))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        request_log.start()
        await tenancy.start()
        schedulers = {id(s): s for s in (local, shared)}.values()
        for s in schedulers:
            await s.start()
        loading = asyncio.create_task(load_models())
        if board is not None:
            await board.start()
        await batch_store.open()
        if settings.batches.enabled:
            await runner.start()
        try:
            yield
        finally:
            await runner.stop()  # its claims go back: another replica resumes at once
            await batch_store.close()
            if board is not None:
                await board.stop()
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            for s in schedulers:
                await s.stop()
            await asyncio.gather(*(m.backend.close() for m in served), return_exceptions=True)
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
        starting=lambda: starting,
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
        drift=drift,
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
