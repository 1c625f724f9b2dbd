"""Merging a batch's output parts (gateway/batch/files.py): one output per line, of its kind."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.batch.files import FileStorage


def part(files: FileStorage, generation: int, kind: str, lines: list[tuple[int, bool]]) -> None:
    path = files.part("batch_x", generation, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for index, ok in lines:
            f.write(json.dumps({"id": f"batch_req_x_{index}", "ok": ok}) + "\n")


async def test_a_line_rerun_after_a_crash_appears_once_in_the_file_its_mark_names(
    tmp_path: Path,
) -> None:
    files = FileStorage(tmp_path)
    # Claim 1 wrote line 1 as an error and died before marking it; claim 2 ran it again
    # and it succeeded (and was marked ok). Line 0 was written twice, ok both times.
    part(files, 1, "out", [(0, True)])
    part(files, 1, "err", [(1, False)])
    part(files, 2, "out", [(0, True), (1, True), (2, True)])
    marks = {0: True, 1: True, 2: True}

    def keep(ok: bool) -> object:
        return lambda line_id: marks.get(int(line_id.rsplit("_", 1)[1])) is ok

    assert await files.merge("batch_x", "out", "file-out", keep(True)) == (
        files.path("file-out").stat().st_size,
        3,
    )
    assert await files.merge("batch_x", "err", "file-err", keep(False)) == (0, 0)
    ids = [json.loads(x)["id"] for x in files.path("file-out").read_text().splitlines()]
    assert ids == ["batch_req_x_0", "batch_req_x_1", "batch_req_x_2"]
    # Merging again (a finalize resumed after a crash) changes nothing.
    assert (await files.merge("batch_x", "out", "file-out", keep(True)))[1] == 3
