"""Cancel work whose client has gone.

Starlette notices a disconnect only while it streams a response. Before that —
while a request waits for a slot, or for a non-streamed answer — nobody reads
the ASGI ``receive`` channel, so a client that hangs up would leave its
sequence running to the end. :func:`hangup_cancels` watches ``receive`` for
``http.disconnect`` while its block runs and cancels the block when it comes,
the way :func:`asyncio.timeout` cancels on a deadline: one watcher task per
request, no task per awaited step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.asynccontextmanager
async def hangup_cancels(request: Request) -> AsyncIterator[None]:
    """Run the block; raise :class:`ClientDisconnected` instead if the client leaves first.

    The request body must have been read already (the watcher consumes ``receive``).
    """
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()  # cancellations already pending are not ours
    watching = True
    left = False

    def hung_up(watcher: asyncio.Task[None]) -> None:
        nonlocal left
        # Only while the block runs: a late callback must not cancel what follows it.
        if watching and not watcher.cancelled() and watcher.exception() is None:
            left = True
            task.cancel()

    watcher = asyncio.create_task(_wait_for_disconnect(request))
    watcher.add_done_callback(hung_up)
    try:
        yield
    except asyncio.CancelledError:
        if left and task.uncancel() <= cancelling:  # ours alone, not a shutdown's as well
            raise ClientDisconnected from None
        raise
    finally:
        watching = False
        watcher.cancel()
