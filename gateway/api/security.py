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

from gateway.errors import Forbidden, Unauthorized
from gateway.metrics import Metrics
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.keys import bearer_token
from gateway.tenancy.records import Principal

PUBLIC = frozenset({"/health/live", "/health/ready", "/metrics"})


async def authenticated(request: Request) -> Principal:
    auth: Authenticator = request.app.state.auth
    try:
        return await auth.authenticate(request.headers.get("authorization"))
    except Unauthorized:
        metrics: Metrics = request.app.state.metrics
        metrics.rejected("-", "unauthenticated")
        raise


async def admin(request: Request) -> None:
    expected: str | None = request.app.state.admin_key
    if expected is None:
        raise Forbidden("The admin API is off: set LOCKGATE_AUTH__ADMIN_KEY to turn it on.")
    token = bearer_token(request.headers.get("authorization")) or ""
    # Digests first, so the comparison takes the same time whatever the length.
    presented = hashlib.sha256(token.encode()).digest()
    if not hmac.compare_digest(presented, hashlib.sha256(expected.encode()).digest()):
        raise Unauthorized("Invalid admin key.")


Admin = Depends(admin)
GUARDS = (authenticated, admin)
