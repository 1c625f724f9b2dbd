"""The batch store in Redis (with ``redis_url``), shared by every replica.

Layout (under the prefix, default ``lg:``)::

    file:<id>              JSON of the FileRecord
    files:<tenant>         zset (score 0) of ids (they sort by creation), for pages
    batch:<id>             hash: body (JSON), status, owner, until, gen
    batches:<tenant>       zset (score 0) of ids
    batches:active         set of the ids of batches not ended yet
    batches:status         hash: status → count
    batch-idem:<tenant>:<key>   "<id> <body hash>" (Idempotency-Key)
    batch-lines:<id>       hash: line → "ok in out cached" (written once per line)
    batch-progress:<id>    hash: completed, failed, input, output, cached

Status changes, claims and line marks are Lua scripts, so each is atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from gateway.batch.records import ACTIVE, BatchRecord, Claim, FileRecord, LineResult, Progress
from gateway.batch.store import IdempotencyMismatch
from gateway.tenancy.redis_link import RedisLink
from gateway.tenancy.redis_store import store_call
from gateway.tenancy.store import StoreUnavailable

T = TypeVar("T")

# KEYS: batch, by status, active set; ARGV: new status, body, id, still active (0/1), expected...
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for i = 5, #ARGV do
  if ARGV[i] == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], 'body', ARGV[2])
    redis.call('HINCRBY', KEYS[2], status, -1)
    redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
    if ARGV[4] == '0' then redis.call('SREM', KEYS[3], ARGV[3]) end
    return 1
  end
end
return 0
"""

# KEYS: active set; ARGV: prefix, owner, now, until
_CLAIM = """
local ids = redis.call('SMEMBERS', KEYS[1])
table.sort(ids)
for _, id in ipairs(ids) do
  local key = ARGV[1] .. 'batch:' .. id
  local lease_end = tonumber(redis.call('HGET', key, 'until') or '0')
  if lease_end < tonumber(ARGV[3]) then
    local gen = redis.call('HINCRBY', key, 'gen', 1)
    redis.call('HSET', key, 'owner', ARGV[2], 'until', ARGV[4])
    return {id, gen}
  end
end
return nil
"""

# KEYS: batch; ARGV: owner, generation, until (empty: release)
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'owner', '', 'until', '0')
else
  redis.call('HSET', KEYS[1], 'until', ARGV[3])
end
return 1
"""

# KEYS: lines, progress; ARGV: line, ok, in, out, cached (repeated)
_RECORD = """
for i = 1, #ARGV, 5 do
  local value = ARGV[i + 1] .. ' ' .. ARGV[i + 2] .. ' ' .. ARGV[i + 3] .. ' ' .. ARGV[i + 4]
  if redis.call('HSETNX', KEYS[1], ARGV[i], value) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[i + 1] == '1' and 'completed' or 'failed', 1)
    redis.call('HINCRBY', KEYS[2], 'input', ARGV[i + 2])
    redis.call('HINCRBY', KEYS[2], 'output', ARGV[i + 3])
    redis.call('HINCRBY', KEYS[2], 'cached', ARGV[i + 4])
  end
