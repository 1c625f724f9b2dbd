"""The store contract, against SQLite and a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.tenancy.keys import key_hash, new_key
from gateway.tenancy.records import KeyRecord, Limits, Tenant
from gateway.tenancy.redis_link import RedisLink
from gateway.tenancy.redis_store import RedisStore
from gateway.tenancy.store import SQLiteStore, TenantStore, UsageKey, UsageTotals


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TenantStore]:
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "state" / "lockgate.db")
        await sqlite.open()
        yield sqlite
        await sqlite.close()
        return
    link = RedisLink(request.getfixturevalue("redis_url"), timeout=1.0)
    redis_store = RedisStore(link)
    await redis_store.open()
    yield redis_store
    await link.close()


def record(tenant: str, key: str, key_id: str = "k1") -> KeyRecord:
    return KeyRecord(id=key_id, tenant=tenant, hash=key_hash(key), created_at=1.0)


async def test_tenants_round_trip(store: TenantStore) -> None:
    a = Tenant(id="team-a", models=["m"], limits=Limits(requests_per_minute=5), weight=2)
    await store.put_tenant(a)
    await store.put_tenant(Tenant(id="team-b"))
    assert await store.tenant("team-a") == a
    assert await store.tenant("nobody") is None
    assert [t.id for t in await store.tenants()] == ["team-a", "team-b"]
    assert await store.count_tenants() == 2
    changed = a.model_copy(update={"priority": "batch"})
    await store.put_tenant(changed)
    assert await store.tenant("team-a") == changed


async def test_keys_are_found_by_hash_only(store: TenantStore) -> None:
    await store.put_tenant(Tenant(id="team-a"))
    key = new_key()
    await store.put_key(record("team-a", key))
    found = await store.lookup(key_hash(key))
    assert found is not None
    assert found[0].id == "k1"
    assert found[1].id == "team-a"
    assert await store.lookup(key_hash(new_key())) is None
    assert await store.key("k1") == record("team-a", key)
    assert [k.id for k in await store.keys("team-a")] == ["k1"]


async def test_replacing_a_key_record_revokes_or_rotates_it(store: TenantStore) -> None:
    await store.put_tenant(Tenant(id="team-a"))
    old, new = new_key(), new_key()
    await store.put_key(record("team-a", old))
    await store.put_key(record("team-a", old).model_copy(update={"revoked_at": 5.0}))
    found = await store.lookup(key_hash(old))
    assert found is not None
    assert found[0].revoked_at == 5.0
    await store.put_key(record("team-a", new))  # same id, new hash
    assert await store.lookup(key_hash(old)) is None
    assert await store.lookup(key_hash(new)) is not None


async def test_deleting_a_tenant_deletes_its_keys(store: TenantStore) -> None:
    await store.put_tenant(Tenant(id="team-a"))
    key = new_key()
    await store.put_key(record("team-a", key))
    assert await store.delete_tenant("team-a")
    assert not await store.delete_tenant("team-a")
    assert await store.lookup(key_hash(key)) is None
    assert await store.key("k1") is None
    assert await store.count_tenants() == 0


async def test_usage_adds_up_per_hour_and_filters(store: TenantStore) -> None:
    k1 = UsageKey(7200, "team-a", "k1", "m", "embedded", 200)
    k2 = UsageKey(10800, "team-b", "k2", "m", "embedded", 429)
    await store.add_usage({k1: UsageTotals(1, 10, 20, 0.5)})
    await store.add_usage({k1: UsageTotals(2, 1, 2, 0.25), k2: UsageTotals(1, 0, 0, 0.0)})
    rows = await store.usage(start_hour=0, end_hour=14400, tenant=None, model=None)
    assert rows[k1] == UsageTotals(3, 11, 22, 0.75)
    assert rows[k2] == UsageTotals(1, 0, 0, 0.0)
    only_a = await store.usage(start_hour=0, end_hour=14400, tenant="team-a", model=None)
    assert list(only_a) == [k1]
    assert await store.usage(start_hour=0, end_hour=7200, tenant=None, model=None) == {}
    assert await store.usage(start_hour=0, end_hour=14400, tenant=None, model="x") == {}
