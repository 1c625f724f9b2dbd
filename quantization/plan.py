"""Will it fit? Memory for a model and its KV cache, from the model's metadata alone.

Two kinds of model:

* a GGUF file served by llama.cpp (:func:`read_gguf`, then :func:`plan_gguf`): weights, the
  KV cache, the output (logits) buffer and the compute buffer, as llama.cpp sizes them for
  one context of ``n_ctx`` cells shared by ``n_seq_max`` sequences (a unified KV cache);
* a Hugging Face model directory served by vLLM (:func:`read_hf`, then :func:`plan_vllm`):
  weights from the safetensors files, KV bytes per token, and the KV budget vLLM leaves
  on a GPU of a given size at ``--gpu-memory-utilization``.

Nothing is loaded: the GGUF header is memory-mapped and read, ``config.json`` is parsed.

How llama.cpp sizes each part (read off its start-up log for Gemma 3 270M at several
settings; ``tests/quantization/test_plan.py`` checks the plan against that log):

* weights: the tensors' bytes (the file less its header), plus a second copy of the
  matrices the CPU backend repacks for its faster kernels (Q4_0, Q4_K and IQ4_NL matrices
  other than the token embedding, on x86 and ARM);
* KV cache: per cell and layer, ``n_head_kv * key_length`` keys and ``n_head_kv *
  value_length`` values at 2 bytes (f16). ``n_ctx`` is rounded up to 256 cells. Layers with
  a sliding window keep every cell only with ``swa_full``; otherwise ``n_swa * n_seq_max +
  n_ubatch`` cells (rounded up to 256), at most ``n_ctx``;
* output buffer: one row of ``n_vocab`` float32 logits per sequence;
* compute buffer: the largest intermediate of one ``n_ubatch`` step. With flash attention
  (llama.cpp's default on CPU) that is the logits of every token of the step, ``n_ubatch *
  (n_vocab + 2 * n_embd)`` float32, unless the feed-forward activations are larger.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantization.gguf_header import Array, HeaderError, read_header

MiB = 1 << 20
GiB = 1 << 30
CELL_PAD = 256  # llama.cpp rounds n_ctx and the SWA cache up to this many cells
KV_BYTES = 2  # f16 keys and values, llama.cpp's default cache type
FLOAT = 4
# Every n-th layer attends globally, the others within the window. llama.cpp hard-codes
# these per architecture (llama-model.cpp, set_swa_pattern); a GGUF may also say so.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4}
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB,
          "mib": MiB, "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}  # fmt: skip


class PlanError(ValueError):
    """A model that cannot be read, or settings that make no sense."""


def parse_size(text: str) -> int:
    """``8GiB``, ``512m``, ``1.5 GB`` → bytes (binary units, as memory is sold and shown)."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("kmgtib")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise PlanError(f"not a size: {text!r} (try 8GiB or 512MiB)") from None
    if unit not in _UNITS or value < 0:
        raise PlanError(f"not a size: {text!r} (try 8GiB or 512MiB)")
    return int(value * _UNITS[unit])


def mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


