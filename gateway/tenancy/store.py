"""Durable tenancy state: tenants, keys and the hourly usage ledger.

:class:`TenantStore` is the interface; :class:`SQLiteStore` (the default, a file,
no service) and ``RedisStore`` (shared by every replica) implement it. Reads on
the request path go through :class:`~gateway.tenancy.auth.Authenticator`'s
cache, so a store is asked about a key only on a cache miss.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from gateway.tenancy.records import KeyRecord, Tenant

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store cannot be reached (Redis down); the caller picks the policy."""


@dataclass(frozen=True, slots=True)
class UsageKey:
    hour: int  # Unix time of the hour's start
    tenant: str
    key_id: str
    model: str
    backend: str
    status: int


@dataclass(slots=True)
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0

    def add(self, other: UsageTotals) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.engine_seconds += other.engine_seconds


UsageRows = dict[UsageKey, UsageTotals]
_UsageRow = tuple[int, str, str, str, str, int, int, int, int, float]


class TenantStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def lookup(self, key_hash: str) -> tuple[KeyRecord, Tenant] | None:
        """The key with this hash and its tenant, or None."""

    async def tenants(self) -> list[Tenant]: ...
    async def tenant(self, tenant_id: str) -> Tenant | None: ...
    async def count_tenants(self) -> int: ...

    async def put_tenant(self, tenant: Tenant) -> None:
        """Create or replace."""

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete the tenant and its keys; False if it did not exist."""

    async def put_key(self, key: KeyRecord) -> None:
        """Create or replace (revocation and expiry are replacements)."""

    async def key(self, key_id: str) -> KeyRecord | None: ...
    async def keys(self, tenant_id: str) -> list[KeyRecord]: ...

    async def add_usage(self, rows: UsageRows) -> None:
        """Add these totals to the stored ones."""

    async def usage(
        self, *, start_hour: int, end_hour: int, tenant: str | None, model: str | None
    ) -> UsageRows:
        """Stored totals for hours in ``[start_hour, end_hour)``."""


_SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS tenants (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL, tenant TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL,
    backend TEXT NOT NULL, status INTEGER NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, engine_seconds REAL NOT NULL,
    PRIMARY KEY (hour, tenant, key_id, model, backend, status)
);
"""


class SQLiteFile:
    """A SQLite file used from one worker thread, so the event loop never blocks on it;
    every :meth:`_run` is one transaction. The stores below build on it."""

    def __init__(self, path: Path, *, schema: str, thread: str) -> None:
        self.path = path
        self._schema = schema
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread)
        self._db: sqlite3.Connection | None = None

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None, f"{type(self).__name__}.open() was not awaited"
            with self._db:  # one transaction per call
                return work(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A busy timeout: replicas on one machine may share a file.
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            self._db.executescript(self._schema)

        await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def close(self) -> None:
        def disconnect() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, disconnect)
        self._pool.shutdown(wait=True)


class SQLiteStore(SQLiteFile):
    """Tenants, keys and usage in a SQLite file. Every statement is parameterised; key
    lookups are by the indexed hash."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, schema=_SCHEMA, thread="lockgate-sqlite")

    async def lookup(self, key_hash: str) -> tuple[KeyRecord, Tenant] | None:
        def query(db: sqlite3.Connection) -> tuple[str, str] | None:
            row = db.execute(
                "SELECT keys.body, tenants.body FROM keys JOIN tenants ON tenants.id = keys.tenant"
                " WHERE keys.hash = ?",
                (key_hash,),
            ).fetchone()
            return None if row is None else (row[0], row[1])

        found = await self._run(query)
        if found is None:
            return None
        return KeyRecord.model_validate_json(found[0]), Tenant.model_validate_json(found[1])

    async def tenants(self) -> list[Tenant]:
        rows = await self._run(
            lambda db: db.execute("SELECT body FROM tenants ORDER BY id").fetchall()
        )
        return [Tenant.model_validate_json(r[0]) for r in rows]

    async def tenant(self, tenant_id: str) -> Tenant | None:
        row = await self._run(
            lambda db: db.execute("SELECT body FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        )
        return None if row is None else Tenant.model_validate_json(row[0])

    async def count_tenants(self) -> int:
        row = await self._run(lambda db: db.execute("SELECT count(*) FROM tenants").fetchone())
        return int(row[0])

    async def put_tenant(self, tenant: Tenant) -> None:
        body = tenant.model_dump_json()
        await self._run(
            lambda db: db.execute(
                "INSERT INTO tenants (id, body) VALUES (?, ?)"
                " ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                (tenant.id, body),
            )
        )

    async def delete_tenant(self, tenant_id: str) -> bool:
        cursor = await self._run(
            lambda db: db.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,))
        )
        return cursor.rowcount > 0

    async def put_key(self, key: KeyRecord) -> None:
        body = key.model_dump_json()
        await self._run(
            lambda db: db.execute(
                "INSERT INTO keys (id, hash, tenant, body) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, body = excluded.body",
                (key.id, key.hash, key.tenant, body),
            )
        )

    async def key(self, key_id: str) -> KeyRecord | None:
        row = await self._run(
            lambda db: db.execute("SELECT body FROM keys WHERE id = ?", (key_id,)).fetchone()
        )
        return None if row is None else KeyRecord.model_validate_json(row[0])

    async def keys(self, tenant_id: str) -> list[KeyRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT body FROM keys WHERE tenant = ? ORDER BY id", (tenant_id,)
            ).fetchall()
        )
        return [KeyRecord.model_validate_json(r[0]) for r in rows]

    async def add_usage(self, rows: UsageRows) -> None:
        values = [
            (
                k.hour, k.tenant, k.key_id, k.model, k.backend, k.status,
                t.requests, t.prompt_tokens, t.completion_tokens, t.engine_seconds,
            )
            for k, t in rows.items()
        ]  # fmt: skip
        await self._run(
            lambda db: db.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (hour, tenant, key_id, model, backend, status) DO UPDATE SET"
                " requests = requests + excluded.requests,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens,"
                " engine_seconds = engine_seconds + excluded.engine_seconds",
                values,
            )
        )

    async def usage(
        self, *, start_hour: int, end_hour: int, tenant: str | None, model: str | None
    ) -> UsageRows:
        def query(db: sqlite3.Connection) -> list[_UsageRow]:
            return db.execute(
                "SELECT * FROM usage WHERE hour >= ? AND hour < ?"
                " AND (? IS NULL OR tenant = ?) AND (? IS NULL OR model = ?)"
                " ORDER BY hour, tenant, model",
                (start_hour, end_hour, tenant, tenant, model, model),
            ).fetchall()

        return {
            UsageKey(h, t, k, m, b, s): UsageTotals(r, p, c, e)
            for h, t, k, m, b, s, r, p, c, e in await self._run(query)
        }
