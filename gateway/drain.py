"""Graceful drain: on SIGTERM, finish what is running, refuse what is new, then exit.

uvicorn alone closes its listener on SIGTERM and cuts whatever is still open five
seconds later, mid-stream and without a word. Lockgate drains instead:

1. at once, ``/health/ready`` answers 503 (``"status": "draining"``) so a load
   balancer stops sending, and every new request gets 503 with ``Retry-After``
   in its door's shape (:class:`DrainGate`); liveness and ``/metrics`` still answer;
2. requests already inside — streaming, generating or queued for a slot — go on;
3. when none is left, or after ``server.drain_seconds``, whatever is still open is
   cut (:meth:`Drain.cut`): a stream gets an error event in its own format, a
   request still waiting a 503, never a silent close;
4. then the server stops (the app's shutdown: batch claims released, engines closed).

A second signal makes the deadline now: what is open is cut at once (with its error
event), and the server stops without waiting further.

    drain = Drain(seconds=30)
    app = create_app(settings, drain=drain)
    DrainingServer(uvicorn.Config(app, ...), drain).run()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ErrorInfo, ShuttingDown, describe

log = logging.getLogger(__name__)

# Paths that still answer while draining: probes and the scrape.
_OPEN = ("/health/", "/metrics")
# How long cut streams get to send their error event before the server stops.
_CUT_GRACE = 2.0


class Drain:
    """The drain's state: when it began, the requests inside, the cuts to make."""

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = seconds
        self.began: float | None = None  # monotonic time of begin()
        self.cut_off = False  # the deadline passed: what is open now is cut
        self.active = 0  # requests inside the gate (not counting refused ones)
        self._cuts: set[Callable[[], None]] = set()
        self._idle: asyncio.Event | None = None
        self._deadline: asyncio.Event | None = None
        self._hurried = False

    @property
    def draining(self) -> bool:
        return self.began is not None

    def begin(self) -> None:
        if self.began is None:
            self.began = time.monotonic()
            log.warning(
                "draining: refusing new requests, %d in flight, up to %.0fs",
                self.active,
                self.seconds,
            )

    def on_cut(self, cut: Callable[[], None]) -> Callable[[], None]:
        """Call ``cut`` if the deadline passes; the returned function forgets it."""
        self._cuts.add(cut)
        return lambda: self._cuts.discard(cut)

    def cut(self) -> None:
        """The deadline: cut every request still open."""
        self.cut_off = True
        if self._cuts:
            log.warning("drain deadline: cutting %d open request(s)", len(self._cuts))
        for cut in list(self._cuts):
            cut()

    def entered(self) -> None:
        self.active += 1

    def left(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    def hurry(self) -> None:
        """Make the deadline now (a second signal), even before :meth:`run` has begun."""
        self._hurried = True
        if self._deadline is not None:
            self._deadline.set()

    async def run(self) -> None:
        """Begin, wait until nothing is inside or the deadline, cut what is left."""
        self.begin()
        self._idle, self._deadline = asyncio.Event(), asyncio.Event()
        if self._hurried:
            self._deadline.set()
        if self.active:
            idle = asyncio.ensure_future(self._idle.wait())
            deadline = asyncio.ensure_future(self._deadline.wait())
            await asyncio.wait(
                {idle, deadline}, timeout=self.seconds, return_when="FIRST_COMPLETED"
            )
            deadline.cancel()
            if not idle.done():
                idle.cancel()
                self.cut()
                self._idle.clear()
                if self.active:
                    # The cut requests send their error event and end.
                    try:
                        await asyncio.wait_for(self._idle.wait(), _CUT_GRACE)
                    except TimeoutError:
                        log.warning("%d request(s) did not end after the cut", self.active)
        log.warning("drained in %.1fs", time.monotonic() - (self.began or time.monotonic()))

    def refusal(self) -> ShuttingDown:
        return ShuttingDown("This server is shutting down; retry on another replica.")


class DrainGate:
    """Counts the requests inside; while draining, refuses new ones with 503.

    ``body`` renders an :class:`ErrorInfo` in the wire format of the path's door.
    """

    def __init__(
        self, app: ASGIApp, *, drain: Drain, body: Callable[[str, ErrorInfo], bytes]
    ) -> None:
        self.app = app
        self.drain = drain
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        drain = self.drain
        path: str = scope["path"]
        if drain.began is not None and not path.startswith(_OPEN):
            await self._refuse(path, send)
            return
        drain.entered()
        try:
            await self.app(scope, receive, send)
        finally:
            drain.left()

    async def _refuse(self, path: str, send: Send) -> None:
        info = describe(self.drain.refusal())
        headers: Sequence[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"connection", b"close"),  # a client on keep-alive reconnects elsewhere
            *((k.lower().encode(), v.encode()) for k, v in info.headers.items()),
        ]
        await send({"type": "http.response.start", "status": info.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body(path, info)})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which drains (:class:`Drain`) on its first SIGTERM or SIGINT."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:  # not serving yet
            self.should_exit = True
            return
        if self.drain.draining:  # a second signal: the deadline is now
            self._loop.call_soon_threadsafe(self.drain.hurry)
            return
        self.drain.begin()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.should_exit = True