def _pad(n: int, to: int = CELL_PAD) -> int:
    return -(-n // to) * to


@dataclass(frozen=True, slots=True)
class GGUFModel:
    """What memory depends on, read from a GGUF header."""

    path: Path
    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    sliding_window: int  # 0: none
    swa_layers: tuple[bool, ...]  # per layer: attends within the window
    weight_bytes: int
    repack_bytes: int
    file_bytes: int

    def kv_bytes_per_cell(self, *, swa: bool) -> int:
        """KV bytes one cell takes over the layers with (or without) a sliding window."""
        return sum(
            heads * (self.key_length + self.value_length) * KV_BYTES
            for heads, windowed in zip(self.n_head_kv, self.swa_layers, strict=True)
            if windowed == swa
        )


def _length(array: object) -> int:
    return array.count if isinstance(array, Array) else len(array)  # type: ignore[arg-type]


def read_gguf(path: Path) -> GGUFModel:
    """The shape of a GGUF model, from its header (tensors are not read)."""
    from gguf.constants import GGMLQuantizationType

    try:
        header = read_header(path)
    except (OSError, HeaderError) as exc:
        raise PlanError(f"{path}: not a readable GGUF file ({exc})") from None

    def field(key: str, default: Any = None) -> Any:
        found = header.fields.get(key)
        if found is None:
            if default is None:
                raise PlanError(f"{path}: the GGUF has no {key}")
            return default
        return found

    arch = str(field("general.architecture"))
    n_layer = int(field(f"{arch}.block_count"))
    n_embd = int(field(f"{arch}.embedding_length"))
    n_head = field(f"{arch}.attention.head_count")
    heads_kv = field(f"{arch}.attention.head_count_kv", n_head)
    per_layer = (
        tuple(int(h) for h in heads_kv)
        if isinstance(heads_kv, list)
        else (int(heads_kv),) * n_layer
    )
    head_dim = n_embd // (int(n_head[0]) if isinstance(n_head, list) else int(n_head))
    window = int(field(f"{arch}.attention.sliding_window", 0))
    pattern = int(field(f"{arch}.attention.sliding_window_pattern", SWA_PATTERNS.get(arch, 1)))
    # pattern n: layers i with i % n < n - 1 use the window (1: every layer, if it has one)
    swa = tuple(window > 0 and (pattern == 1 or i % pattern < pattern - 1) for i in range(n_layer))
    tokens = header.fields.get("tokenizer.ggml.tokens")
    weights = sum(t.n_bytes for t in header.tensors)
    repack = sum(
        t.n_bytes
        for t in header.tensors
        if GGMLQuantizationType(t.type).name in REPACKED_TYPES and t.name != "token_embd.weight"
    )
    return GGUFModel(
        path=path,
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=int(field(f"{arch}.feed_forward_length", 4 * n_embd)),
        n_vocab=_length(tokens) if tokens is not None else int(field(f"{arch}.vocab_size")),
        n_ctx_train=int(field(f"{arch}.context_length", 0)),
        n_head_kv=per_layer,
        key_length=int(field(f"{arch}.attention.key_length", head_dim)),
        value_length=int(field(f"{arch}.attention.value_length", head_dim)),
        sliding_window=window,
        swa_layers=swa,
        weight_bytes=weights,
        repack_bytes=repack,
        file_bytes=path.stat().st_size,
    )


@dataclass(frozen=True, slots=True)
class GGUFPlan:
    """Bytes llama.cpp allocates for one context; ``total`` is what must fit."""

    weights: int
    repacked: int
    kv_cells: int
    swa_cells: int
    kv: int
    output: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.repacked + self.kv + self.output + self.compute


def plan_gguf(
    model: GGUFModel, *, n_ctx: int, n_seq_max: int, n_batch: int, swa_full: bool
) -> GGUFPlan:
    """llama.cpp's allocation for a context of ``n_ctx`` cells (all sequences together),
    ``n_seq_max`` sequence ids and steps of ``n_batch`` tokens (``n_ubatch`` = ``n_batch``)."""
    if min(n_ctx, n_seq_max, n_batch) < 1:
        raise PlanError("n_ctx, the sequences and the batch must each be at least 1")
    cells = _pad(n_ctx)
    swa_cells = cells if swa_full else min(cells, _pad(model.sliding_window * n_seq_max + n_batch))
    kv = cells * model.kv_bytes_per_cell(swa=False) + swa_cells * model.kv_bytes_per_cell(swa=True)
    logits = n_batch * (model.n_vocab + 2 * model.n_embd) * FLOAT
    feed_forward = n_batch * (2 * model.n_ff + 2 * model.n_embd) * FLOAT
    return GGUFPlan(
        weights=model.weight_bytes,
        repacked=model.repack_bytes,
        kv_cells=cells,
        swa_cells=swa_cells,
        kv=kv,
        output=n_seq_max * model.n_vocab * FLOAT,
        compute=max(logits, feed_forward),
    )


@dataclass(frozen=True, slots=True)
class HFModel:
    """What vLLM's memory depends on, from ``config.json`` and the safetensors sizes."""

    path: Path
    architecture: str
    n_layer: int
    n_head_kv: int
    head_dim: int
    sliding_window: int  # 0: none
    swa_layer_count: int
    dtype: str
    weight_bytes: int

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.n_layer * self.n_head_kv * self.head_dim * dtype_bytes


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "float8": 1}


