"""The OpenAPI document of every route, the plain ASGI endpoints included.

FastAPI describes its ``APIRoute`` s; the front doors' :class:`Endpoint` routes
are added here from what each declares (method, path, request model, guard), so
one document describes the whole HTTP surface — for clients, and for the fuzzer.

    schema = openapi_document(app)          # also app.openapi()
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.routing import Route

from gateway.api.endpoint import Endpoint

_REF = "#/components/schemas/{model}"
_ERROR = {"$ref": "#/components/schemas/Error"}


def _operation(
    path: str, method: str, endpoint: Endpoint, schemas: dict[str, Any]
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", path).rstrip("_"),
        "tags": [endpoint.errors.name],
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "OK"},
            "default": {
                "description": "An error, in this door's error shape",
                "content": {endpoint.errors.media_type: {"schema": _ERROR}},
            },
        },
    }
    params = [p.strip("{}").split(":")[0] for p in path.split("/") if p.startswith("{")]
    if params:
        operation["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    if endpoint.body is not None:
        ref = {"$ref": _REF.format(model=endpoint.body.__name__)}
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref}},
        }
    return operation


def openapi_document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    endpoints = [
        (r, r.endpoint)
        for r in app.routes
        if isinstance(r, Route) and isinstance(r.endpoint, Endpoint)
    ]
    models = {e.body for _, e in endpoints if e.body is not None}
    _, defs = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)], ref_template=_REF
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    schemas["Error"] = {
        "description": "OpenAI's {error: {message, type, param, code}} or Ollama's {error}",
        "type": "object",
        "required": ["error"],
        "properties": {"error": {}},
    }
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    paths = document.setdefault("paths", {})
    for route, endpoint in endpoints:
        path = route.path.replace(":path}", "}")
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            paths.setdefault(path, {})[method.lower()] = _operation(path, method, endpoint, schemas)
    return document
