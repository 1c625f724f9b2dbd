"""The choices of one request in flight, and how several are read together.

A run holds one :class:`ChoiceStream` per choice (``n`` > 1, or a list of prompts):
its first chunk, the rest of its chunks, and the tokens charged so far. Their first
chunks are awaited all or nothing (:func:`first_chunks`), their later chunks merged as
they arrive (:func:`merge`), and every stream is closed however the run ends
(:func:`close_all`), which is how an engine learns to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from backends.base import GenerationChunk
from gateway.scheduler.base import Grant

T = TypeVar("T")


class ChoiceStream:
    """One choice in flight: the rest of its chunks and what it has produced so far."""

    __slots__ = ("charged", "counts_prompt", "first", "grant", "latest", "rest")

    def __init__(
        self,
        first: GenerationChunk,
        rest: AsyncIterator[GenerationChunk],
        *,
        counts_prompt: bool,
        grant: Grant,
    ) -> None:
        self.first = first
        self.rest = rest
        self.counts_prompt = counts_prompt  # False for extra choices (n > 1) of one prompt
        self.grant = grant  # whose fair share the tokens count toward
        self.latest = first
        self.charged = 0  # tokens already counted toward the fair share
        self.advance(first)

    def advance(self, chunk: GenerationChunk) -> None:
        """Record ``chunk`` as the latest, and charge its new tokens to the tenant's share."""
        self.latest = chunk
        served = chunk.completion_tokens + (chunk.prompt_tokens if self.counts_prompt else 0)
        self.grant.charge(served - self.charged)
        self.charged = served


async def first_chunks(
    streams: Sequence[AsyncIterator[GenerationChunk]],
) -> list[GenerationChunk]:
    if len(streams) == 1:  # the common case needs no tasks
        return [await anext(streams[0])]
    return await all_or_nothing([anext(s) for s in streams])


async def all_or_nothing(work: Sequence[Awaitable[T]]) -> list[T]:
    """Await all of ``work``; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge(
    streams: Sequence[ChoiceStream],
) -> AsyncGenerator[tuple[int, GenerationChunk], None]:
    """Every choice's chunks, first chunks included, interleaved as they arrive."""
    inbox: asyncio.Queue[tuple[int, GenerationChunk] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, s: ChoiceStream) -> None:
        try:
            await inbox.put((index, s.first))
            if s.first.finish_reason is None:
                async for chunk in s.rest:
                    await inbox.put((index, chunk))
            await inbox.put(None)
        except Exception as exc:
            await inbox.put(exc)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        # The pumps' own cancellations are returned, not raised; a cancellation of this
        # task (a shutdown) propagates, as it must.
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_all(streams: Sequence[AsyncIterator[GenerationChunk]]) -> None:
    for s in streams:
        aclose = getattr(s, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