def read_hf(directory: Path) -> HFModel:
    """The shape of a Hugging Face model directory (``config.json``, ``*.safetensors``)."""
    config_file = directory / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"{config_file}: not a readable model config ({exc})") from None
    text = config.get("text_config", config)  # multimodal configs nest the language model
    try:
        n_layer = int(text["num_hidden_layers"])
        n_head = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // n_head)
        n_head_kv = int(text.get("num_key_value_heads") or n_head)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"{config_file}: missing or bad {exc}") from None
    layer_types: Sequence[str] = text.get("layer_types") or ()
    window = int(text.get("sliding_window") or 0)
    swa_count = sum(1 for t in layer_types if t == "sliding_attention") if window else 0
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    if not weights:
        raise PlanError(f"{directory}: no *.safetensors weights")
    dtype = str(text.get("torch_dtype") or config.get("torch_dtype") or "bfloat16")
    return HFModel(
        path=directory,
        architecture=(config.get("architectures") or ["?"])[0],
        n_layer=n_layer,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        sliding_window=window,
        swa_layer_count=swa_count,
        dtype=dtype,
        weight_bytes=weights,
    )


@dataclass(frozen=True, slots=True)
class VLLMPlan:
    weights: int
    kv_per_token: int
    kv_per_sequence: int  # n_ctx tokens, sliding-window layers holding only their window
    kv_budget: int  # what vLLM's KV cache gets on that GPU
    max_sequences: int  # of n_ctx tokens each that the budget holds at once


def plan_vllm(
    model: HFModel,
    *,
    n_ctx: int,
    gpu_memory: int,
    utilization: float = 0.9,
    kv_dtype: str | None = None,
    overhead: int = GiB,
) -> VLLMPlan:
    """vLLM's KV budget: ``utilization`` of the GPU, less the weights and ``overhead`` (the
    activation peak vLLM measures at start-up, plus CUDA graphs; 1 GiB is a typical figure
    for a small model at the default batch — vLLM logs the real one)."""
    if not 0 < utilization <= 1:
        raise PlanError("--gpu-memory-utilization must be in (0, 1]")
    dtype_bytes = _DTYPE_BYTES.get(kv_dtype or model.dtype, 2)
    per_layer = 2 * model.n_head_kv * model.head_dim * dtype_bytes
    full_layers = model.n_layer - model.swa_layer_count
    window = min(n_ctx, model.sliding_window) if model.swa_layer_count else 0
    per_sequence = per_layer * (full_layers * n_ctx + model.swa_layer_count * window)
    budget = max(0, int(gpu_memory * utilization) - model.weight_bytes - overhead)
    return VLLMPlan(
        weights=model.weight_bytes,
        kv_per_token=model.kv_bytes_per_token(dtype_bytes),
        kv_per_sequence=per_sequence,
        kv_budget=budget,
        max_sequences=budget // per_sequence if per_sequence else 0,
    )


def available_memory() -> int:
    """Bytes this process may still allocate: the machine's available memory, or less
    where a cgroup (a container's memory limit) caps it."""
    found = math.inf
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except OSError:
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            found = min(found, int(limit) - used)
    except (OSError, ValueError):
        pass
    if found is math.inf:  # neither is readable (not Linux): what the machine has
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return int(pages * size)
    return int(found)
