from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import StateUnavailable, Unauthorized
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.keys import key_hash, new_key
from gateway.tenancy.records import ANONYMOUS, KeyRecord, Tenant
from gateway.tenancy.store import SQLiteStore, StoreUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Flaky(SQLiteStore):
    """A real SQLite store that can be told to act unreachable (as Redis would)."""

    down = False
    lookups = 0

    async def lookup(self, key_hash: str) -> tuple[KeyRecord, Tenant] | None:
        self.lookups += 1
        if self.down:
            raise StoreUnavailable("down")
        return await super().lookup(key_hash)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Flaky]:
    s = Flaky(tmp_path / "db.sqlite")
    await s.open()
    await s.put_tenant(Tenant(id="team-a"))
    yield s
    await s.close()


async def add_key(store: Flaky, **fields: float) -> str:
    key = new_key()
    await store.put_key(KeyRecord(id="k1", tenant="team-a", hash=key_hash(key), **fields))
    return key


async def test_a_valid_key_names_its_tenant(store: Flaky) -> None:
    key = await add_key(store)
    principal = await Authenticator(store, enabled=True).authenticate(f"Bearer {key}")
    assert principal.tenant.id == "team-a"
    assert principal.key_id == "k1"


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Basic abc", f"Bearer {new_key()}", "Bearer lg-' OR 1=1 --"],
)
async def test_missing_unknown_or_malformed_keys_are_401(store: Flaky, header: str | None) -> None:
    with pytest.raises(Unauthorized):
        await Authenticator(store, enabled=True).authenticate(header)


async def test_malformed_keys_never_reach_the_store(store: Flaky) -> None:
    auth = Authenticator(store, enabled=True)
    for header in ("Bearer lg-x", "Bearer " + "a" * 65536, "Bearer lg-\x00"):
        with pytest.raises(Unauthorized):
            await auth.authenticate(header)
    assert store.lookups == 0


async def test_expired_and_revoked_keys_are_401(store: Flaky) -> None:
    wall = Clock()
    auth = Authenticator(store, enabled=True, wall=wall, ttl=0)
    key = await add_key(store, expires_at=wall.now + 10)
    await auth.authenticate(f"Bearer {key}")
    wall.now += 11
    with pytest.raises(Unauthorized, match="expired or been revoked"):
        await auth.authenticate(f"Bearer {key}")
    key = await add_key(store, revoked_at=wall.now)
    with pytest.raises(Unauthorized):
        await auth.authenticate(f"Bearer {key}")


async def test_answers_are_cached_for_the_ttl(store: Flaky) -> None:
    clock = Clock()
    auth = Authenticator(store, enabled=True, ttl=2.0, clock=clock)
    key = await add_key(store)
    for _ in range(5):
        await auth.authenticate(f"Bearer {key}")
    assert store.lookups == 1
    await store.delete_tenant("team-a")  # elsewhere: this replica still trusts its cache...
    await auth.authenticate(f"Bearer {key}")
    clock.now += 2.1  # ...until the TTL runs out
    with pytest.raises(Unauthorized):
        await auth.authenticate(f"Bearer {key}")


async def test_store_outage_keeps_recent_keys_and_fails_closed_for_others(store: Flaky) -> None:
    clock = Clock()
    auth = Authenticator(store, enabled=True, ttl=1.0, outage_grace=30.0, clock=clock)
    known = await add_key(store)
    await auth.authenticate(f"Bearer {known}")
    store.down = True
    clock.now += 5  # past the TTL: the store is asked, fails, the cached answer stands
    assert (await auth.authenticate(f"Bearer {known}")).tenant.id == "team-a"
    with pytest.raises(StateUnavailable):  # 503, never 401 and never a pass
        await auth.authenticate(f"Bearer {new_key()}")
    clock.now += 30  # past the grace: fail closed
    with pytest.raises(StateUnavailable):
        await auth.authenticate(f"Bearer {known}")
    store.down = False
    assert (await auth.authenticate(f"Bearer {known}")).tenant.id == "team-a"


async def test_disabled_auth_is_anonymous(store: Flaky) -> None:
    assert await Authenticator(store, enabled=False).authenticate(None) is ANONYMOUS
