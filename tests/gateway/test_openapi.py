"""The OpenAPI document describes every route, the plain ASGI front doors included."""

from __future__ import annotations

from starlette.routing import Route

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.settings import Settings


def test_every_route_is_in_the_document() -> None:
    app = create_app(Settings(), backends={"echo": FakeBackend()})
    document = app.openapi()
    described = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    routes = {
        (method, route.path.replace(":path}", "}"))
        for route in app.routes
        if isinstance(route, Route) and route.include_in_schema
        for method in route.methods or ()
        if method != "HEAD"
    }
    admin = {(m, p) for m, p in described if p.startswith("/admin/")}
    assert routes <= described
    assert ("POST", "/v1/chat/completions") in described
    assert ("POST", "/api/chat") in described
    assert ("POST", "/v1/responses") in described
    assert ("GET", "/v1/models/{model_id}") in described
    assert ("POST", "/admin/keys/{key_id}/rotate") in admin
    assert ("GET", "/health/ready") in described
    chat = document["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[-1]
    assert "messages" in document["components"]["schemas"][name]["properties"]
    assert chat["security"] == [{"bearer": []}]
