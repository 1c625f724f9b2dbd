"""Who is calling: ``Authorization: Bearer lg-…`` → :class:`Principal`, with a small cache.

The cache keeps each answer (including "no such key") for ``ttl`` seconds, so a
steady client costs the store nothing; that is also the longest a revocation made
through another replica takes to reach this one. While the store is unreachable a
cached key stays valid for ``outage_grace`` seconds; any other key gets 503
(never 401: the key may be fine, and never 200: it may be revoked).

Messages never contain the presented key, and nothing here logs it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import StateUnavailable, Unauthorized
from gateway.tenancy.keys import bearer_token, key_hash, same_hash, well_formed
from gateway.tenancy.records import ANONYMOUS, KeyRecord, Principal
from gateway.tenancy.store import StoreUnavailable, TenantStore

MISSING = "Missing API key. Send it as 'Authorization: Bearer lg-...'."
INVALID = "Invalid API key."
EXPIRED = "This API key has expired or been revoked."


@dataclass(frozen=True, slots=True)
class _Entry:
    found: tuple[KeyRecord, Principal] | None
    at: float


class Authenticator:
    def __init__(
        self,
        store: TenantStore,
        *,
        enabled: bool,
        ttl: float = 2.0,
        outage_grace: float = 60.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.enabled = enabled
        self._store = store
        self._ttl = ttl
        self._grace = outage_grace
        self._max = max_entries
        self._clock = clock
        self._wall = wall
        self._cache: OrderedDict[str, _Entry] = OrderedDict()

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized(MISSING)
        if not well_formed(token):  # nothing unshaped reaches a store
            raise Unauthorized(INVALID)
        digest = key_hash(token)
        found = await self._find(digest)
        if found is None:
            raise Unauthorized(INVALID)
        record, principal = found
        if not same_hash(record.hash, digest):
            raise Unauthorized(INVALID)
        if not record.usable(self._wall()):  # checked on every request, cached or not
            raise Unauthorized(EXPIRED)
        return principal

    async def _find(self, digest: str) -> tuple[KeyRecord, Principal] | None:
        now = self._clock()
        entry = self._cache.get(digest)
        if entry is not None and now - entry.at < self._ttl:
            return entry.found
        try:
            stored = await self._store.lookup(digest)
        except StoreUnavailable:
            if entry is not None and entry.found is not None and now - entry.at < self._grace:
                return entry.found
            raise StateUnavailable(
                "Authentication is temporarily unavailable; retry shortly."
            ) from None
        found = None
        if stored is not None:
            record, tenant = stored
            found = (record, Principal(tenant=tenant, key_id=record.id))
        self._cache[digest] = _Entry(found, now)
        self._cache.move_to_end(digest)
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return found

    def forget(self) -> None:
        """Drop every cached answer (after a change made through this replica)."""
        self._cache.clear()
