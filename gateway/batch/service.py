"""The Files and Batch APIs without HTTP: what a tenant may do with its files and batches.

Everything is scoped to the caller's tenant: another tenant's file or batch is a 404,
never a 403, so ids do not leak. The work itself is the runner's
(:mod:`gateway.batch.runner`); this only records what was asked.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.batch.files import FileStorage, Upload
from gateway.batch.records import BatchRecord, FileRecord, Progress
from gateway.batch.store import BatchStore, IdempotencyMismatch
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.protocol.batches import CreateBatchRequest
from gateway.tenancy.records import Principal

WINDOW_SECONDS = {"24h": 24 * 3600}


def sortable_id(prefix: str) -> str:
    """Unique, and in creation order when sorted: pages are ranges of ids."""
    return f"{prefix}{time.time_ns():016x}{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, slots=True)
class FileLimits:
    max_bytes: int = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
    max_lines: int = 50_000


class BatchService:
    def __init__(
        self,
        store: BatchStore,
        files: FileStorage,
        *,
        limits: FileLimits,
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.files = files
        self.limits = limits
        self._wake = wake  # the runner looks at once

    # -- files ---------------------------------------------------------------------

    async def upload(
        self, principal: Principal, upload: Upload, *, filename: str, purpose: str
    ) -> FileRecord:
        if purpose != "batch":
            raise InvalidRequest("Only purpose 'batch' is supported for uploads.", param="purpose")
        file_id = sortable_id("file-")
        size, lines = await self.files.save(
            file_id, upload, max_bytes=self.limits.max_bytes, max_lines=self.limits.max_lines
        )
        record = FileRecord(
            id=file_id,
            tenant=principal.tenant.id,
            filename=Path(filename).name[:255] or "upload.jsonl",
            purpose="batch",
            bytes=size,
            lines=lines,
            created_at=int(time.time()),
        )
        try:
            await self.store.put_file(record)
        except BaseException:
            await self.files.delete(file_id)
            raise
        return record

    async def file(self, principal: Principal, file_id: str) -> FileRecord:
        record = await self.store.file(principal.tenant.id, file_id)
        if record is None:
            raise NotFound(f"No such file: '{file_id}'.", param="file_id")
        return record

    async def list_files(
        self, principal: Principal, *, purpose: str | None, after: str | None, limit: int
    ) -> tuple[list[FileRecord], bool]:
        found = await self.store.files(
            principal.tenant.id, purpose=purpose, after=after, limit=limit + 1
        )
        return found[:limit], len(found) > limit

    def content(self, record: FileRecord) -> Path:
        return self.files.path(record.id)

    async def delete_file(self, principal: Principal, file_id: str) -> None:
        await self.file(principal, file_id)
        await self.store.delete_file(principal.tenant.id, file_id)
        await self.files.delete(file_id)

    # -- batches -------------------------------------------------------------------

    async def create(
        self, principal: Principal, body: CreateBatchRequest, *, idempotency_key: str | None
    ) -> tuple[BatchRecord, Progress]:
        source = await self.store.file(principal.tenant.id, body.input_file_id)
        if source is None:
            raise NotFound(f"No such file: '{body.input_file_id}'.", param="input_file_id")
        if source.purpose != "batch":
            raise InvalidRequest("The input file's purpose must be 'batch'.", param="input_file_id")
        now = int(time.time())
        record = BatchRecord(
            id=sortable_id("batch_"),
            tenant=principal.tenant.id,
            key_id=principal.key_id,
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            status="validating",
            created_at=now,
            expires_at=now + WINDOW_SECONDS[body.completion_window],
            metadata=body.metadata,
            total=source.lines,
        )
        idempotency = None
        if idempotency_key is not None:
            digest = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
            idempotency = (idempotency_key[:255], digest)
        try:
            stored = await self.store.create_batch(record, idempotency)
        except IdempotencyMismatch:
            raise Conflict(
                "This Idempotency-Key was used for a batch with another body.",
                param="Idempotency-Key",
            ) from None
        self._wake()
        return stored, await self.store.progress(stored.id)

    async def batch(self, principal: Principal, batch_id: str) -> tuple[BatchRecord, Progress]:
        record = await self.store.batch(batch_id, principal.tenant.id)
        if record is None:
            raise NotFound(f"No such batch: '{batch_id}'.", param="batch_id")
        return record, await self.store.progress(batch_id)

    async def list_batches(
        self, principal: Principal, *, after: str | None, limit: int
    ) -> tuple[list[tuple[BatchRecord, Progress]], bool]:
        found = await self.store.batches(principal.tenant.id, after=after, limit=limit + 1)
        return [(b, await self.store.progress(b.id)) for b in found[:limit]], len(found) > limit

    async def cancel(self, principal: Principal, batch_id: str) -> tuple[BatchRecord, Progress]:
        """``cancelling`` at once; the runner writes what was not run and ends it."""
        for _ in range(3):  # the runner may change its status between the read and the write
            record, _progress = await self.batch(principal, batch_id)
            if record.status not in ("validating", "in_progress"):
                if record.status in ("cancelling", "cancelled"):
                    return record, _progress
                raise Conflict(
                    f"A batch that is {record.status} cannot be cancelled.", param="batch_id"
                )
            update = record.model_copy(
                update={"status": "cancelling", "cancelling_at": int(time.time())}
            )
            if await self.store.transition(update, expect=("validating", "in_progress")):
                self._wake()
                return update, await self.store.progress(batch_id)
        return await self.batch(principal, batch_id)
