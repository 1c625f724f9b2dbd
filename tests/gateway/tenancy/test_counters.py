"""The counters' contract, run against both implementations (Redis: a real redis-server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.tenancy.counters import Check, Counters, MemoryCounters, duration, too_big
from gateway.tenancy.redis_counters import RedisCounters
from gateway.tenancy.redis_link import RedisLink
from tests.redis_server import RedisServer


@pytest.fixture(params=["memory", "redis"])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[Counters]:
    if request.param == "memory":
        yield MemoryCounters()
        return
    url = request.getfixturevalue("redis_url")
    link = RedisLink(url, timeout=1.0)
    redis_counters = RedisCounters(link, lease=1.5)
    yield redis_counters
    await redis_counters.close()
    await link.close()


def rpm(limit: int, key: str = "t:a:rpm") -> Check:
    return Check("rate", key, limit, 1, limit / 60)


async def test_a_rate_admits_exactly_its_burst(counters: Counters) -> None:
    results = [await counters.acquire([rpm(5)], f"r{i}") for i in range(8)]
    assert [v.ok for v in results] == [True] * 5 + [False] * 3
    refused = results[-1]
    assert refused.failed == 0
    assert refused.retry_after == pytest.approx(12, abs=0.5)  # one request refills in 60/5 s
    assert results[0].remaining == pytest.approx((4,), abs=0.1)
    assert results[0].reset[0] == pytest.approx(12, abs=0.5)


async def test_a_rate_refills_with_time(counters: Counters) -> None:
    fast = Check("rate", "t:a:fast", 2, 1, 20.0)  # 20 per second
    assert (await counters.acquire([fast], "a")).ok
    assert (await counters.acquire([fast], "b")).ok
    assert not (await counters.acquire([fast], "c")).ok
    await asyncio.sleep(0.1)
    assert (await counters.acquire([fast], "d")).ok


async def test_checks_pass_or_fail_together(counters: Counters) -> None:
    requests = rpm(10)
    tokens = Check("rate", "t:a:tpm", 100, 80, 100 / 60, what="tokens")
    assert (await counters.acquire([requests, tokens], "a")).ok
    refused = await counters.acquire([requests, tokens], "b")
    assert not refused.ok
    assert refused.failed == 1
    # the refused request was not charged to the request rate
    assert (await counters.acquire([requests], "c")).remaining == pytest.approx((8,), abs=0.1)


async def test_slots_limit_concurrency_until_released(counters: Counters) -> None:
    slots = Check("slots", "t:a:conc", 2)
    assert (await counters.acquire([slots], "a")).ok
    assert (await counters.acquire([slots], "b")).ok
    assert not (await counters.acquire([slots], "c")).ok
    await counters.release([slots], "a", [0])
    assert (await counters.acquire([slots], "c")).ok


async def test_budgets_count_tokens_until_the_window_ends(counters: Counters) -> None:
    end = time.time() + 3600
    budget = Check("budget", "t:a:day:1", 100, 60, window_end=end, what="daily")
    first = await counters.acquire([budget], "a")
    assert first.ok
    assert first.remaining == pytest.approx((40,), abs=0.1)
    refused = await counters.acquire([budget], "b")
    assert not refused.ok
    assert refused.retry_after == pytest.approx(3600, abs=5)


async def test_release_refunds_unused_tokens_and_charges_overruns(counters: Counters) -> None:
    tokens = Check("rate", "t:a:tpm", 100, 90, 100 / 60, what="tokens")
    assert (await counters.acquire([tokens], "a")).ok
    assert not (await counters.acquire([tokens], "b")).ok
    await counters.release([tokens], "a", [80])  # used 10 of the 90 charged
    small = Check("rate", "t:a:tpm", 100, 50, 100 / 60, what="tokens")
    admitted = await counters.acquire([small], "c")
    assert admitted.ok
    assert admitted.remaining[0] == pytest.approx(40, abs=1)
    await counters.release([small], "c", [-30])  # used 80 of 50: 30 more
    assert not (await counters.acquire([small], "d")).ok

    end = time.time() + 3600
    budget = Check("budget", "t:a:day:2", 100, 100, window_end=end, what="daily")
    assert (await counters.acquire([budget], "e")).ok
    await counters.release([budget], "e", [70])
    again = Check("budget", "t:a:day:2", 100, 70, window_end=end, what="daily")
    assert (await counters.acquire([again], "f")).ok


async def test_redis_slot_leases_expire_when_not_renewed(redis_url: str) -> None:
    """A replica killed mid-request never releases: its slot returns after the lease."""
    link = RedisLink(redis_url, timeout=1.0)
    dead = RedisCounters(link, lease=1.0)
    slots = Check("slots", "t:a:conc", 1)
    assert (await dead.acquire([slots], "a")).ok
    await dead.close()  # stops renewing, like a dead process
    other = RedisCounters(link, lease=1.0)
    assert not (await other.acquire([slots], "b")).ok
    await asyncio.sleep(1.2)
    assert (await other.acquire([slots], "b")).ok
    await other.close()
    await link.close()


async def test_redis_slot_leases_are_renewed_while_held(redis_url: str) -> None:
    link = RedisLink(redis_url, timeout=1.0)
    live = RedisCounters(link, lease=0.6)
    slots = Check("slots", "t:a:conc", 1)
    assert (await live.acquire([slots], "a")).ok
    await asyncio.sleep(1.5)  # more than two leases
    assert not (await live.acquire([slots], "b")).ok
    await live.release([slots], "a", [0])
    assert (await live.acquire([slots], "b")).ok
    await live.close()
    await link.close()


def test_too_big_and_durations() -> None:
    assert too_big(Check("rate", "k", 10, 11, 1.0))
    assert not too_big(Check("rate", "k", 10, 10, 1.0))
    assert not too_big(Check("slots", "k", 1, 99))
    assert duration(0.02) == "20ms"
    assert duration(6) == "6s"
    assert duration(90) == "1m30s"


async def test_release_without_waiting_applies(counters: Counters) -> None:
    """What a finishing request uses (Redis: a reply-skipped script on the pipelined link)."""
    slots = Check("slots", "t:a:conc", 1)
    assert (await counters.acquire([slots], "a")).ok
    counters.release_nowait([slots], "a", [0])
    await asyncio.sleep(0.05)
    assert (await counters.acquire([slots], "b")).ok


async def test_scripts_come_back_after_redis_forgets_them(redis_url: str) -> None:
    link = RedisLink(redis_url, timeout=1.0)
    counters = RedisCounters(link, lease=5.0)
    assert (await counters.acquire([rpm(5)], "a")).ok
    await link.fast.execute("SCRIPT", "FLUSH")
    assert (await counters.acquire([rpm(5)], "b")).ok  # NOSCRIPT → EVAL, transparently
    await counters.close()
    await link.close()


async def test_an_overrun_is_remembered_until_it_drains(counters: Counters) -> None:
    """A bucket pushed far above its limit by an overrun outlives its usual lifetime."""
    fast = Check("rate", "t:a:burst", 10, 10, 20.0, what="tokens")  # drains in 0.5 s
    assert (await counters.acquire([fast], "a")).ok
    await counters.release([fast], "a", [-90])  # used 100 of the 10 charged
    await asyncio.sleep(1.6)  # past 0.5 s + Redis's 1 s margin; 100 - 32 = 68 left
    refused = await counters.acquire([Check("rate", "t:a:burst", 10, 1, 20.0)], "b")
    assert not refused.ok


async def test_a_server_without_client_reply_keeps_replies_in_step(tmp_path: Path) -> None:
    """Hardened servers rename CLIENT away: releases then go out as ordinary calls."""
    server = RedisServer(tmp_path, "--rename-command", "CLIENT", '""')
    server.start()
    link = RedisLink(server.url, timeout=1.0)
    counters = RedisCounters(link, lease=5.0)
    try:
        slots = Check("slots", "t:a:conc", 1)
        for i in range(5):
            assert (await counters.acquire([slots, rpm(100)], f"r{i}")).ok
            counters.release_nowait([slots, rpm(100)], f"r{i}", [0, 0])
        await asyncio.sleep(0.05)
        assert (await counters.acquire([slots], "last")).ok
        assert not link.degraded
    finally:
        await counters.close()
        await link.close()
        server.stop()
