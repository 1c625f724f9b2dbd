"""Ejections shared by every replica through Redis (the :class:`~gateway.outliers.Board`).

An ejection is one key per instance, ``lockgate:eject:<pool>`` = ``"<end>:<times>"``
(wall-clock end, times ejected), expiring when the ejection does. Publishing is fire
and forget; every ``interval`` seconds one ``MGET`` reads them all, so a replica takes
another's ejection within that. With Redis unreachable each replica keeps its own
evidence and goes on ejecting alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from gateway.tenancy.redis_link import RedisDown, RedisLink

log = logging.getLogger(__name__)


class RedisBoard:
    def __init__(
        self,
        link: RedisLink,
        pools: Sequence[str],
        *,
        interval: float = 0.5,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._link = link
        self._keys: dict[str, str] = {}
        self.share(pools)
        self._interval = interval
        self._wall = wall
        self._seen: dict[str, tuple[float, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def share(self, pools: Sequence[str]) -> None:
        """Share these remote instances' ejections from now on (they stay shared)."""
        for pool in pools:
            self._keys[pool] = f"lockgate:eject:{pool}"

    def publish(self, pool: str, until_wall: float, times: int) -> None:
        key = self._keys.get(pool)
        if key is None:  # an engine of this process: its ejection is its own
            return
        self._seen[pool] = (until_wall, times)
        ttl_ms = max(1, int((until_wall - self._wall()) * 1000))
        task = asyncio.get_running_loop().create_task(self._write(key, until_wall, times, ttl_ms))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, until_wall: float, times: int, ttl_ms: int) -> None:
        value = f"{until_wall:.3f}:{times}"
        with contextlib.suppress(RedisDown):
            await self._link.call(lambda r: r.set(key, value, px=ttl_ms))

    def ejections(self) -> Mapping[str, tuple[float, int]]:
        return self._seen

    async def refresh(self) -> None:
        if not self._keys:
            return
        pools = list(self._keys)
        keys = [self._keys[p] for p in pools]
        try:
            values = await self._link.call(lambda r: r.mget(keys))
        except RedisDown:  # keep what is known, less what has ended
            now = self._wall()
            self._seen = {p: e for p, e in self._seen.items() if e[0] > now}
            return
        seen: dict[str, tuple[float, int]] = {}
        for pool, raw in zip(pools, values, strict=True):
            if raw is None:
                continue
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            end, _, times = text.partition(":")
            with contextlib.suppress(ValueError):
                seen[pool] = (float(end), int(times))
        self._seen = seen

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._writes) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
