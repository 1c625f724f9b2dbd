"""Runs batches: claims one, checks it, runs its lines, writes its output files.

Every replica has one :class:`BatchRunner`. It claims batches from the store with a
lease (``batches.lease_seconds``) that it renews while it works; a replica that
dies (``kill -9``) stops renewing, and another replica (or the same one, restarted)
claims the batch once the lease lapses and resumes it: lines already marked done are
skipped. A batch moves ``validating`` → ``in_progress`` → ``finalizing`` →
``completed`` (or ``failed`` when its file is refused, ``expired`` past its window,
``cancelling`` → ``cancelled``).

Exactly once. A line's result is appended to the claim's own part file; every
``FLUSH_SECONDS`` the parts are flushed to disk (fsync) and only then are the lines
written since marked done in the store (write, then mark). A crash between the two
runs those lines again; the final files keep, for each line, one output whose kind
(output or error file) agrees with its mark, so each ``custom_id`` appears once.

Capacity. Lines run through the scheduler at ``batch`` priority, so an interactive
request waiting for a slot always goes first; and a batch never holds more than a
model's slots minus ``batches.interactive_reserve``, so an interactive request finds
a slot free at once instead of waiting for a long batch line to end (no preemption:
the reserve is what the batch gives up). Batches of one model share those slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from gateway.batch.files import FileStorage, PartWriter
from gateway.batch.lines import (
    check,
    decode,
    failure,
    output_line,
    run_line,
)
from gateway.batch.records import BatchError, BatchRecord, Claim, FileRecord, LineResult
from gateway.batch.store import BatchStore
from gateway.errors import Unauthorized
from gateway.metrics import Metrics
from gateway.service import InferenceService
from gateway.tenancy.records import Principal, Tenant
from gateway.tenancy.store import StoreUnavailable

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    lease_seconds: float = 30.0
    poll_seconds: float = 1.0
    max_active: int = 4  # batches one replica works on at once
    interactive_reserve: int = 2  # slots per model a batch leaves free


@dataclass(eq=False)
class _Work:
    """One claimed batch's state while a replica works on it."""

    claim: Claim
    record: BatchRecord
    stop: str | None = None  # "cancelled" or "expired" once the batch must end early
    lost: bool = False  # the lease was lost: another replica has it now
    written: list[LineResult] = field(default_factory=list)  # in the parts, not yet marked
    done: dict[int, bool] = field(default_factory=dict)


