"""Engine slots and their queue shared by gateway replicas through one Redis.

Same order and refusals as :class:`~gateway.scheduler.memory.MemoryScheduler`
(see :mod:`gateway.scheduler.fairness`), but the queue, the fairness counters and
the slots live in Redis, and every change is one Lua script on Redis's clock. Keys,
with ``P = {prefix}{pool}:`` and ``G = {prefix}``::

    P slots              zset  "{entry}#{i}" → lease deadline (ms); ZCARD = slots in use;
                               entry = "{request_id}/{replica}.{n}", unique per acquire
    P entries            hash  entry id → JSON {id, rid, pool, replica, tenant, weight,
                               priority, slots, seq, enqueued, deadline}; HLEN = waiting
    P order:{rank}       zset  entry id → arrival seq (rank 0 interactive, 1 batch)
    P q:{rank}:{tenant}  list  entry ids, FIFO
    P tenants:{rank}     zset  waiting tenant → its counter (ties: the earlier head seq)
    P waiting            hash  tenant → entries waiting, all ranks
    P vtc                hash  tenant → Virtual Token Counter (tokens / weight)
    P stats              hash  interval (s per freed slot, EWMA), rate (its inverse),
                               freed_at, served (last), seq
    G replica:{id}       string, PX 0.9 lease: the replica is alive
    G inbox:{id}         list  grant JSON {pool, id, slots} for that replica's waiters

Grants travel without polling: whichever script frees a slot (release, cancel, a
heartbeat reaping an expired lease) pops the next entries while slots are free
and RPUSHes each grant onto its replica's inbox; every replica BLPOPs its own
inbox on a connection of its own and resolves the local waiter. A grant nobody
waits for any more is given back at once. Entries of dead replicas (replica key
expired) and past their deadline are dropped instead of granted.

Slots are leases: each replica renews the slots it holds every ``lease_ttl / 4``;
a replica killed with ``kill -9`` loses its slots and queued entries within
``lease_ttl``. The price: a replica cut off from Redis for longer than that loses
its slots while its requests still run. Releases, cancellations and charges
(batched per 0.1 s) go out fire-and-forget; lost ones (Redis down) cost at most a
lease. Acquiring fails closed while Redis is down (``StateUnavailable``). Scripts
build key names from the prefix: one Redis primary (or Sentinel), not Cluster.

    scheduler = RedisScheduler(link, lease_ttl=10.0)
    scheduler.add_pool("gemma@embedded", PoolLimits(capacity=16))
    await scheduler.start()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import StateUnavailable
from gateway.scheduler.base import Grant, Policy, PoolLimits, PoolLoad
from gateway.scheduler.memory import DrainRate
from gateway.tenancy.records import Priority
from gateway.tenancy.redis_link import RedisDown, RedisLink
from gateway.tenancy.resp import Script

# Shared by every pool script. KEYS[1] is the prefix G; "now" is Redis's clock in ms.
_LIB = """
local G = KEYS[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local RANK = {interactive = 0, batch = 1}
local alive = {}

local function unqueue(P, e)
  local rank = RANK[e.priority]
  local q = P .. 'q:' .. rank .. ':' .. e.tenant
  redis.call('HDEL', P .. 'entries', e.id)
  redis.call('ZREM', P .. 'order:' .. rank, e.id)
  redis.call('LREM', q, 1, e.id)
  if redis.call('LLEN', q) == 0 then redis.call('ZREM', P .. 'tenants:' .. rank, e.tenant) end
  if redis.call('HINCRBY', P .. 'waiting', e.tenant, -1) <= 0 then
    redis.call('HDEL', P .. 'waiting', e.tenant)
  end
end

-- A replica's key dies before the slots it renewed with it: once they expire, its
-- queued entries are known dead and dropped, not granted into an inbox nobody reads.
local function alive_ms(lease) return math.floor(lease * 0.9) end

local function dead(e)
  if e.deadline <= now then return true end
  if alive[e.replica] == nil then
    alive[e.replica] = redis.call('EXISTS', G .. 'replica:' .. e.replica) == 1
  end
  return not alive[e.replica]
end

-- The entry to serve next: the earliest arrival (fcfs), or in the first non-empty
-- rank the tenant with the smallest counter, ties going to the earlier head.
local function head(P, fcfs)
  local best, best_seq
  for rank = 0, 1 do
    local order = P .. 'order:' .. rank
    if fcfs then
      local top = redis.call('ZRANGE', order, 0, 0, 'WITHSCORES')
      if top[1] and (best == nil or tonumber(top[2]) < best_seq) then
        best, best_seq = top[1], tonumber(top[2])
      end
    else
      local tenants = P .. 'tenants:' .. rank
      local top = redis.call('ZRANGE', tenants, 0, 0, 'WITHSCORES')
      if top[1] then
        for _, tenant in ipairs(redis.call('ZRANGEBYSCORE', tenants, top[2], top[2])) do
          local id = redis.call('LINDEX', P .. 'q:' .. rank .. ':' .. tenant, 0)
          local seq = tonumber(redis.call('ZSCORE', order, id))
          if best == nil or seq < best_seq then best, best_seq = id, seq end
        end
        return best
      end
    end
  end
  return best
end

local function hold(P, id, slots, lease)
  for i = 1, slots do redis.call('ZADD', P .. 'slots', now + lease, id .. '#' .. i) end
end

-- Grant in order while the head fits (strict: a wide head blocks those behind it).
-- A grant for self_id is returned instead of being sent to an inbox.
local function dispatch(P, cap, lease, fcfs, self_id)
  redis.call('ZREMRANGEBYSCORE', P .. 'slots', '-inf', now)
  local running = redis.call('ZCARD', P .. 'slots')
  local self_granted = false
  while true do
    local id = head(P, fcfs)
    if not id then break end
    local e = cjson.decode(redis.call('HGET', P .. 'entries', id))
    local gone = dead(e)
    if not gone and running + e.slots > cap then break end
    unqueue(P, e)
    if not gone then
      running = running + e.slots
      hold(P, id, e.slots, lease)
      redis.call('HSET', P .. 'stats', 'served', e.tenant)
      if id == self_id then
        self_granted = true
      else
        local inbox = G .. 'inbox:' .. e.replica
        redis.call('RPUSH', inbox, cjson.encode({pool = e.pool, id = id, slots = e.slots}))
        redis.call('PEXPIRE', inbox, lease)
      end
    end
  end
  return self_granted
end

local function figures(P)
  return {redis.call('ZCOUNT', P .. 'slots', '(' .. now, '+inf'),
          redis.call('ZCARD', P .. 'order:0'), redis.call('ZCARD', P .. 'order:1'),
          redis.call('HGET', P .. 'stats', 'rate') or '0'}
end
"""

# ARGV: pool, capacity, lease ms, fcfs, then the entry id, replica, tenant, weight,
# priority, slots, max_queue, max_queue_per_tenant, request id, max_wait ms.
# Returns {code, waiting, drain rate}; code 1 granted, 2 queued, 3 pool full, 4 tenant full.
_ACQUIRE = """
local pool, cap, lease, fcfs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local P = G .. pool .. ':'
local id, replica, tenant, priority = ARGV[5], ARGV[6], ARGV[7], ARGV[9]
local slots = tonumber(ARGV[10])
-- Registered by the heartbeat; NX: only if Redis lost it (a restart), never extended here.
redis.call('SET', G .. 'replica:' .. replica, '1', 'PX', alive_ms(lease), 'NX')
dispatch(P, cap, lease, fcfs, nil)  -- drop the dead first: they must not make us wait
local waiting = redis.call('HLEN', P .. 'entries')
local rate = redis.call('HGET', P .. 'stats', 'rate') or '0'
if waiting == 0 and redis.call('ZCARD', P .. 'slots') + slots <= cap then
  hold(P, id, slots, lease)
  return {1, 0, rate}
end
if waiting >= tonumber(ARGV[11]) then return {3, waiting, rate} end
local mine = tonumber(redis.call('HGET', P .. 'waiting', tenant)) or 0
if mine >= tonumber(ARGV[12]) then return {4, waiting, rate} end
local vtc = P .. 'vtc'
if mine == 0 then
  -- Lift to the least-served waiting tenant (or the last served): idling earns no credit.
  local floor
  for rank = 0, 1 do
    local top = redis.call('ZRANGE', P .. 'tenants:' .. rank, 0, 0, 'WITHSCORES')
    if top[1] and (floor == nil or tonumber(top[2]) < floor) then floor = tonumber(top[2]) end
  end
  if floor == nil then
    local last = redis.call('HGET', P .. 'stats', 'served')
    floor = last and tonumber(redis.call('HGET', vtc, last)) or 0
  end
  if floor > (tonumber(redis.call('HGET', vtc, tenant)) or 0) then
    redis.call('HSET', vtc, tenant, floor)
  end
end
local rank = RANK[priority]
local seq = redis.call('HINCRBY', P .. 'stats', 'seq', 1)
redis.call('HSET', P .. 'entries', id, cjson.encode({
  id = id, rid = ARGV[13], pool = pool, replica = replica, tenant = tenant,
  weight = tonumber(ARGV[8]), priority = priority, slots = slots, seq = seq,
  enqueued = now, deadline = now + tonumber(ARGV[14])}))
redis.call('ZADD', P .. 'order:' .. rank, seq, id)
redis.call('RPUSH', P .. 'q:' .. rank .. ':' .. tenant, id)
redis.call('ZADD', P .. 'tenants:' .. rank, redis.call('HGET', vtc, tenant) or '0', tenant)
redis.call('HINCRBY', P .. 'waiting', tenant, 1)
-- A new head (lighter tenant, or interactive ahead of a blocked wide batch) may fit now.
if dispatch(P, cap, lease, fcfs, id) then return {1, 0, rate} end
return {2, waiting + 1, rate}
"""

# An entry is done with its pool, whatever state it reached: dequeue it if still
# queued, free its slots if granted. ARGV: pool, capacity, lease ms, fcfs, id, slots.
# With id "" and 0 slots it only dispatches (the pool grew).
_LEAVE = """
local P = G .. ARGV[1] .. ':'
local id = ARGV[5]
local raw = redis.call('HGET', P .. 'entries', id)
if raw then unqueue(P, cjson.decode(raw)) end
local freed = 0
for i = 1, tonumber(ARGV[6]) do freed = freed + redis.call('ZREM', P .. 'slots', id .. '#' .. i) end
if freed > 0 then
  -- Smooth the time per freed slot and invert it (see memory.DrainRate: averaging
  -- rates would let slots freed together swamp the mean).
  local s = redis.call('HMGET', P .. 'stats', 'interval', 'freed_at')
  local iv, at, t = tonumber(s[1]), tonumber(s[2]), now / 1000
  if at then
    local sample = (t - at) / freed
    iv = iv and (0.8 * iv + 0.2 * sample) or sample
    redis.call('HSET', P .. 'stats', 'interval', iv, 'rate', 1 / math.max(iv, 0.001))
  end
  redis.call('HSET', P .. 'stats', 'freed_at', t)
end
dispatch(P, tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1', nil)
return 1
"""

# ARGV: (pool, tenant, counter increment) triples. A waiting tenant's score moves too.
_CHARGE = """
for i = 1, #ARGV, 3 do
  local P = KEYS[1] .. ARGV[i] .. ':'
  local counter = redis.call('HINCRBYFLOAT', P .. 'vtc', ARGV[i + 1], ARGV[i + 2])
  for rank = 0, 1 do redis.call('ZADD', P .. 'tenants:' .. rank, 'XX', counter, ARGV[i + 1]) end
end
return 1
"""

# ARGV[1]: JSON {replica, lease, fcfs, pools: [{name, cap, held: [[entry, slots]...]}]}.
# Renews first, so a slot that expired but was not yet reaped by anyone is kept.
_HEARTBEAT = """
local beat = cjson.decode(ARGV[1])
redis.call('SET', G .. 'replica:' .. beat.replica, '1', 'PX', alive_ms(beat.lease))
local out = {}
for _, pool in ipairs(beat.pools) do
  local P = G .. pool.name .. ':'
  for _, h in ipairs(pool.held) do
    for i = 1, h[2] do
      redis.call('ZADD', P .. 'slots', 'XX', now + beat.lease, h[1] .. '#' .. i)
    end
  end
  for _, raw in ipairs(redis.call('HVALS', P .. 'entries')) do
    local e = cjson.decode(raw)
    if dead(e) then unqueue(P, e) end
  end
  dispatch(P, pool.cap, beat.lease, beat.fcfs, nil)
  out[#out + 1] = figures(P)
end
return out
"""

_SNAPSHOT = "return figures(G .. ARGV[1] .. ':')"

_QUEUED, _POOL_FULL, _TENANT_FULL = 2, 3, 4  # and 1: granted
_CHARGE_EVERY = 0.1  # seconds: a long generation moves its counter without a call per token
_INBOX_BLOCK = 1  # seconds per BLPOP


@dataclass(slots=True)
class _Pool:
    limits: PoolLimits
    # The latest figures Redis gave us, for the I/O-free load().
    running: int = 0
    interactive: int = 0
    batch: int = 0
    drain: float = 0.0

    def update(self, figures: list[Any]) -> None:
        self.running, self.interactive, self.batch = (int(f) for f in figures[:3])
        self.drain = float(figures[3])


class RedisScheduler:
    def __init__(
        self,
        link: RedisLink,
        *,
        policy: Policy = "fair",
        lease_ttl: float = 10.0,
        replica: str | None = None,
        prefix: str = "lg:sched:",
    ) -> None:
        self.replica = replica or secrets.token_hex(8)
        self._link = link
        self._fcfs = policy == "fcfs"
        self._lease_ttl = lease_ttl
        self._lease_ms = max(1, round(lease_ttl * 1000))
        self._prefix = prefix
        self._pools: dict[str, _Pool] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}  # entry id → its acquire
        self._held: dict[Grant, str] = {}  # → entry id; renewed until released
        self._charges: dict[tuple[str, str], float] = {}  # (pool, tenant) → counter increment
        self._flush: asyncio.TimerHandle | None = None
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._acquire = Script(_LIB + _ACQUIRE)
        self._leave_script = Script(_LIB + _LEAVE)
        self._charge_script = Script(_CHARGE)
        self._heartbeat = Script(_LIB + _HEARTBEAT)
        self._snapshot = Script(_LIB + _SNAPSHOT)
        for script in (self._leave_script, self._charge_script):
            link.fast.preload(script)  # sent without a reply: loaded on every new connection

    async def start(self) -> None:
        if self._tasks:
            return
        self._stopping = False
        # The fast connection may predate this scheduler, hence its preloads: load them now.
        scripts = (self._leave_script, self._charge_script)
        with contextlib.suppress(RedisDown):  # Redis down at boot: the heartbeat retries
            await self._link.call(
                lambda r: asyncio.gather(*(r.script_load(s.source) for s in scripts))
            )
            await self._beat()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._beat_forever()), loop.create_task(self._inbox())]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        # redis-py on Python 3.11 can swallow a cancellation (asyncio.wait_for, CPython
        # gh-86296) and go on blocking: the flag ends the inbox loop after one BLPOP then.
        self._stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        held, self._held = self._held, {}
        for grant in held:
            grant.released = True  # its holder's release() is now a no-op
        with contextlib.suppress(RedisDown):  # not given back: the leases run out instead
            if self._charges:
                await self._link.evalsha(self._charge_script, [self._prefix], self._charge_args())
            for grant, entry in held.items():
                args = [*self._pool_args(grant.pool), entry, grant.slots]
                await self._link.evalsha(self._leave_script, [self._prefix], args)
            # Others stop granting to our waiters at once, not a lease later.
            await self._link.call(lambda r: r.delete(f"{self._prefix}replica:{self.replica}"))

    def add_pool(self, pool: str, limits: PoolLimits) -> None:
        existing = self._pools.get(pool)
        if existing is None:
            self._pools[pool] = _Pool(limits)
            return
        existing.limits = limits
        with contextlib.suppress(RuntimeError):  # no event loop yet: the heartbeat dispatches
            asyncio.get_running_loop()
            self._leave(pool, "", 0)  # more capacity: hand it out now

    def load(self, pool: str) -> PoolLoad:
        p = self._pools[pool]
        waiting = {"interactive": p.interactive, "batch": p.batch}
        return PoolLoad(p.running, p.limits.capacity, waiting, p.drain)

    async def snapshot(self, pool: str) -> PoolLoad:
        try:
            figures = await self._link.evalsha(self._snapshot, [self._prefix], [pool])
        except RedisDown:
            raise StateUnavailable("The scheduler's state (Redis) is unreachable.") from None
        self._pools[pool].update(figures)
        return self.load(pool)

    async def acquire(
        self,
        pool: str,
        request_id: str,
        *,
        tenant: str,
        weight: float,
        priority: Priority,
        slots: int = 1,
    ) -> Grant:
        p = self._pools[pool]
        limits = p.limits
        slots = max(1, min(slots, limits.capacity))
        # Unique even if request ids are not (it names the slot members too).
        entry = f"{request_id}/{self.replica}.{next(self._ids)}"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[entry] = future  # before the script: its grant may beat the reply
        started = time.monotonic()
        args = [*self._pool_args(pool), entry, self.replica, tenant, weight, priority, slots]
        args += [limits.max_queue, limits.max_queue_per_tenant, request_id]
        args.append(round(limits.max_wait * 1000))
        try:
            code, waiting, drain = await self._link.evalsha(self._acquire, [self._prefix], args)
        except BaseException as exc:
            self._waiters.pop(entry, None)
            if isinstance(exc, RedisDown):  # fail closed: nobody can count the slots
                raise StateUnavailable(
                    "The scheduler's shared state (Redis) is unreachable; retry shortly."
                ) from None
            self._leave(pool, entry, slots)  # cancelled with the script in flight: undo it
            raise
        p.drain = float(drain)
        retry_after = DrainRate(p.drain).retry_after(int(waiting))
        grant = Grant(self, pool, request_id, tenant, weight, slots)
        if code != _QUEUED:
            self._waiters.pop(entry, None)
        if code == _POOL_FULL:
            raise limits.full(waiting, retry_after)
        if code == _TENANT_FULL:
            raise limits.tenant_full(retry_after)
        if code == _QUEUED:
            try:
                async with asyncio.timeout(limits.max_wait):
                    await future
            except BaseException as exc:
                self._waiters.pop(entry, None)
                granted = future.done() and not future.cancelled()
                if not (granted and isinstance(exc, TimeoutError)):  # else: came at the deadline
                    # Dequeues it, or passes on slots granted in the instant the client left.
                    self._leave(pool, entry, slots)
                    if isinstance(exc, TimeoutError):
                        raise limits.timed_out(retry_after) from None
                    raise
            grant.queued_seconds = time.monotonic() - started
        self._held[grant] = entry
        return grant

    def _release(self, grant: Grant) -> None:
        entry = self._held.pop(grant, None)
        if entry is not None:
            self._flush_charges()  # the next pick must see what this request cost
            self._leave(grant.pool, entry, grant.slots)

    def _charge(self, grant: Grant, tokens: int) -> None:
        key = (grant.pool, grant.tenant)
        self._charges[key] = self._charges.get(key, 0.0) + tokens / grant.weight
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(_CHARGE_EVERY, self._flush_charges)

    def _flush_charges(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._charges:  # skipped while Redis is down: fairness, not safety
            self._link.evalsha_nowait(self._charge_script, [self._prefix], self._charge_args())

    def _charge_args(self) -> list[Any]:
        args = [x for (pool, t), inc in self._charges.items() for x in (pool, t, repr(inc))]
        self._charges.clear()
        return args

    def _pool_args(self, pool: str) -> list[Any]:
        return [pool, self._pools[pool].limits.capacity, self._lease_ms, int(self._fcfs)]

    def _leave(self, pool: str, entry: str, slots: int) -> None:
        # Lost while Redis is down: the lease (or the entry's deadline) cleans up instead.
        args = [*self._pool_args(pool), entry, slots]
        self._link.evalsha_nowait(self._leave_script, [self._prefix], args)

    async def _beat_forever(self) -> None:
        while True:
            # Every lease/4: after two missed rounds the third (at 0.75 lease) still comes
            # before the replica key (0.9 lease) and the slot leases (1.0) run out.
            await asyncio.sleep(self._lease_ttl / 4)
            with contextlib.suppress(RedisDown):
                await self._beat()

    async def _beat(self) -> None:
        """Stay alive, renew held slots, reap the dead and dispatch; refresh load()."""
        held: dict[str, list[tuple[str, int]]] = {name: [] for name in self._pools}
        for grant, entry in self._held.items():
            held[grant.pool].append((entry, grant.slots))
        pools = list(self._pools.items())
        beat = {
            "replica": self.replica,
            "lease": self._lease_ms,
            "fcfs": self._fcfs,
            "pools": [{"name": n, "cap": p.limits.capacity, "held": held[n]} for n, p in pools],
        }
        reply = await self._link.evalsha(self._heartbeat, [self._prefix], [orjson.dumps(beat)])
        for (_, p), figures in zip(pools, reply, strict=True):
            p.update(figures)

    async def _inbox(self) -> None:
        key = f"{self._prefix}inbox:{self.replica}"
        while not self._stopping:
            try:
                # redis-py, not the pipelined fast connection: a blocked BLPOP would stall it.
                popped = await self._link.call(lambda r: r.blpop([key], timeout=_INBOX_BLOCK))
            except RedisDown:
                await asyncio.sleep(0.25)
                continue
            if popped is not None:
                self._deliver(popped[1])

    def _deliver(self, raw: bytes | str) -> None:
        grant = orjson.loads(raw)
        future = self._waiters.pop(grant["id"], None)
        if future is not None and not future.done():
            future.set_result(None)
        elif grant["pool"] in self._pools:  # its waiter left (timeout, cancel): pass it on
            self._leave(grant["pool"], grant["id"], grant["slots"])
