"""The tenancy store in Redis, so that every replica sees the same tenants and keys.

Layout (all under one prefix, default ``lg:``)::

    tenant:<id>        JSON of the Tenant          tenants      set of tenant ids
    key:<sha256 hex>   JSON of the KeyRecord       keyid:<id>   the key's hash
    tenant-keys:<id>   set of the tenant's key ids
    usage:<hour>       hash: "<tenant> <key> <model> <backend> <status> <field>" → total

A key lookup is one round trip (a script reads the key and its tenant together).
Values are JSON validated on the way in and out; nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway.tenancy.records import KeyRecord, Tenant
from gateway.tenancy.redis_link import RedisDown, RedisLink
from gateway.tenancy.resp import Script
from gateway.tenancy.store import StoreUnavailable, UsageKey, UsageRows, UsageTotals

T = TypeVar("T")

_LOOKUP = """
local key = redis.call('GET', KEYS[1])
if not key then return nil end
local tenant = cjson.decode(key)['tenant']
return {key, redis.call('GET', ARGV[1] .. 'tenant:' .. tenant)}
"""

_COUNTS = ("requests", "prompt_tokens", "completion_tokens")
_SEP = "\x1f"  # ids are [A-Za-z0-9_.-]; model and backend names cannot hold a unit separator


class RedisStore:
    def __init__(self, link: RedisLink, *, prefix: str = "lg:") -> None:
        self._link = link
        self._p = prefix
        self._lookup = Script(_LOOKUP)

    async def _call(self, work: Callable[[Any], Awaitable[T]]) -> T:
        return await store_call(self._link, work)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _hash_key(self, key_hash: str) -> str:
        return f"{self._p}key:{key_hash.removeprefix('sha256:')}"

    async def lookup(self, key_hash: str) -> tuple[KeyRecord, Tenant] | None:
        try:
            found = await self._link.evalsha(self._lookup, [self._hash_key(key_hash)], [self._p])
        except RedisDown:
            raise StoreUnavailable("redis is unreachable") from None
        if not found or found[1] is None:
            return None
        return KeyRecord.model_validate_json(found[0]), Tenant.model_validate_json(found[1])

    async def tenants(self) -> list[Tenant]:
        async def read(r: Any) -> list[bytes | None]:
            ids = sorted(await r.smembers(f"{self._p}tenants"))
            return await r.mget([f"{self._p}tenant:{i.decode()}" for i in ids]) if ids else []

        return [Tenant.model_validate_json(b) for b in await self._call(read) if b]

    async def tenant(self, tenant_id: str) -> Tenant | None:
        body = await self._call(lambda r: r.get(f"{self._p}tenant:{tenant_id}"))
        return None if body is None else Tenant.model_validate_json(body)

    async def count_tenants(self) -> int:
        return int(await self._call(lambda r: r.scard(f"{self._p}tenants")))

    async def put_tenant(self, tenant: Tenant) -> None:
        async def write(r: Any) -> None:
            async with r.pipeline(transaction=True) as pipe:
                pipe.set(f"{self._p}tenant:{tenant.id}", tenant.model_dump_json())
                pipe.sadd(f"{self._p}tenants", tenant.id)
                await pipe.execute()

        await self._call(write)

    async def delete_tenant(self, tenant_id: str) -> bool:
        key_ids = [k.id for k in await self.keys(tenant_id)]
        hashes = await self._call(
            lambda r: r.mget([f"{self._p}keyid:{k}" for k in key_ids]) if key_ids else _none()
        )

        async def delete(r: Any) -> int:
            async with r.pipeline(transaction=True) as pipe:
                for key_id, digest in zip(key_ids, hashes or [], strict=False):
                    pipe.delete(f"{self._p}keyid:{key_id}")
                    if digest:
                        pipe.delete(self._hash_key(digest.decode()))
                pipe.delete(f"{self._p}tenant-keys:{tenant_id}")
                pipe.srem(f"{self._p}tenants", tenant_id)
                pipe.delete(f"{self._p}tenant:{tenant_id}")
                result = await pipe.execute()
            return int(result[-1])

        return await self._call(delete) > 0

    async def put_key(self, key: KeyRecord) -> None:
        async def write(r: Any) -> None:
            old = await r.get(f"{self._p}keyid:{key.id}")
            async with r.pipeline(transaction=True) as pipe:
                if old is not None and old.decode() != key.hash:
                    pipe.delete(self._hash_key(old.decode()))
                pipe.set(self._hash_key(key.hash), key.model_dump_json())
                pipe.set(f"{self._p}keyid:{key.id}", key.hash)
                pipe.sadd(f"{self._p}tenant-keys:{key.tenant}", key.id)
                await pipe.execute()

        await self._call(write)

    async def key(self, key_id: str) -> KeyRecord | None:
        async def read(r: Any) -> bytes | None:
            digest = await r.get(f"{self._p}keyid:{key_id}")
            return None if digest is None else await r.get(self._hash_key(digest.decode()))

        body = await self._call(read)
        return None if body is None else KeyRecord.model_validate_json(body)

    async def keys(self, tenant_id: str) -> list[KeyRecord]:
        async def read(r: Any) -> list[bytes | None]:
            ids = sorted(await r.smembers(f"{self._p}tenant-keys:{tenant_id}"))
            if not ids:
                return []
            hashes = await r.mget([f"{self._p}keyid:{i.decode()}" for i in ids])
            found = [h.decode() for h in hashes if h]
            return await r.mget([self._hash_key(h) for h in found]) if found else []

        return [KeyRecord.model_validate_json(b) for b in await self._call(read) if b]

    async def add_usage(self, rows: UsageRows) -> None:
        async def write(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                for k, t in rows.items():
                    field = _SEP.join((k.tenant, k.key_id, k.model, k.backend, str(k.status)))
                    values = (t.requests, t.prompt_tokens, t.completion_tokens)
                    name = f"{self._p}usage:{k.hour}"
                    for f, v in zip(_COUNTS, values, strict=True):
                        pipe.hincrby(name, f"{field}{_SEP}{f}", v)
                    pipe.hincrby(name, f"{field}{_SEP}engine_ms", round(t.engine_seconds * 1000))
                await pipe.execute()

        await self._call(write)

    async def usage(
        self, *, start_hour: int, end_hour: int, tenant: str | None, model: str | None
    ) -> UsageRows:
        hours = list(range(start_hour, end_hour, 3600))

        async def read(r: Any) -> list[dict[bytes, bytes]]:
            async with r.pipeline(transaction=False) as pipe:
                for h in hours:
                    pipe.hgetall(f"{self._p}usage:{h}")
                return list(await pipe.execute())

        rows: UsageRows = {}
        for hour, fields in zip(hours, await self._call(read), strict=True):
            for name, value in fields.items():
                t, k, m, b, s, f = name.decode().split(_SEP)
                if (tenant is not None and t != tenant) or (model is not None and m != model):
                    continue
                totals = rows.setdefault(UsageKey(hour, t, k, m, b, int(s)), UsageTotals())
                if f == "engine_ms":
                    totals.engine_seconds = int(value) / 1000
                else:
                    setattr(totals, f, int(value))
        return rows


async def _none() -> None:
    return None


async def store_call(link: RedisLink, work: Callable[[Any], Awaitable[T]]) -> T:
    """An admin-side call; Redis unreachable is :class:`StoreUnavailable` (the stores' error)."""
    try:
        return await link.call(work)
    except RedisDown:
        raise StoreUnavailable("redis is unreachable") from None
