"""The counters of :mod:`gateway.tenancy.counters`, shared by every replica through Redis.

Each admission is one ``EVALSHA`` that tests every check and charges them only
if all pass; each release is one more. Times come from Redis's own clock
(``TIME``), so replicas with skewed clocks still agree on rate windows.

Concurrency slots are members of a sorted set scored by a lease deadline: a
replica that dies without releasing (``kill -9``) loses its slots when the lease
runs out. The live replica renews the leases of the requests it still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from gateway.tenancy.counters import Check, Verdict
from gateway.tenancy.redis_link import RedisDown, RedisLink
from gateway.tenancy.resp import Script

_PREAMBLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[1])
local member = ARGV[2]
"""

# ARGV: lease, member, then for each KEYS[i]: kind, limit, cost, per_second, window_end.
# Returns {ok, failed index (1-based, 0 if none), retry_after, remaining..., reset...}.
_ACQUIRE = (
    _PREAMBLE
    + """
local n = #KEYS
local used = {}
local failed, retry = 0, 0
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local kind, limit = ARGV[b + 1], tonumber(ARGV[b + 2])
  local cost, rate, wend = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  local key = KEYS[i]
  if kind == 'rate' then
    local s = redis.call('HMGET', key, 'l', 't')
    local level = tonumber(s[1]) or 0
    local at = tonumber(s[2]) or now
    used[i] = math.max(0, level - math.max(0, now - at) * rate)
    if failed == 0 and used[i] + cost > limit then
      failed, retry = i, (used[i] + cost - limit) / rate
    end
  elseif kind == 'slots' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    used[i] = redis.call('ZCARD', key)
    if failed == 0 and used[i] + 1 > limit then failed, retry = i, 1 end
  else
    used[i] = tonumber(redis.call('GET', key)) or 0
    if failed == 0 and used[i] + cost > limit then failed, retry = i, wend - now end
  end
end
local out = {failed == 0 and 1 or 0, failed, tostring(retry)}
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local kind, limit = ARGV[b + 1], tonumber(ARGV[b + 2])
  local cost, rate, wend = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  local key, after = KEYS[i], used[i]
  if failed == 0 then
    if kind == 'rate' then
      after = used[i] + cost
      redis.call('HSET', key, 'l', tostring(after), 't', tostring(now))
      redis.call('PEXPIRE', key, math.ceil(math.max(after, limit) / rate * 1000) + 1000)
    elseif kind == 'slots' then
      after = used[i] + 1
      redis.call('ZADD', key, now + lease, member)
      redis.call('PEXPIRE', key, math.ceil(lease * 1000) + 1000)
    else
      after = redis.call('INCRBY', key, cost)
      redis.call('EXPIREAT', key, math.ceil(wend) + 3600)
    end
  end
  out[3 + i] = tostring(limit - after)
  local reset = 0
  if kind == 'rate' then reset = after / rate elseif kind == 'budget' then reset = wend - now end
  out[3 + n + i] = tostring(reset)
end
return out
"""
)

# ARGV: lease, member, then for each KEYS[i]: kind, refund, per_second, limit.
# A bucket lives until it has drained (an overrun can leave it above its limit).
_RELEASE = (
    _PREAMBLE
    + """
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local kind, refund, rate = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local limit = tonumber(ARGV[b + 4])
  local key = KEYS[i]
  if kind == 'slots' then
    redis.call('ZREM', key, member)
  elseif kind == 'rate' and refund ~= 0 then
    local s = redis.call('HMGET', key, 'l', 't')
    local level = tonumber(s[1]) or 0
    local at = tonumber(s[2]) or now
    level = math.max(0, math.max(0, level - math.max(0, now - at) * rate) - refund)
    redis.call('HSET', key, 'l', tostring(level), 't', tostring(now))
    redis.call('PEXPIRE', key, math.ceil(math.max(level, limit) / rate * 1000) + 1000)
  elseif kind == 'budget' and refund ~= 0 and redis.call('EXISTS', key) == 1 then
    if redis.call('DECRBY', key, refund) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
  end
end
return 1
"""
)

# KEYS: slot sets; ARGV: lease, then one member per key.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], math.ceil(lease * 1000) + 1000)
end
return 1
"""


class RedisCounters:
    """Counters in Redis under ``prefix``; slot leases last ``lease`` seconds unless renewed."""

    def __init__(self, link: RedisLink, *, prefix: str = "lg:", lease: float = 60.0) -> None:
        self._link = link
        self._prefix = prefix
        self._lease = lease
        self._acquire = Script(_ACQUIRE)
        self._release = Script(_RELEASE)
        self._renew = Script(_RENEW)
        link.fast.preload(self._release)  # sent without a reply: it must be loaded already
        self._held: dict[str, list[str]] = {}  # member → its slot keys, renewed while held
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self, checks: Sequence[Check], member: str) -> Verdict:
        keys = [self._prefix + c.key for c in checks]
        args: list[str | int | float] = [self._lease, member]
        for c in checks:
            args += [c.kind, c.limit, c.cost, c.per_second or 1.0, c.window_end]
        raw = await self._link.evalsha(self._acquire, keys, args)
        n = len(checks)
        verdict = Verdict(
            ok=int(raw[0]) == 1,
            failed=int(raw[1]) - 1,
            retry_after=float(raw[2]),
            remaining=tuple(float(v) for v in raw[3 : 3 + n]),
            reset=tuple(float(v) for v in raw[3 + n : 3 + 2 * n]),
        )
        slot_keys = [k for k, c in zip(keys, checks, strict=True) if c.kind == "slots"]
        if verdict.ok and slot_keys:
            self._held[member] = slot_keys
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.create_task(self._renew_leases())
        return verdict

    def _release_call(
        self, checks: Sequence[Check], member: str, refunds: Sequence[int]
    ) -> tuple[list[str], list[str | int | float]]:
        self._held.pop(member, None)
        keys = [self._prefix + c.key for c in checks]
        args: list[str | int | float] = [self._lease, member]
        for c, refund in zip(checks, refunds, strict=True):
            args += [c.kind, refund, c.per_second or 1.0, c.limit]
        return keys, args

    async def release(self, checks: Sequence[Check], member: str, refunds: Sequence[int]) -> None:
        await self._link.evalsha(self._release, *self._release_call(checks, member, refunds))

    def release_nowait(self, checks: Sequence[Check], member: str, refunds: Sequence[int]) -> None:
        # If this is lost (Redis down), the slot's lease expires and rates refill on their own.
        self._link.evalsha_nowait(self._release, *self._release_call(checks, member, refunds))

    async def _renew_leases(self) -> None:
        while self._held:
            await asyncio.sleep(self._lease / 3)
            keys: list[str] = []
            args: list[str | float] = [self._lease]
            for member, slot_keys in list(self._held.items()):
                keys += slot_keys
                args += [member] * len(slot_keys)
            if keys:
                with contextlib.suppress(RedisDown):  # a missed renewal is retried next round
                    await self._renew_once(keys, args)

    async def _renew_once(self, keys: list[str], args: list[str | float]) -> None:
        await self._link.evalsha(self._renew, keys, list(args))

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