end
return 1
"""


class RedisBatchStore:
    def __init__(self, link: RedisLink, *, prefix: str = "lg:") -> None:
        self._link = link
        self._p = prefix

    async def _call(self, work: Callable[[Any], Awaitable[T]]) -> T:
        return await store_call(self._link, work)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # -- files -------------------------------------------------------------------

    async def put_file(self, record: FileRecord) -> None:
        async def put(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.set(f"{self._p}file:{record.id}", record.model_dump_json())
            pipe.zadd(f"{self._p}files:{record.tenant}", {record.id: 0})
            await pipe.execute()

        await self._call(put)

    async def file(self, tenant: str, file_id: str) -> FileRecord | None:
        body = await self._call(lambda r: r.get(f"{self._p}file:{file_id}"))
        if body is None:
            return None
        record = FileRecord.model_validate_json(body)
        return record if record.tenant == tenant else None

    async def files(
        self, tenant: str, *, purpose: str | None, after: str | None, limit: int
    ) -> list[FileRecord]:
        start = self._start(after)
        found: list[FileRecord] = []
        key = f"{self._p}files:{tenant}"
        while len(found) < limit:
            members = await self._call(partial(_page, key, start, limit))
            if not members:
                break
            names = [f"{self._p}file:{m.decode()}" for m in members]
            bodies = await self._call(partial(_mget, names))
            for body in bodies:
                if body is not None:
                    record = FileRecord.model_validate_json(body)
                    if purpose is None or record.purpose == purpose:
                        found.append(record)
            start = "(" + members[-1].decode()
        return found[:limit]

    @staticmethod
    def _start(after: str | None) -> str:
        """The lex bound a newest-first page starts below."""
        return "+" if after is None else "(" + after

    async def delete_file(self, tenant: str, file_id: str) -> bool:
        record = await self.file(tenant, file_id)
        if record is None:
            return False

        async def delete(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.delete(f"{self._p}file:{file_id}")
            pipe.zrem(f"{self._p}files:{tenant}", file_id)
            await pipe.execute()

        await self._call(delete)
        return True

    # -- batches -----------------------------------------------------------------

    async def create_batch(
        self, record: BatchRecord, idempotency: tuple[str, str] | None = None
    ) -> BatchRecord:
        if idempotency is not None:
            key, digest = idempotency
            idem = f"{self._p}batch-idem:{record.tenant}:{key}"
            # Kept as long as the batch's window and a day: OpenAI's keys are not forever either.
            won = await self._call(
                lambda r: r.set(idem, f"{record.id} {digest}", nx=True, ex=2 * 86400)
            )
            if not won:
                held = await self._call(lambda r: r.get(idem))
                held_id, held_digest = held.decode().split(" ", 1)
                if held_digest != digest:
                    raise IdempotencyMismatch
                for _ in range(50):  # the winner may still be writing its batch
                    found = await self.batch(held_id, record.tenant)
                    if found is not None:
                        return found
                    await asyncio.sleep(0.02)
                raise StoreUnavailable("the batch for this Idempotency-Key is not readable")

        async def create(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.hset(
                f"{self._p}batch:{record.id}",
                mapping={
                    "body": record.model_dump_json(),
                    "status": record.status,
                    "owner": "",
                    "until": "0",
                    "gen": "0",
                },
            )
            pipe.zadd(f"{self._p}batches:{record.tenant}", {record.id: 0})
            pipe.sadd(f"{self._p}batches:active", record.id)
            pipe.hincrby(f"{self._p}batches:status", record.status, 1)
            await pipe.execute()

        try:
            await self._call(create)
        except BaseException:
            if idempotency is not None:  # the key must not name a batch that does not exist
                with contextlib.suppress(StoreUnavailable):
                    await self._call(lambda r: r.delete(idem))
            raise
        return record

    async def batch(self, batch_id: str, tenant: str | None = None) -> BatchRecord | None:
        body = await self._call(lambda r: r.hget(f"{self._p}batch:{batch_id}", "body"))
        if body is None:
            return None
        record = BatchRecord.model_validate_json(body)
        return record if tenant is None or record.tenant == tenant else None

    async def batches(self, tenant: str, *, after: str | None, limit: int) -> list[BatchRecord]:
        start = self._start(after)
        members = await self._call(partial(_page, f"{self._p}batches:{tenant}", start, limit))
        ids = [m.decode() for m in members]
        found = [await self.batch(i, tenant) for i in ids]
        return [b for b in found if b is not None]

    async def transition(self, record: BatchRecord, *, expect: Sequence[str]) -> bool:
        key = f"{self._p}batch:{record.id}"
        status_key = f"{self._p}batches:status"
        active = f"{self._p}batches:active"

        still = "1" if record.status in ACTIVE else "0"

        async def move(r: Any) -> int:
            body = record.model_dump_json()
            keys = (key, status_key, active)
            return int(
                await r.eval(_TRANSITION, 3, *keys, record.status, body, record.id, still, *expect)
            )

        return bool(await self._call(move))

    # -- leases ------------------------------------------------------------------

    async def claim(self, owner: str, *, lease: float, now: float) -> Claim | None:
        found = await self._call(
            lambda r: r.eval(
                _CLAIM, 1, f"{self._p}batches:active", self._p, owner, repr(now), repr(now + lease)
            )
        )
        if not found:
            return None
        return Claim(batch_id=found[0].decode(), owner=owner, generation=int(found[1]))

    async def renew(self, claim: Claim, *, lease: float, now: float) -> bool:
        return await self._renew(claim, repr(now + lease))

    async def release(self, claim: Claim) -> None:
        await self._renew(claim, "")

    async def _renew(self, claim: Claim, until: str) -> bool:
        key = f"{self._p}batch:{claim.batch_id}"
        done = await self._call(
            lambda r: r.eval(_RENEW, 1, key, claim.owner, str(claim.generation), until)
        )
        return bool(done)

    # -- lines -------------------------------------------------------------------

    async def record_lines(self, batch_id: str, results: Sequence[LineResult]) -> None:
        args: list[str | int] = []
        for x in results:
            args += [x.line, int(x.ok), x.input_tokens, x.output_tokens, x.cached_tokens]
        if not args:
            return
        keys = (f"{self._p}batch-lines:{batch_id}", f"{self._p}batch-progress:{batch_id}")
        await self._call(lambda r: r.eval(_RECORD, 2, *keys, *args))

    async def done_lines(self, batch_id: str) -> dict[int, bool]:
        found = await self._call(lambda r: r.hgetall(f"{self._p}batch-lines:{batch_id}"))
        return {int(k): v.startswith(b"1") for k, v in found.items()}

    async def progress(self, batch_id: str) -> Progress:
        found = await self._call(lambda r: r.hgetall(f"{self._p}batch-progress:{batch_id}"))
        get = {k.decode(): int(v) for k, v in found.items()}
        return Progress(
            completed=get.get("completed", 0),
            failed=get.get("failed", 0),
            input_tokens=get.get("input", 0),
            output_tokens=get.get("output", 0),
            cached_tokens=get.get("cached", 0),
        )

    async def counts(self) -> tuple[dict[str, int], float | None]:
        by_status = await self._call(lambda r: r.hgetall(f"{self._p}batches:status"))
        ids = await self._call(lambda r: r.smembers(f"{self._p}batches:active"))
        oldest: float | None = None
        for i in ids:
            record = await self.batch(i.decode())
            if record is not None and (oldest is None or record.created_at < oldest):
                oldest = record.created_at
        return {k.decode(): int(v) for k, v in by_status.items()}, oldest


async def _page(key: str, start: str, limit: int, r: Any) -> list[bytes]:
    """Up to ``limit`` members of a lex-ordered zset, newest first, below ``start``."""
    found: list[bytes] = await r.zrevrangebylex(key, start, "-", start=0, num=limit)
    return found


async def _mget(names: list[str], r: Any) -> list[bytes | None]:
    found: list[bytes | None] = await r.mget(names)
    return found
