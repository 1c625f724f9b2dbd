"""Run-time management of tenants and keys, behind the admin API and ``lockgate tenants|keys``.

Every change made here drops this replica's auth cache at once; other replicas
(sharing Redis) see it within the cache TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from pydantic import ValidationError

from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.keys import display_prefix, key_hash, new_key, new_key_id
from gateway.tenancy.records import ConfiguredTenant, KeyRecord, Tenant
from gateway.tenancy.store import TenantStore
from gateway.validation import first_problem


def _tenant(data: dict[str, Any]) -> Tenant:
    try:
        return Tenant.model_validate(data)
    except ValidationError as exc:
        where, message = first_problem(exc)
        raise InvalidRequest(message, param=where) from None


class TenantAdmin:
    """``models``: the names this gateway serves; a tenant naming another is refused."""

    def __init__(
        self,
        store: TenantStore,
        auth: Authenticator,
        *,
        models: Collection[str] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._auth = auth
        self._models = None if models is None else frozenset(models)
        self._wall = wall

    def serve(self, models: Collection[str]) -> None:
        """The names served from now on (a reload)."""
        self._models = frozenset(models)

    def _check_models(self, tenant: Tenant, before: Tenant | None = None) -> None:
        """Refuse names this gateway does not serve, among those the change adds (a name
        kept from before may be served by another replica, or served again later)."""
        if self._models is None:
            return
        known = set(self._models)
        if before is not None:
            known |= set(before.models or ()) | set(before.model_limits)
        for field, named in (
            ("models", tenant.models or ()),
            ("model_limits", tenant.model_limits),
        ):
            unknown = sorted(set(named) - known)
            if unknown:
                raise InvalidRequest(
                    f"This gateway serves no model named {', '.join(map(repr, unknown))};"
                    f" it serves {', '.join(sorted(self._models))}.",
                    param=field,
                )

    async def apply_config(self, tenants: Sequence[ConfiguredTenant]) -> None:
        """Write the config file's tenants and keys over the stored ones (GitOps).

        A revocation, or an earlier expiry set by a rotation, outlives restarts; a
        configured key that left the file is revoked.
        """
        configured: set[str] = set()
        for t in tenants:
            await self.store.put_tenant(t.tenant())
            for record in t.key_records():
                configured.add(record.id)
                stored = await self.store.key(record.id)
                if stored is None:
                    await self.store.put_key(record.model_copy(update={"created_at": self._wall()}))
                    continue
                ends = [e for e in (record.expires_at, stored.expires_at) if e is not None]
                await self.store.put_key(
                    record.model_copy(
                        update={
                            "created_at": stored.created_at,
                            "revoked_at": stored.revoked_at,
                            "expires_at": min(ends) if ends else None,
                        }
                    )
                )
        for tenant in await self.store.tenants():
            for key in await self.store.keys(tenant.id):
                if key.name == "config" and key.id not in configured and key.revoked_at is None:
                    await self.store.put_key(key.model_copy(update={"revoked_at": self._wall()}))

    async def get(self, tenant_id: str) -> Tenant:
        tenant = await self.store.tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"No tenant '{tenant_id}'.")
        return tenant

    async def create(self, data: dict[str, Any]) -> Tenant:
        tenant = _tenant(data)
        self._check_models(tenant)
        if await self.store.tenant(tenant.id) is not None:
            raise Conflict(f"Tenant '{tenant.id}' already exists.", param="id")
        await self.store.put_tenant(tenant)
        return tenant

    async def update(self, tenant_id: str, changes: dict[str, Any]) -> Tenant:
        current = await self.get(tenant_id)
        if changes.get("id", tenant_id) != tenant_id:
            raise InvalidRequest("A tenant's id cannot change.", param="id")
        tenant = _tenant({**current.model_dump(), **changes})
        self._check_models(tenant, current)
        await self.store.put_tenant(tenant)
        self._auth.forget()
        return tenant

    async def delete(self, tenant_id: str) -> None:
        if not await self.store.delete_tenant(tenant_id):
            raise NotFound(f"No tenant '{tenant_id}'.")
        self._auth.forget()

    async def create_key(
        self, tenant_id: str, *, name: str | None = None, expires_at: float | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key for the tenant: the key itself (shown once) and its stored record."""
        await self.get(tenant_id)
        key = new_key()
        record = KeyRecord(
            id=new_key_id(),
            tenant=tenant_id,
            hash=key_hash(key),
            name=name,
            prefix=display_prefix(key),
            created_at=self._wall(),
            expires_at=expires_at,
        )
        await self.store.put_key(record)
        return key, record

    async def key(self, key_id: str) -> KeyRecord:
        record = await self.store.key(key_id)
        if record is None:
            raise NotFound(f"No key '{key_id}'.")
        return record

    async def revoke_key(self, key_id: str) -> KeyRecord:
        record = await self.key(key_id)
        if record.revoked_at is None:
            record = record.model_copy(update={"revoked_at": self._wall()})
            await self.store.put_key(record)
        self._auth.forget()
        return record

    async def rotate_key(self, key_id: str, *, grace: float = 0.0) -> tuple[str, KeyRecord]:
        """A new key for the same tenant; the old one stops working after ``grace`` seconds."""
        old = await self.key(key_id)
        if not old.usable(self._wall()):
            raise InvalidRequest(f"Key '{key_id}' is already expired or revoked.")
        # The new key lives as long as the old one would have: rotating is not extending.
        key, record = await self.create_key(old.tenant, name=old.name, expires_at=old.expires_at)
        if grace > 0:
            ends = self._wall() + grace
            expires = ends if old.expires_at is None else min(old.expires_at, ends)
            await self.store.put_key(old.model_copy(update={"expires_at": expires}))
        else:
            await self.store.put_key(old.model_copy(update={"revoked_at": self._wall()}))
        self._auth.forget()
        return key, record
