"""The memory plan against what llama.cpp itself allocates for the real default model.

llama.cpp logs each buffer it allocates when a context is created (model, repacked
weights, KV cache, output, compute). A subprocess creates the context the engine would
create for given settings (``engine_config`` → ``context_config`` → ``context_params``,
the engine's own functions) with llama.cpp's log on stderr; the plan must be within 10%
of each part and of the total.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backends.llama.backend import EmbeddedConfig, engine_config
from backends.llama.engine import context_config
from backends.llama.native import ContextConfig
from backends.model_store import default_model_path
from gateway.memory_plan import largest_slots, plan_embedded
from quantization.plan import (
    GiB,
    MiB,
    PlanError,
    parse_size,
    plan_gguf,
    plan_vllm,
    read_gguf,
    read_hf,
)

pytestmark = pytest.mark.integration
PROJECT = Path(__file__).resolve().parents[2]

# Creates one context with llama.cpp's own log on stderr (llama-cpp-python's default).
CREATE = """
import json, sys
import llama_cpp as C
from backends.llama.native import ContextConfig, context_params
path, config = sys.argv[1], ContextConfig(**json.loads(sys.argv[2]))
C.llama_backend_init()
model = C.llama_model_load_from_file(path.encode(), C.llama_model_default_params())
assert C.llama_init_from_model(model, context_params(config))
"""
BUFFER = re.compile(
    r"(CPU_Mapped model|CPU_REPACK model|output|KV|compute) buffer size =\s*([\d.]+) MiB"
)


def llama_cpp_reports(config: ContextConfig) -> dict[str, float]:
    fields = {
        f: getattr(config, f) for f in ("n_ctx", "n_seq_max", "n_batch", "threads", "swa_full")
    }
    done = subprocess.run(
        [sys.executable, "-c", CREATE, str(default_model_path(progress=False)), json.dumps(fields)],
        capture_output=True, text=True, cwd=PROJECT, timeout=120, check=True,
    )  # fmt: skip
    found: dict[str, float] = {}
    for kind, size in BUFFER.findall(done.stderr):
        found[kind] = found.get(kind, 0.0) + float(size) * MiB  # KV: one line per layer kind
    assert set(found) == {"CPU_Mapped model", "CPU_REPACK model", "output", "KV", "compute"}, (
        done.stderr[-2000:]
    )
    return found


def assert_close(planned: int, reported: float, what: str) -> None:
    assert abs(planned - reported) <= 0.10 * reported, (
        f"{what}: planned {planned}, llama.cpp {reported}"
    )


@pytest.mark.parametrize(
    "cfg",
    [
        EmbeddedConfig(context_length=2048, max_sequences=16),  # the defaults
        EmbeddedConfig(context_length=4096, max_sequences=3, prefill_chunk=512, prefix_cache="off"),
    ],
    ids=["2048x16-cache", "4096x3-nocache"],
)
def test_plan_matches_what_llama_cpp_allocates(cfg: EmbeddedConfig) -> None:
    gguf = read_gguf(default_model_path(progress=False))
    plan = plan_embedded(gguf, cfg)
    reported = llama_cpp_reports(
        context_config(engine_config(cfg), prefix_cache=cfg.prefix_cache != "off")
    )
    assert_close(plan.weights, reported["CPU_Mapped model"], "weights")
    assert_close(plan.repacked, reported["CPU_REPACK model"], "repacked")
    assert_close(plan.kv, reported["KV"], "KV cache")
    assert_close(plan.output, reported["output"], "output")
    assert_close(plan.compute, reported["compute"], "compute")
    assert_close(plan.total, sum(reported.values()), "total")


def test_sliding_window_layers_keep_only_their_window_without_swa_full() -> None:
    gguf = read_gguf(default_model_path(progress=False))
    assert sum(gguf.swa_layers) == 15 and gguf.sliding_window == 512  # Gemma 3: 5 of every 6
    config = ContextConfig(n_ctx=8192, n_seq_max=8, n_batch=512, threads=2, swa_full=False)
    plan = plan_gguf(gguf, n_ctx=8192, n_seq_max=8, n_batch=512, swa_full=False)
    assert plan.swa_cells == 512 * 8 + 512 < plan.kv_cells
    assert_close(plan.kv, llama_cpp_reports(config)["KV"], "KV cache (windowed)")


def test_largest_slots_is_the_last_that_fits() -> None:
    gguf = read_gguf(default_model_path(progress=False))
    cfg = EmbeddedConfig(context_length=4096, max_sequences=1)
    budget = 2 * GiB
    slots = largest_slots(gguf, cfg, budget)
    assert 1 <= slots < 256
    fits = plan_embedded(gguf, EmbeddedConfig(context_length=4096, max_sequences=slots))
    over = plan_embedded(gguf, EmbeddedConfig(context_length=4096, max_sequences=slots + 1))
    assert fits.total <= budget < over.total
    assert largest_slots(gguf, cfg, 100 * MiB) == 0  # the weights alone do not fit


def test_serve_refuses_a_config_that_cannot_fit(tmp_path: Path) -> None:
    config = tmp_path / "huge.yaml"
    config.write_text("models:\n  - {name: gemma, n_ctx: 32768, max_sequences: 256}\n")
    lockgate = Path(sys.executable).parent / "lockgate"
    done = subprocess.run(
        [str(lockgate), "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "the embedded models need 148,474.3 MiB" in done.stderr, done.stderr
    assert "fits" in done.stderr and "--skip-memory-check" in done.stderr
    assert "Traceback" not in done.stderr


def test_plan_command_prints_json_for_scripts() -> None:
    lockgate = Path(sys.executable).parent / "lockgate"
    done = subprocess.run(
        [str(lockgate), "plan", "--n-ctx", "1024", "--slots", "4", "--memory", "1GiB", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert result["kind"] == "gguf" and result["kv_bytes_per_token"] == 18 * 1024
    assert result["plan"]["kv"] == 1024 * 4 * 18 * 1024  # swa_full: every layer keeps all cells
    assert result["fits"] is True and result["max_slots"] >= 4


def test_vllm_directory_plan(tmp_path: Path) -> None:
    """A config.json as transformers writes Gemma 3 270M's, beside a weights file of a known
    size (zeros: only its size is read)."""
    config = {
        "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 18,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "hidden_size": 640, "sliding_window": 512, "torch_dtype": "bfloat16",
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    with (tmp_path / "model.safetensors").open("wb") as f:
        f.truncate(536 * MiB)
    hf = read_hf(tmp_path)
    assert hf.swa_layer_count == 15 and hf.kv_bytes_per_token(2) == 18 * 1024
    plan = plan_vllm(hf, n_ctx=4096, gpu_memory=24 * GiB, utilization=0.9)
    per_layer = 2 * 256 * 2
    assert plan.kv_per_sequence == per_layer * (3 * 4096 + 15 * 512)
    assert plan.kv_budget == int(24 * GiB * 0.9) - 536 * MiB - GiB
    assert plan.max_sequences == plan.kv_budget // plan.kv_per_sequence
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(PlanError, match=r"no \*\.safetensors"):
        read_hf(tmp_path)


@pytest.mark.parametrize(
    ("text", "size"),
    [("8GiB", 8 * GiB), ("512m", 512 * MiB), ("1.5 GB", int(1.5 * GiB)), ("4096", 4096)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "8XB", "-1G", "1e3G?"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(PlanError, match="not a size"):
        parse_size(text)
