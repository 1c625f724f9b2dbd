"""The usage ledger: every finished request, summed per hour, tenant, key, model, backend, status.

:meth:`UsageLedger.record` only adds to a dict in memory, so the request path
never waits for storage; :meth:`run` writes the sums to the store every
``interval`` seconds (and :meth:`flush` once more at shutdown). If the store is
unreachable the sums stay in memory and go out with the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gateway.tenancy.store import StoreUnavailable, TenantStore, UsageKey, UsageRows, UsageTotals

log = logging.getLogger(__name__)


class UsageLedger:
    def __init__(
        self, store: TenantStore, *, interval: float = 1.0, wall: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._interval = interval
        self._wall = wall
        self._pending: UsageRows = {}
        self._lock = asyncio.Lock()

    def record(
        self,
        *,
        tenant: str,
        key_id: str,
        model: str,
        backend: str,
        status: int,
        prompt_tokens: int,
        completion_tokens: int,
        engine_seconds: float,
    ) -> None:
        hour = int(self._wall()) // 3600 * 3600
        key = UsageKey(hour, tenant, key_id, model, backend, status)
        self._pending.setdefault(key, UsageTotals()).add(
            UsageTotals(1, prompt_tokens, completion_tokens, engine_seconds)
        )

    async def flush(self) -> None:
        async with self._lock:
            rows, self._pending = self._pending, {}
            if not rows:
                return
            try:
                await self._store.add_usage(rows)
            except StoreUnavailable:
                for key, totals in rows.items():  # keep them for the next flush
                    self._pending.setdefault(key, UsageTotals()).add(totals)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # a bad flush must not end the ledger
                log.exception("usage flush failed")

    async def usage(
        self, *, start: float, end: float, tenant: str | None = None, model: str | None = None
    ) -> UsageRows:
        """Stored totals for the hours that overlap ``[start, end)``, after a flush."""
        with contextlib.suppress(StoreUnavailable):
            await self.flush()
        return await self._store.usage(
            start_hour=int(start) // 3600 * 3600, end_hour=int(end), tenant=tenant, model=model
        )