class BatchRunner:
    def __init__(
        self,
        store: BatchStore,
        files: FileStorage,
        service: InferenceService,
        *,
        tenant: Callable[[str], Awaitable[Tenant | None]],
        capacity: Callable[[str], int],
        metrics: Metrics,
        settings: RunnerSettings,
    ) -> None:
        self.store = store
        self.files = files
        self.service = service
        self._tenant = tenant
        self._capacity = capacity
        self.metrics = metrics
        self.settings = settings
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self._task: asyncio.Task[None] | None = None
        self._working: dict[str, asyncio.Task[None]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._wake = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="lockgate-batches")

    async def stop(self) -> None:
        """Stop working; claims are given back so that another replica resumes at once."""
        self._stopping = True  # the loop ends even if a cancel is lost
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._working:  # the loop is gone: no claim starts after this
            tasks = list(self._working.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                self._working = {b: t for b, t in self._working.items() if t is not task}

    def wake(self) -> None:
        """A batch was created or cancelled: look now rather than at the next poll."""
        self._wake.set()

    # -- claiming --------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._claim_more()
                await self._report()
            except StoreUnavailable:
                log.warning("batch store unreachable; batches wait")
            except Exception:
                log.exception("batch runner loop failed; retrying")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel that
            # stop() sends when the event is set at the same moment (CPython gh-86296).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()

    async def _claim_more(self) -> None:
        while not self._stopping and len(self._working) < self.settings.max_active:
            claim = await self.store.claim(
                self.owner, lease=self.settings.lease_seconds, now=time.time()
            )
            if claim is None:
                return
            task = asyncio.create_task(self._work(claim), name=f"batch-{claim.batch_id}")
            self._working[claim.batch_id] = task
            task.add_done_callback(partial(self._ended, claim.batch_id))

    def _ended(self, batch_id: str, _: asyncio.Task[None]) -> None:
        self._working.pop(batch_id, None)
        self._wake.set()  # room for another claim

    async def _report(self) -> None:
        by_status, oldest = await self.store.counts()
        self.metrics.batch_status(by_status)
        self.metrics.batch_oldest_pending.set(0 if oldest is None else time.time() - oldest)

    # -- one batch ---------------------------------------------------------------

    async def _work(self, claim: Claim) -> None:
        record = await self.store.batch(claim.batch_id)
        if record is None or not record.active:
            await self.store.release(claim)
            return
        work = _Work(claim, record)
        keeper = asyncio.create_task(self._keep(work))
        try:
            if record.status == "validating":
                await self._validate(work)
            if work.record.status == "cancelling":  # resumed: what is left is cancelled
                work.stop = "cancelled"
            if work.record.status in ("in_progress", "cancelling"):
                await self._execute(work)
            if work.record.active and not work.lost:
                await self._finalize(work)
        except asyncio.CancelledError:
            raise
        except FileNotFoundError:  # its input file was deleted: nothing left to run
            await self._input_gone(work)
        except Exception:
            log.exception(
                "batch %s failed on this replica; another claim resumes it", claim.batch_id
            )
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            if not work.lost:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release(claim))

    async def _input_gone(self, work: _Work) -> None:
        error = BatchError(code="input_file_deleted", message="The input file was deleted.")
        update = work.record.model_copy(
            update={"status": "failed", "failed_at": int(time.time()), "errors": [error]}
        )
        await self.store.transition(update, expect=("validating", "in_progress", "cancelling"))
        log.warning("batch %s failed: its input file was deleted", work.record.id)

    async def _keep(self, work: _Work) -> None:
        """Renew the lease; notice a cancel, the window's end, or a lost lease."""
        every = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(every)
            try:
                if not await self.store.renew(
                    work.claim, lease=self.settings.lease_seconds, now=time.time()
                ):
                    log.warning("batch %s: lease lost; stopping here", work.claim.batch_id)
                    work.lost = True
                    work.stop = work.stop or "lost"
                    return
                stored = await self.store.batch(work.claim.batch_id)
            except StoreUnavailable:
                continue
            if stored is not None and stored.status == "cancelling":
                work.record, work.stop = stored, "cancelled"
            if time.time() >= work.record.expires_at:
                work.stop = work.stop or "expired"

    async def _validate(self, work: _Work) -> None:
        record = work.record
        principal = await self._principal(record)
        served = set(self.service.registry.by_name())

        def allowed(model: str) -> bool:
            return principal is not None and principal.tenant.allows(model) and model in served

        checked = await check(
            self.files.lines(record.input_file_id), endpoint=record.endpoint, allowed=allowed
        )
        now = int(time.time())
        if principal is None:
            checked.errors.insert(
                0,
                BatchError(code="tenant_not_found", message="The batch's tenant no longer exists."),
            )
        fields: dict[str, object] = {"total": checked.lines, "model": checked.model}
        if checked.errors:
            fields |= {"status": "failed", "failed_at": now, "errors": checked.errors}
        else:
            fields |= {"status": "in_progress", "in_progress_at": now}
        update = record.model_copy(update=fields)
        if await self.store.transition(update, expect=("validating",)):
            work.record = update
        else:  # cancelled while it was checked
            work.record = await self.store.batch(record.id) or update

    async def _principal(self, record: BatchRecord) -> Principal | None:
        tenant = await self._tenant(record.tenant)
        return None if tenant is None else Principal(tenant=tenant, key_id=record.key_id)

    async def _execute(self, work: _Work) -> None:
        record, claim = work.record, work.claim
        work.done = await self.store.done_lines(record.id)
        principal = await self._principal(record)
        # No await from here to the try below: its finally closes what is opened here.
        out = self.files.open_part(record.id, claim.generation, "out")
        err = self.files.open_part(record.id, claim.generation, "err")
        slots = self._slots_for(record.model or "")
        # The window's end as a monotonic deadline: lines refused "for now" retry until then.
        deadline = time.monotonic() + max(0.0, record.expires_at - time.time())
        running: set[asyncio.Task[None]] = set()
        if time.time() >= record.expires_at:
            work.stop = work.stop or "expired"
        flusher = asyncio.create_task(self._flush_every(work, out, err))

        async def one(index: int, raw: bytes) -> None:
            try:
                await self._run_one(work, principal, index, raw, out, err, deadline)
            except Exception as exc:  # never a line left unwritten: it would block the end
                log.exception("batch %s line %d failed", record.id, index)
                outcome = failure(exc)
                err.write(output_line(record.id, index, None, outcome, None))
                work.written.append(LineResult(line=index, ok=False))
            finally:
                slots.release()

        try:
            async for index, raw in self.files.lines(record.input_file_id):
                if work.stop:
                    break
                if index in work.done:
                    continue
                await slots.acquire()
                if work.stop:
                    slots.release()
                    break
                task = asyncio.create_task(one(index, raw))
                running.add(task)
                task.add_done_callback(running.discard)
            while running and not work.stop:
                await asyncio.wait(set(running), timeout=1.0)
            await _cancel_all(running)
            if work.stop in ("cancelled", "expired"):
                await self._write_remaining(work, err)
        finally:
            try:
                await _cancel_all(running)  # also when the runner itself is stopped
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
                if not work.lost:
                    await self._flush(work, out, err)  # fsyncs what it marks
            finally:
                out.close()  # without an await, so that a second cancel cannot skip it
                err.close()

    async def _run_one(
        self,
        work: _Work,
        principal: Principal | None,
        index: int,
        raw: bytes,
        out: PartWriter,
        err: PartWriter,
        deadline: float,
    ) -> None:
        batch_id = work.record.id
        line = decode(raw)
        custom_id = line.get("custom_id") if line is not None else None
        if line is None:
            error = BatchError(code="invalid_json", message="The line is not a JSON object.")
            err.write(output_line(batch_id, index, None, None, error))
            work.written.append(LineResult(line=index, ok=False))
            self.metrics.batch_lines.labels("failed").inc()
            return
        if principal is None:
            outcome = failure(Unauthorized("The batch's tenant no longer exists."))
        else:
            outcome = await run_line(
                self.service, principal, work.record.endpoint, line, deadline=deadline
            )
        (out if outcome.ok else err).write(output_line(batch_id, index, custom_id, outcome, None))
        work.written.append(
            LineResult(
                line=index,
                ok=outcome.ok,
                input_tokens=outcome.input_tokens,
                output_tokens=outcome.output_tokens,
                cached_tokens=outcome.cached_tokens,
            )
        )
        self.metrics.batch_lines.labels("completed" if outcome.ok else "failed").inc()
        self.metrics.batch_tokens.inc(outcome.input_tokens + outcome.output_tokens)

    async def _write_remaining(self, work: _Work, err: PartWriter) -> None:
        """Every line not done yet becomes an error line (``batch_cancelled``, ``_expired``)."""
        code = "batch_expired" if work.stop == "expired" else "batch_cancelled"
        message = (
            "This request could not be run within the batch's completion window."
            if code == "batch_expired"
            else "The batch was cancelled before this request ran."
        )
        written = {r.line for r in work.written}
        async for index, raw in self.files.lines(work.record.input_file_id):
            if index in work.done or index in written:
                continue
            line = decode(raw)
            custom_id = line.get("custom_id") if line is not None else None
            error = BatchError(code=code, message=message)
            err.write(output_line(work.record.id, index, custom_id, None, error))
            work.written.append(LineResult(line=index, ok=False))

    async def _flush_every(self, work: _Work, out: PartWriter, err: PartWriter) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self._flush(work, out, err)

    async def _flush(self, work: _Work, out: PartWriter, err: PartWriter) -> None:
        """Write, then mark: the parts reach the disk before their lines count as done."""
        if not work.written:
            return
        results, work.written = work.written, []
        try:
            await out.sync()
            await err.sync()
            await self.store.record_lines(work.record.id, results)
        except StoreUnavailable:
            work.written[:0] = results  # marked at the next flush
            return
        except BaseException:  # cancelled mid-way: the final flush marks them
            work.written[:0] = results
            raise
        for r in results:
            work.done[r.line] = r.ok

    async def _finalize(self, work: _Work) -> None:
        record = work.record
        cancelled = work.stop == "cancelled" or record.status == "cancelling"
        expired = work.stop == "expired"
        if not cancelled and not expired:
            finalizing = record.model_copy(
                update={
                    "status": "finalizing",
                    "finalizing_at": record.finalizing_at or int(time.time()),
                }
            )
            if not await self.store.transition(finalizing, expect=("in_progress", "finalizing")):
                return  # cancelled meanwhile: the next claim finishes it as cancelled
            record = finalizing
        done = await self.store.done_lines(record.id)
        if cancelled:  # every line not run was written as cancelled, even unvalidated ones
            record = record.model_copy(update={"total": len(done)})
        elif len(done) < record.total:
            return  # lines still to run: a later claim runs them
        outputs: dict[str, str | None] = {}
        for kind, part, ok in (("output", "out", True), ("error", "err", False)):
            file_id = f"file-{record.id.removeprefix('batch_')}-{kind}"

            def keep(line_id: str, ok: bool = ok) -> bool:
                index = int(line_id.rsplit("_", 1)[1])
                return done.get(index) is ok

            size, lines = await self.files.merge(record.id, part, file_id, keep)
            if lines:
                await self.store.put_file(
                    FileRecord(
                        id=file_id,
                        tenant=record.tenant,
                        filename=f"{record.id}_{kind}.jsonl",
                        purpose="batch_output",
                        bytes=size,
                        lines=lines,
                        created_at=int(time.time()),
                    )
                )
            outputs[kind] = file_id if lines else None
        now = int(time.time())
        status = "cancelled" if cancelled else "expired" if expired else "completed"
        stamp = {"cancelled": "cancelled_at", "expired": "expired_at", "completed": "completed_at"}
        final = record.model_copy(
            update={
                "status": status,
                stamp[status]: now,
                "output_file_id": outputs["output"],
                "error_file_id": outputs["error"],
            }
        )
        if await self.store.transition(final, expect=("finalizing", "cancelling", "in_progress")):
            await self.files.remove_parts(record.id)
            log.info("batch %s %s: %d lines", record.id, status, len(done))

    def _slots_for(self, model: str) -> asyncio.Semaphore:
        slots = self._slots.get(model)
        if slots is None:
            n = max(1, self._capacity(model) - self.settings.interactive_reserve)
            slots = self._slots[model] = asyncio.Semaphore(n)
        return slots


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
