"""Where files' metadata, batches, leases and finished lines are kept.

:class:`BatchStore` is the interface; :class:`SQLiteBatchStore` (the default, a file)
and :class:`~gateway.batch.redis_store.RedisBatchStore` (with ``redis_url``, shared by
every replica) implement it. Leases make one replica at a time the worker of a batch:
``claim`` takes a batch whose lease is free or lapsed (a replica killed with
``kill -9`` stops renewing), ``renew`` keeps it, and each claim has a new
``generation`` that names its output parts. ``record_lines`` is idempotent per line:
a line counts once however often it was written (``gateway/batch/runner.py``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from gateway.batch.records import ACTIVE, BatchRecord, Claim, FileRecord, LineResult, Progress
from gateway.tenancy.store import SQLiteFile

T = TypeVar("T")


class IdempotencyMismatch(Exception):
    """An ``Idempotency-Key`` already used for a batch with another body."""


class BatchStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def put_file(self, record: FileRecord) -> None: ...
    async def file(self, tenant: str, file_id: str) -> FileRecord | None: ...
    async def files(
        self, tenant: str, *, purpose: str | None, after: str | None, limit: int
    ) -> list[FileRecord]:
        """Newest first (ids sort by creation); ``after``: the last id of the page before."""

    async def delete_file(self, tenant: str, file_id: str) -> bool: ...

    async def create_batch(
        self, record: BatchRecord, idempotency: tuple[str, str] | None = None
    ) -> BatchRecord:
        """Store ``record``; with ``(key, body_hash)`` already used, the batch made then
        (or :class:`IdempotencyMismatch` when that body differed)."""

    async def batch(self, batch_id: str, tenant: str | None = None) -> BatchRecord | None:
        """The batch, if it exists (and belongs to ``tenant`` when given)."""

    async def batches(self, tenant: str, *, after: str | None, limit: int) -> list[BatchRecord]:
        """Newest first; ``after``: the id of the last one of the page before."""

    async def transition(self, record: BatchRecord, *, expect: Sequence[str]) -> bool:
        """Replace the stored batch with ``record`` if its stored status is in ``expect``."""

    async def claim(self, owner: str, *, lease: float, now: float) -> Claim | None:
        """Lease an active batch nobody holds (or whose holder's lease has lapsed)."""

    async def renew(self, claim: Claim, *, lease: float, now: float) -> bool:
        """Extend the lease; False if it was lost (another replica claimed the batch)."""

    async def release(self, claim: Claim) -> None: ...

    async def record_lines(self, batch_id: str, results: Sequence[LineResult]) -> None:
        """Mark lines done; a line marked before keeps its first result."""

    async def done_lines(self, batch_id: str) -> dict[int, bool]:
        """Each marked line, and whether it succeeded."""

    async def progress(self, batch_id: str) -> Progress: ...
    async def counts(self) -> tuple[dict[str, int], float | None]:
        """Batches by status, and the creation time of the oldest active one."""


_SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, purpose TEXT NOT NULL,
    created_at INTEGER NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files (tenant, id);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at INTEGER NOT NULL,
    status TEXT NOT NULL, body TEXT NOT NULL,
    lease_owner TEXT, lease_until REAL NOT NULL DEFAULT 0, generation INTEGER NOT NULL DEFAULT 0,
    idem_key TEXT, idem_hash TEXT, UNIQUE (tenant, idem_key)
);
CREATE INDEX IF NOT EXISTS batches_by_tenant ON batches (tenant, id);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, ok INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    PRIMARY KEY (batch_id, line)
);
"""
# The statuses of ACTIVE, spelled out in the statements below.
_ACTIVE_SQL = "('validating', 'in_progress', 'finalizing', 'cancelling')"
assert {s.strip(" '") for s in _ACTIVE_SQL.strip("()").split(",")} == ACTIVE


class SQLiteBatchStore(SQLiteFile):
    """Batches in a SQLite file. Replicas on one machine may share it (WAL; every claim
    is one statement)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, schema=_SCHEMA, thread="lockgate-batches")

    # -- files -------------------------------------------------------------------

    async def put_file(self, record: FileRecord) -> None:
        row = (
            record.id,
            record.tenant,
            record.purpose,
            record.created_at,
            record.model_dump_json(),
        )
        # Replaced when it exists: a batch's output file is written again by a resumed claim.
        await self._run(
            lambda db: db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", row)
        )

    async def file(self, tenant: str, file_id: str) -> FileRecord | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT body FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)
            ).fetchone()
        )
        return None if row is None else FileRecord.model_validate_json(row[0])

    async def files(
        self, tenant: str, *, purpose: str | None, after: str | None, limit: int
    ) -> list[FileRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT body FROM files WHERE tenant = ? AND (? IS NULL OR purpose = ?)"
                " AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
                (tenant, purpose, purpose, after, after, limit),
            ).fetchall()
        )
        return [FileRecord.model_validate_json(r[0]) for r in rows]

    async def delete_file(self, tenant: str, file_id: str) -> bool:
        cursor = await self._run(
            lambda db: db.execute(
                "DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)
            )
        )
        return cursor.rowcount > 0

    # -- batches -----------------------------------------------------------------

    async def create_batch(
        self, record: BatchRecord, idempotency: tuple[str, str] | None = None
    ) -> BatchRecord:
        key, digest = idempotency or (None, None)

        def create(db: sqlite3.Connection) -> tuple[str, str | None] | None:
            if key is not None:
                row = db.execute(
                    "SELECT body, idem_hash FROM batches WHERE tenant = ? AND idem_key = ?",
                    (record.tenant, key),
                ).fetchone()
                if row is not None:
                    return row[0], row[1]
            db.execute(
                "INSERT INTO batches (id, tenant, created_at, status, body, idem_key, idem_hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.tenant,
                    record.created_at,
                    record.status,
                    record.model_dump_json(),
                    key,
                    digest,
                ),
            )
            return None

        found = await self._run(create)
        if found is None:
            return record
        if found[1] != digest:
            raise IdempotencyMismatch
        return BatchRecord.model_validate_json(found[0])

    async def batch(self, batch_id: str, tenant: str | None = None) -> BatchRecord | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT body FROM batches WHERE id = ? AND (? IS NULL OR tenant = ?)",
                (batch_id, tenant, tenant),
            ).fetchone()
        )
        return None if row is None else BatchRecord.model_validate_json(row[0])

    async def batches(self, tenant: str, *, after: str | None, limit: int) -> list[BatchRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT body FROM batches WHERE tenant = ? AND (? IS NULL OR id < ?)"
                " ORDER BY id DESC LIMIT ?",
                (tenant, after, after, limit),
            ).fetchall()
        )
        return [BatchRecord.model_validate_json(r[0]) for r in rows]

    async def transition(self, record: BatchRecord, *, expect: Sequence[str]) -> bool:
        marks = ", ".join("?" * len(expect))
        cursor = await self._run(
            lambda db: db.execute(
                f"UPDATE batches SET status = ?, body = ? WHERE id = ? AND status IN ({marks})",  # noqa: S608
                (record.status, record.model_dump_json(), record.id, *expect),
            )
        )
        return cursor.rowcount > 0

    # -- leases ------------------------------------------------------------------

    async def claim(self, owner: str, *, lease: float, now: float) -> Claim | None:
        def take(db: sqlite3.Connection) -> tuple[str, int] | None:
            row = db.execute(
                "UPDATE batches SET lease_owner = ?, lease_until = ?, generation = generation + 1"
                " WHERE id = (SELECT id FROM batches WHERE status IN"
                " ('validating', 'in_progress', 'finalizing', 'cancelling')"
                " AND lease_until < ? ORDER BY created_at, id LIMIT 1)"
                " AND lease_until < ? RETURNING id, generation",
                (owner, now + lease, now, now),
            ).fetchone()
            return None if row is None else (row[0], row[1])

        taken = await self._run(take)
        if taken is None:
            return None
        return Claim(batch_id=taken[0], owner=owner, generation=taken[1])

    async def renew(self, claim: Claim, *, lease: float, now: float) -> bool:
        cursor = await self._run(
            lambda db: db.execute(
                "UPDATE batches SET lease_until = ? WHERE id = ? AND lease_owner = ?"
                " AND generation = ?",
                (now + lease, claim.batch_id, claim.owner, claim.generation),
            )
        )
        return cursor.rowcount > 0

    async def release(self, claim: Claim) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE batches SET lease_owner = NULL, lease_until = 0 WHERE id = ?"
                " AND lease_owner = ? AND generation = ?",
                (claim.batch_id, claim.owner, claim.generation),
            )
        )

    # -- lines -------------------------------------------------------------------

    async def record_lines(self, batch_id: str, results: Sequence[LineResult]) -> None:
        rows = [
            (batch_id, r.line, int(r.ok), r.input_tokens, r.output_tokens, r.cached_tokens)
            for r in results
        ]
        await self._run(
            lambda db: db.executemany(
                "INSERT INTO batch_lines VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows
            )
        )

    async def done_lines(self, batch_id: str) -> dict[int, bool]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT line, ok FROM batch_lines WHERE batch_id = ?", (batch_id,)
            ).fetchall()
        )
        return {r[0]: bool(r[1]) for r in rows}

    async def progress(self, batch_id: str) -> Progress:
        row = await self._run(
            lambda db: db.execute(
                "SELECT coalesce(sum(ok), 0), coalesce(sum(1 - ok), 0),"
                " coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),"
                " coalesce(sum(cached_tokens), 0) FROM batch_lines WHERE batch_id = ?",
                (batch_id,),
            ).fetchone()
        )
        completed, failed, inputs, outputs, cached = row
        return Progress(
            completed=completed,
            failed=failed,
            input_tokens=inputs,
            output_tokens=outputs,
            cached_tokens=cached,
        )

    async def counts(self) -> tuple[dict[str, int], float | None]:
        def query(db: sqlite3.Connection) -> tuple[list[tuple[str, int]], float | None]:
            by_status = db.execute(
                "SELECT status, count(*) FROM batches GROUP BY status"
            ).fetchall()
            oldest = db.execute(
                "SELECT min(created_at) FROM batches WHERE status IN"
                " ('validating', 'in_progress', 'finalizing', 'cancelling')"
            ).fetchone()
            return by_status, oldest[0]

        by_status, oldest = await self._run(query)
        return dict(by_status), oldest
