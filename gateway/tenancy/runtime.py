"""The tenancy parts of one app, built from settings, started and stopped together.

Without ``redis_url``: a SQLite store and in-process counters (one replica).
With it: store and counters in Redis, shared by every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import defaultdict
from collections.abc import Collection

from gateway.metrics import Metrics
from gateway.settings import ConfigError, Settings
from gateway.tenancy.admin import TenantAdmin
from gateway.tenancy.admission import Admission, Periods, budgets, scopes
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.counters import Counters, MemoryCounters
from gateway.tenancy.ledger import UsageLedger
from gateway.tenancy.redis_counters import RedisCounters
from gateway.tenancy.redis_link import RedisLink
from gateway.tenancy.redis_store import RedisStore
from gateway.tenancy.store import SQLiteStore, StoreUnavailable, TenantStore

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def no_auth_message(host: str) -> str:
    return (
        f"refusing to listen on {host} without API keys. Either declare tenants in the"
        " config (tenants: ...), or set LOCKGATE_AUTH__ADMIN_KEY and create a tenant with"
        " `lockgate tenants create`, or bind to 127.0.0.1."
    )


class Tenancy:
    """``models``: the names served (tenants may only name those); default: the config's."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, models: Collection[str] | None = None
    ) -> None:
        self.settings = settings
        auth = settings.auth
        self.link: RedisLink | None = None
        self.store: TenantStore
        counters: Counters
        if settings.redis_url is not None:
            self.link = RedisLink(
                settings.redis_url.get_secret_value(), timeout=settings.redis_timeout
            )
            self.store = RedisStore(self.link)
            counters = RedisCounters(self.link, lease=auth.concurrency_lease)
            link = self.link
            metrics.redis_degraded.set_function(lambda: float(link.degraded))
            # A Redis that restarted without persistence lost the configured tenants and
            # keys: every key would be a 401 once the auth cache expired. Write them again.
            link.on_recovery.append(self._reapply_config)
        else:
            self.store = SQLiteStore(auth.database)
            counters = MemoryCounters()
        self.counters = counters
        self.admin_key = auth.admin_key.get_secret_value() if auth.admin_key else None
        self.auth = Authenticator(
            self.store, enabled=True, ttl=auth.cache_ttl, outage_grace=auth.outage_grace
        )
        self.ledger = UsageLedger(self.store)
        self.admission = Admission(
            counters, self.ledger, metrics, policy=auth.limits_on_redis_outage
        )
        served = [m.name for m in settings.models] if models is None else models
        self.admin = TenantAdmin(self.store, self.auth, models=served)
        self._ledger_task: asyncio.Task[None] | None = None
        self._config_task: asyncio.Task[None] | None = None

    async def auth_needed(self) -> bool:
        """Keys are required if an admin key is set or any tenant exists (config or store)."""
        if self.admin_key is not None or self.settings.tenants:
            return True
        try:
            return await self.store.count_tenants() > 0
        except StoreUnavailable:
            return True  # cannot tell: fail closed

    async def start(self) -> None:
        await self.store.open()
        try:
            await self.admin.apply_config(self.settings.tenants)
        except StoreUnavailable:
            log.warning("redis unreachable at start-up: configured tenants written when it is up")
            self._config_task = asyncio.create_task(self._apply_config_when_up())
        if isinstance(self.counters, MemoryCounters):
            await self._restore_budgets(self.counters)
        self.auth.enabled = await self.auth_needed()
        host = self.settings.server.host
        if not self.auth.enabled:
            if not is_loopback(host):
                raise ConfigError(no_auth_message(host))
            log.warning(
                "auth off: no tenants in %s and no admin key: serving on %s without API keys",
                self.where,
                host,
            )
        else:
            log.info("auth on: %s", await self._why_auth())
        self._ledger_task = asyncio.create_task(self.ledger.run())

    async def reload(self, settings: Settings) -> None:
        """A reload: the config file's tenants and keys written over the stored ones (a key
        that left the file is revoked), at once on this replica (its cache dropped).
        Keys turn on if the new file declares tenants; a reload never turns them off."""
        self.settings = settings
        self.admin.serve([m.name for m in settings.models])
        try:
            await self.admin.apply_config(settings.tenants)
        except StoreUnavailable:
            log.warning("redis unreachable: the reloaded tenants are written when it is up")
            if self._config_task is None or self._config_task.done():
                self._config_task = asyncio.create_task(self._apply_config_when_up())
            return
        self.auth.forget()
        if not self.auth.enabled and await self.auth_needed():
            self.auth.enabled = True
            log.info("auth on: %s", await self._why_auth())

    @property
    def where(self) -> str:
        """Where tenants, keys and usage live (never a Redis URL: it may hold a password)."""
        return "Redis" if self.link is not None else str(self.settings.auth.database)

    async def _why_auth(self) -> str:
        try:
            stored = await self.store.count_tenants()
        except StoreUnavailable:
            return f"the tenant store ({self.where}) cannot be read, so keys are required"
        configured = len(self.settings.tenants)
        why = f"{stored} tenant{'s' if stored != 1 else ''} in {self.where}"
        if configured:
            why += f" ({configured} from the config file)"
        if self.admin_key is not None:
            why += "; admin API on (LOCKGATE_AUTH__ADMIN_KEY is set)"
        return why

    async def _reapply_config(self) -> None:
        try:
            await self.admin.apply_config(self.settings.tenants)
        except StoreUnavailable:
            log.warning("redis is back but refused the configured tenants; retrying")
            self._config_task = asyncio.create_task(self._apply_config_when_up())

    async def _apply_config_when_up(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.admin.apply_config(self.settings.tenants)
            except StoreUnavailable:
                continue
            log.warning("configured tenants written to redis")
            return

    async def _restore_budgets(self, counters: MemoryCounters) -> None:
        """In-process budgets start empty: re-charge this day's and month's usage from the ledger.

        (In Redis they survive restarts on their own.)
        """
        now = time.time()
        periods = Periods.at(now)
        rows = await self.store.usage(
            start_hour=int(periods.month_start), end_hour=int(now) + 1, tenant=None, model=None
        )
        spent: dict[tuple[str, str | None, str], int] = defaultdict(int)
        for k, t in rows.items():
            tokens = t.prompt_tokens + t.completion_tokens
            for model in (None, k.model):
                spent[k.tenant, model, "monthly"] += tokens
                if k.hour >= periods.day_start:
                    spent[k.tenant, model, "daily"] += tokens
        for tenant in await self.store.tenants():
            for model in (None, *tenant.model_limits):
                scope, limits = scopes(tenant, model or "")[0 if model is None else 1]
                for check in budgets(scope, limits, 0, periods):
                    counters.seed(check, spent[tenant.id, model, check.what])

    async def stop(self) -> None:
        for task in (self._ledger_task, self._config_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            await self.ledger.flush()
        await self.counters.close()
        await self.store.close()
        if self.link is not None:
            await self.link.close()
