"""One Redis connection pool, a hard time bound on every call, and the degraded flag.

Every call through :meth:`RedisLink.call` finishes within ``timeout`` seconds or
raises :class:`RedisDown`. The first failure marks the link degraded: later calls
fail at once instead of each waiting out the timeout, and a background probe
pings Redis until it answers, which clears the flag. Callers decide what a
failure means (auth fails closed; limits follow the configured policy).

    link = RedisLink("redis://127.0.0.1:6379/0", timeout=0.25)
    value = await link.call(lambda r: r.get("k"))           # redis-py, for the admin side
    reply = await link.evalsha(script, keys=["k"], args=[])  # the request path
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.tenancy.resp import FastRedis, RespError, Script

T = TypeVar("T")
log = logging.getLogger(__name__)


class RedisDown(Exception):
    """Redis did not answer in time, or the link is degraded."""


class RedisLink:
    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        admin_timeout: float = 5.0,
        probe_interval: float = 0.5,
    ) -> None:
        self.timeout = timeout
        self.admin_timeout = max(timeout, admin_timeout)
        self._probe_interval = probe_interval
        # No client-side retries: one attempt, bounded by the timeout, is the contract.
        # This client serves the admin side (store, ledger), which may run longer.
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=self.admin_timeout,
            socket_connect_timeout=self.admin_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            max_connections=256,
        )
        # The request path (admission, release, key lookup) goes through this one instead.
        self.fast = FastRedis(url, timeout=timeout)
        self.degraded = False
        self._probe: asyncio.Task[None] | None = None
        # Run each time Redis answers again: it may have restarted empty.
        self.on_recovery: list[Callable[[], Awaitable[None]]] = []

    async def call(self, work: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Admin-side work on redis-py, within ``admin_timeout``.

        A slow admin query must not put the request path into its outage policy, so a
        failure here raises :class:`RedisDown` without marking the link degraded.
        """
        try:
            async with asyncio.timeout(self.admin_timeout):
                return await work(self.client)
        except (RedisError, OSError, TimeoutError):
            raise RedisDown("redis is unreachable") from None

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """A script on the fast connection, within the timeout (or :class:`RedisDown`)."""
        # `call` without its indirections: this runs on every admission.
        if self.degraded:
            raise RedisDown("redis is unreachable")
        try:
            async with asyncio.timeout(self.timeout):
                return await self.fast.evalsha(script, keys, args)
        except (OSError, TimeoutError, RespError) as exc:
            # RespError: OOM, READONLY after a failover, BUSY... Redis cannot serve us
            # either way, and a new connection may reach the new primary.
            self._trip(exc)
            raise RedisDown("redis is unreachable") from None

    def evalsha_nowait(self, script: Script, keys: list[str], args: list[Any]) -> None:
        """Fire and forget (a release); skipped while degraded."""
        if not self.degraded:
            self.fast.evalsha_nowait(script, keys, args)

    async def ping(self) -> bool:
        """Whether Redis answers now (a failure degrades the link, as on the request path)."""
        if self.degraded:
            return False
        try:
            async with asyncio.timeout(self.timeout):
                await self.fast.execute("PING")
        except (OSError, TimeoutError, RespError) as exc:
            self._trip(exc)
            return False
        return True

    def _trip(self, exc: BaseException) -> None:
        self.fast.reset()  # after a timeout the connection's reply stream is in doubt
        if not self.degraded:
            # The message only: a redis URL with a password must not reach the log.
            log.warning("redis unreachable (%s); degraded until it answers", type(exc).__name__)
        self.degraded = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._wait_for_recovery())

    async def _wait_for_recovery(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            try:
                async with asyncio.timeout(self.timeout):
                    await self.fast.execute("PING")
                    await self.client.ping()
            except (RedisError, OSError, TimeoutError):
                self.fast.reset()
                continue
            log.info("redis is reachable again")
            self.degraded = False
            for restore in self.on_recovery:
                try:
                    await restore()
                except Exception:
                    log.exception("restoring state after redis came back failed")
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.fast.close()
        await self.client.aclose()
