"""hangup_cancels: a client's hang-up cancels the block, and only the block.

Unit tests of one module with a scripted ASGI ``receive``; the real disconnects
(uvicorn, a client closing its socket) are in test_scheduling_api.py and the
integration tests.
"""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from gateway.api.disconnect import ClientDisconnected, hangup_cancels


def request(hang_up: asyncio.Event) -> Request:
    async def receive() -> dict[str, object]:
        await hang_up.wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "headers": []}, receive)


async def test_hang_up_cancels_the_block_and_raises_client_disconnected() -> None:
    hang_up = asyncio.Event()
    reached = False

    async def work() -> None:
        nonlocal reached
        async with hangup_cancels(request(hang_up)):
            asyncio.get_running_loop().call_later(0.01, hang_up.set)
            await asyncio.sleep(5)
            reached = True

    with pytest.raises(ClientDisconnected):
        await asyncio.wait_for(work(), 2)
    assert not reached


async def test_a_block_that_finishes_is_not_cancelled_by_a_later_hang_up() -> None:
    hang_up = asyncio.Event()
    async with hangup_cancels(request(hang_up)):
        await asyncio.sleep(0)
    hang_up.set()  # the watcher is gone: nothing may cancel this task now
    await asyncio.sleep(0.02)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_hang_up_in_the_blocks_last_moment_does_not_leak_out() -> None:
    """The watcher sees the disconnect in the same loop pass the block ends in."""
    hang_up = asyncio.Event()
    async with hangup_cancels(request(hang_up)):
        hang_up.set()
        await asyncio.sleep(0)  # the watcher finishes; its done-callback is not run yet
    await asyncio.sleep(0.02)  # would raise CancelledError if the late callback fired
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_shutdown_stays_a_cancellation() -> None:
    hang_up = asyncio.Event()
    started = asyncio.Event()

    async def work() -> None:
        async with hangup_cancels(request(hang_up)):
            started.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(work())
    await started.wait()
    task.cancel()  # not the client: the server shutting down
    with pytest.raises(asyncio.CancelledError):
        await task
