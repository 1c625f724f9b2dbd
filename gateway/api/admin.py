"""``/admin/*``: tenants, keys and usage, behind the admin key.

POST   /admin/tenants                   create (body: a tenant)       → 201
GET    /admin/tenants                   list
GET    /admin/tenants/{id}              read
PATCH  /admin/tenants/{id}              change some fields
DELETE /admin/tenants/{id}              delete, with its keys
POST   /admin/tenants/{id}/keys         new key, shown once            → 201
GET    /admin/tenants/{id}/keys         list (never the key itself)
POST   /admin/keys/{key_id}/revoke      revoke
POST   /admin/keys/{key_id}/rotate      new key; the old one ends now or after a grace
GET    /admin/usage?tenant=&model=&start=&end=    hourly usage rows and totals
GET    /admin/models                    every model's instances: tier, weight, state, load
PUT    /admin/models/{name}/instances/{id}/weight   body {"weight": 25}: at run time
POST   /admin/reload                    read the config file again and apply it (or 422)
GET    /admin/drift/{model}             a model's drift windows and scores
POST   /admin/drift/{model}/pin         the current window becomes the reference
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from gateway.api.security import Admin
from gateway.drift import DriftTracker, window_values
from gateway.errors import InvalidRequest, NotFound
from gateway.protocol.wire import StrictBody, parse
from gateway.registry import ModelRegistry
from gateway.reload import Reloader
from gateway.router import Router
from gateway.tenancy.admin import TenantAdmin
from gateway.tenancy.ledger import UsageLedger
from gateway.tenancy.records import KeyRecord, Tenant

router = APIRouter(prefix="/admin", dependencies=[Admin])

MAX_USAGE_RANGE = 400 * 86400


class NewKey(StrictBody):
    name: Annotated[str, Field(max_length=128)] | None = None
    expires_in: Annotated[float, Field(gt=0)] | None = None  # seconds from now


class NewWeight(StrictBody):
    weight: Annotated[float, Field(ge=0, le=10_000)]


class Rotation(StrictBody):
    grace_seconds: Annotated[float, Field(ge=0, le=30 * 86400)] = 0.0


def _admin(request: Request) -> TenantAdmin:
    admin: TenantAdmin = request.app.state.tenant_admin
    return admin


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object.")
    return data


def _tenant_json(tenant: Tenant) -> dict[str, Any]:
    return {"object": "tenant", **tenant.model_dump()}


def _key_json(record: KeyRecord, key: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"object": "api_key", **record.model_dump(exclude={"hash"})}
    if key is not None:
        out["key"] = key  # only in the response that creates it
    return out


@router.post("/tenants")
async def create_tenant(request: Request) -> Response:
    tenant = await _admin(request).create(_object(await request.body()))
    return _json(_tenant_json(tenant), 201)


@router.get("/tenants")
async def list_tenants(request: Request) -> Response:
    tenants = await _admin(request).store.tenants()
    return _json({"object": "list", "data": [_tenant_json(t) for t in tenants]})


@router.get("/tenants/{tenant_id}")
async def get_tenant(request: Request, tenant_id: str) -> Response:
    return _json(_tenant_json(await _admin(request).get(tenant_id)))


@router.patch("/tenants/{tenant_id}")
async def update_tenant(request: Request, tenant_id: str) -> Response:
    tenant = await _admin(request).update(tenant_id, _object(await request.body()))
    return _json(_tenant_json(tenant))


@router.delete("/tenants/{tenant_id}")
async def delete_tenant(request: Request, tenant_id: str) -> Response:
    await _admin(request).delete(tenant_id)
    return _json({"object": "tenant", "id": tenant_id, "deleted": True})


@router.post("/tenants/{tenant_id}/keys")
async def create_key(request: Request, tenant_id: str) -> Response:
    body = parse(NewKey, await request.body() or b"{}")
    expires = None if body.expires_in is None else time.time() + body.expires_in
    key, record = await _admin(request).create_key(tenant_id, name=body.name, expires_at=expires)
    return _json(_key_json(record, key), 201)


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(request: Request, tenant_id: str) -> Response:
    admin = _admin(request)
    await admin.get(tenant_id)
    keys = await admin.store.keys(tenant_id)
    return _json({"object": "list", "data": [_key_json(k) for k in keys]})


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str) -> Response:
    return _json(_key_json(await _admin(request).revoke_key(key_id)))


@router.post("/keys/{key_id}/rotate")
async def rotate_key(request: Request, key_id: str) -> Response:
    body = parse(Rotation, await request.body() or b"{}")
    key, record = await _admin(request).rotate_key(key_id, grace=body.grace_seconds)
    return _json(_key_json(record, key), 201)


def _instant(value: str | None, default: float, param: str) -> float:
    if value is None:
        return default
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{param} must be an ISO 8601 time", param=param) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@router.get("/usage")
async def usage(
    request: Request,
    tenant: str | None = None,
    model: str | None = None,
    start: str | None = None,
    end: str | None = None,
) -> Response:
    now = time.time()
    until = _instant(end, now + 1, "end")
    since = _instant(start, until - 86400, "start")
    if not 0 < until - since <= MAX_USAGE_RANGE:
        raise InvalidRequest("start must be before end, at most 400 days apart", param="start")
    ledger: UsageLedger = request.app.state.ledger
    rows = await ledger.usage(start=since, end=until, tenant=tenant, model=model)
    # A deleted tenant's history is still answered; a name never seen is a mistake.
    if tenant is not None and not rows and await _admin(request).store.tenant(tenant) is None:
        raise NotFound(f"No tenant '{tenant}', and no usage recorded for it.")
    data, totals = [], {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for k, t in rows.items():
        data.append(
            {
                "hour": datetime.fromtimestamp(k.hour, UTC).isoformat(),
                "tenant": k.tenant,
                "key_id": k.key_id,
                "model": k.model,
                "backend": k.backend,
                "status": k.status,
                "requests": t.requests,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "engine_seconds": round(t.engine_seconds, 3),
            }
        )
        totals["requests"] += t.requests
        totals["prompt_tokens"] += t.prompt_tokens
        totals["completion_tokens"] += t.completion_tokens
    return _json({"object": "list", "data": data, "totals": totals})


def _router(request: Request) -> Router:
    router: Router = request.app.state.router
    return router


@router.get("/models")
async def models_status(request: Request) -> Response:
    registry: ModelRegistry = request.app.state.service.registry
    data = [
        {"object": "model", "id": name, "instances": _router(request).status(instances)}
        for name, instances in registry.by_name().items()
    ]
    return _json({"object": "list", "data": data})


@router.put("/models/{name}/instances/{backend_id}/weight")
async def set_weight(request: Request, name: str, backend_id: str) -> Response:
    body = parse(NewWeight, await request.body())
    registry: ModelRegistry = request.app.state.service.registry
    instances = registry.instances_of(name)
    _router(request).set_weight(instances, backend_id, body.weight)
    return _json({"object": "model", "id": name, "instances": _router(request).status(instances)})


@router.post("/reload")
async def reload(request: Request) -> Response:
    """Apply the configuration file as it is now: what changed, or 422 naming the key."""
    reloader: Reloader = request.app.state.reloader
    return _json((await reloader.reload()).json())


def _drift(request: Request) -> DriftTracker:
    drift: DriftTracker | None = request.app.state.service.drift
    if drift is None:
        raise NotFound("Drift signals are off (drift.enabled: false).")
    return drift


@router.get("/drift/{model}")
async def drift_report(request: Request, model: str) -> Response:
    """The model's reference and current windows (each feature's values) and scores."""
    drift = _drift(request)
    windows = drift.windows(model)
    if windows is None:
        raise NotFound(f"No requests of the model '{model}' have been seen yet.")
    version, reference, current = windows
    return _json(
        {
            "object": "drift",
            "model": model,
            "version": version,
            "min_requests": drift.settings.min_requests,
            "reference": window_values(reference),
            "current": window_values(current),
            "scores": [{"feature": f, "test": t, "value": v} for f, t, v in drift.scores(model)],
        }
    )


@router.post("/drift/{model}/pin")
async def drift_pin(request: Request, model: str) -> Response:
    """Make the current window the model's reference (after a deliberate change)."""
    if not _drift(request).pin(model):
        raise NotFound(f"No requests of the model '{model}' have been seen yet.")
    return await drift_report(request, model)
