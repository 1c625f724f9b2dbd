"""The bytes of uploaded and produced files, on disk under one directory.

    files = FileStorage(Path("/var/lib/lockgate/files"))
    size, lines = await files.save(file_id, upload, max_bytes=..., max_lines=...)
    async for index, line in files.lines(file_id): ...

Ids are the gateway's own (``file-`` and hex), so a path is never built from a
client's string. Replicas that share Redis must share this directory too (a volume):
a batch is resumed by whichever replica claims it. Everything streams in blocks, in
a worker thread: memory stays bounded whatever a file's size, and the event loop
never waits on the disk.

A claim writes its results to *parts* of its own (``{batch}.{generation}.out``, ``.err``)
and flushes them to disk before its lines are marked done (write, then mark); the
output files are the parts merged at the end, each input line once (by the output
line's ``id``; the first written wins: a line written again after a crash, before its
mark, is dropped).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Protocol

import orjson

from gateway.errors import InvalidRequest

BLOCK_BYTES = 1 << 20  # read and copied a block at a time
LINES_PER_READ = 256


class Upload(Protocol):
    async def read(self, size: int = -1) -> bytes: ...


class FileStorage:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def part(self, batch_id: str, generation: int, kind: str) -> Path:
        return self.root / "parts" / f"{batch_id}.{generation}.{kind}"

    async def save(
        self, file_id: str, upload: Upload, *, max_bytes: int, max_lines: int
    ) -> tuple[int, int]:
        """Copy an upload into place; its size and line count. Too large: refused whole."""
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        target = self.path(file_id)
        partial = target.with_suffix(".partial")
        size = lines = 0
        last = b"\n"
        out = await asyncio.to_thread(partial.open, "wb")
        try:
            while block := await upload.read(BLOCK_BYTES):
                size += len(block)
                lines += block.count(b"\n")
                last = block[-1:]
                if size > max_bytes:
                    raise InvalidRequest(
                        f"The file is larger than {max_bytes} bytes.", param="file"
                    )
                if lines > max_lines:
                    raise InvalidRequest(f"The file has more than {max_lines} lines.", param="file")
                await asyncio.to_thread(out.write, block)
            await asyncio.to_thread(_close_synced, out)
        except BaseException:
            await asyncio.to_thread(out.close)
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            raise
        if last != b"\n" and size:
            lines += 1  # a last line without its newline
        await asyncio.to_thread(partial.replace, target)
        return size, lines

    async def lines(self, file_id: str) -> AsyncIterator[tuple[int, bytes]]:
        """``(index, line)`` for each non-blank line, in order (indexes count blank ones)."""
        # On the loop: an open() in a thread whose awaiter is cancelled leaks the handle.
        handle = self.path(file_id).open("rb")
        index = 0
        try:
            while block := await asyncio.to_thread(_read_lines, handle):
                for raw in block:
                    line = raw.strip()
                    if line:
                        yield index, line
                    index += 1
        finally:
            handle.close()

    async def delete(self, file_id: str) -> None:
        await asyncio.to_thread(self.path(file_id).unlink, missing_ok=True)

    def open_part(self, batch_id: str, generation: int, kind: str) -> PartWriter:
        """On the loop, not in a thread: an open() handed to a thread that is cancelled
        meanwhile would leave its file open (two syscalls on a local disk)."""
        path = self.part(batch_id, generation, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        return PartWriter(path.open("ab"))

    async def merge(
        self, batch_id: str, kind: str, file_id: str, keep: Callable[[str], bool]
    ) -> tuple[int, int]:
        """Every claim's ``kind`` parts of the batch (and the file itself, if an earlier
        merge wrote it) into one file: the lines whose output ``id`` ``keep`` accepts, each id
        once. Its size and line count."""
        parts_dir = self.root / "parts"

        def gather() -> list[Path]:
            parts = sorted(
                parts_dir.glob(f"{batch_id}.*.{kind}"), key=lambda p: int(p.suffixes[0][1:])
            )
            target = self.path(file_id)
            return [target, *parts] if target.exists() else parts

        sources = await asyncio.to_thread(gather)
        return await asyncio.to_thread(_merge, sources, self.path(file_id), keep)

    async def remove_parts(self, batch_id: str) -> None:
        def remove() -> None:
            for part in (self.root / "parts").glob(f"{batch_id}.*"):
                part.unlink(missing_ok=True)

        await asyncio.to_thread(remove)


class PartWriter:
    """One claim's output part: lines appended, flushed to disk by :meth:`sync`."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def write(self, line: bytes) -> None:
        self._handle.write(line + b"\n")  # buffered; sync() makes it durable

    async def sync(self) -> None:
        await asyncio.to_thread(_sync, self._handle)

    def close(self) -> None:
        """What is not synced yet is unmarked too: a later claim runs those lines again."""
        self._handle.close()


def _read_lines(handle: IO[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(LINES_PER_READ):
        line = handle.readline()
        if not line:
            break
        out.append(line)
    return out


def _sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _close_synced(handle: IO[bytes]) -> None:
    _sync(handle)
    handle.close()


def output_id_of(line: bytes) -> str | None:
    """An output line's ``id``: one per input line of a batch (runner.output_id)."""
    try:
        value = orjson.loads(line).get("id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _merge(sources: list[Path], target: Path, keep: Callable[[str], bool]) -> tuple[int, int]:
    seen: set[str] = set()
    size = lines = 0
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for source in sources:
            with source.open("rb") as handle:
                for raw in handle:
                    line = raw.rstrip(b"\n")
                    line_id = output_id_of(line) if line else None
                    if line_id is None or line_id in seen or not keep(line_id):
                        continue
                    seen.add(line_id)
                    out.write(line + b"\n")
                    size += len(line) + 1
                    lines += 1
        out.flush()
        os.fsync(out.fileno())
    partial.replace(target)
    return size, lines
