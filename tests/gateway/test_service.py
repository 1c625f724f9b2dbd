from __future__ import annotations

import asyncio
import time

import pytest

from gateway.service import _all_or_nothing


async def test_first_failure_cancels_the_rest_at_once() -> None:
    cancelled = asyncio.Event()

    async def slow() -> int:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    async def refused() -> int:
        raise ValueError("queue full")

    started = time.perf_counter()
    with pytest.raises(ValueError, match="queue full"):
        await _all_or_nothing([slow(), refused()])
    assert time.perf_counter() - started < 1
    assert cancelled.is_set()


async def test_results_keep_their_order() -> None:
    async def value(v: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return v

    assert await _all_or_nothing([value(1, 0.02), value(2, 0.0)]) == [1, 2]
