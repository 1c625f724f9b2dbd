"""Cancel work whose client has gone.

Starlette notices a disconnect only while it streams a response. Before that —
while a request waits for a slot, or for a non-streamed answer — nobody reads
the ASGI ``receive`` channel, so a client that hangs up would leave its
sequence running to the end. :func:`hangup_cancels` watches ``receive`` for
``http.disconnect`` while its block runs and cancels the block when it comes,
the way :func:`asyncio.timeout` cancels on a deadline: one watcher task per
request, no task per awaited step. A graceful drain's deadline cancels it too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.requests import Request

if TYPE_CHECKING:
    from gateway.drain import Drain


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.asynccontextmanager
async def hangup_cancels(request: Request, drain: Drain | None = None) -> AsyncIterator[None]:
    """Run the block; raise :class:`ClientDisconnected` instead if the client leaves first,
    or :class:`~gateway.errors.ShuttingDown` if ``drain``'s deadline cuts it
    (:mod:`gateway.drain`).

    The request body must have been read already (the watcher consumes ``receive``).
    """
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()  # cancellations already pending are not ours
    watching = True
    reason: Exception | None = None
    if drain is not None and drain.cut_off:
        raise drain.refusal()

    def stop(why: Exception) -> None:
        nonlocal reason
        # Only while the block runs: a late callback must not cancel what follows it.
        if watching and reason is None:
            reason = why
            task.cancel()

    def hung_up(watcher: asyncio.Task[None]) -> None:
        if not watcher.cancelled() and watcher.exception() is None:
            stop(ClientDisconnected())

    watcher = asyncio.create_task(_wait_for_disconnect(request))
    watcher.add_done_callback(hung_up)
    forget = None if drain is None else drain.on_cut(lambda: stop(drain.refusal()))
    try:
        yield
    except asyncio.CancelledError:
        if reason is not None and task.uncancel() <= cancelling:  # ours alone, not a shutdown's
            raise reason from None
        raise
    finally:
        watching = False
        watcher.cancel()
        if forget is not None:
            forget()
