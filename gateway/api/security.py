"""The two guards every route declares: an API key (tenants) or the admin key.

Each route declares its own — an :class:`~gateway.api.endpoint.Endpoint`'s
``guard``, a FastAPI dependency on the others — never a path-prefix check on a
rebuilt URL (vLLM GHSA-94f4-hr76-p5j6), and :func:`gateway.app.require_guards`
refuses to start if any route lacks one (default deny); only the paths in
:data:`PUBLIC` go without.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Request

from gateway.access import access_of
from gateway.errors import Forbidden, InvalidRequest, Unauthorized
from gateway.metrics import Metrics
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.keys import bearer_token
from gateway.tenancy.records import Principal

PUBLIC = frozenset({"/health/live", "/health/ready", "/metrics"})


def authorization(request: Request) -> str | None:
    """The one ``Authorization`` header, if any. It is a singleton field (RFC 9110): with
    two, a proxy in front and this gateway could each read a different one, so it is a 400."""
    found = [v for k, v in request.scope["headers"] if k == b"authorization"]
    if len(found) > 1:
        raise InvalidRequest("Send one Authorization header, not several.", param="authorization")
    return found[0].decode("latin-1") if found else None


async def authenticated(request: Request) -> Principal:
    auth: Authenticator = request.app.state.auth
    try:
        principal = await auth.authenticate(authorization(request))
    except Unauthorized:
        metrics: Metrics = request.app.state.metrics
        metrics.rejected("-", "unauthenticated")
        raise
    access_of(request.scope).tenant = principal.tenant.id
    return principal


async def admin(request: Request) -> None:
    expected: str | None = request.app.state.admin_key
    if expected is None:
        raise Forbidden("The admin API is off: set LOCKGATE_AUTH__ADMIN_KEY to turn it on.")
    token = bearer_token(authorization(request)) or ""
    # Digests first, so the comparison takes the same time whatever the length.
    presented = hashlib.sha256(token.encode()).digest()
    if not hmac.compare_digest(presented, hashlib.sha256(expected.encode()).digest()):
        raise Unauthorized("Invalid admin key.")
    access_of(request.scope).tenant = "admin"


Admin = Depends(admin)
GUARDS = (authenticated, admin)
