"""The memory an embedded model will take, before it is loaded.

``lockgate plan`` prints it; ``lockgate serve`` refuses, with the numbers, a configuration
whose embedded models cannot fit the memory this process may still allocate, instead of
failing later inside llama.cpp. The sizes come from :mod:`quantization.plan` (the GGUF's
metadata); the llama.cpp context is the one the engine makes for these settings
(:func:`backends.llama.engine.context_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from backends.llama.backend import EmbeddedConfig, engine_config
from backends.llama.engine import MAX_SEQUENCE_IDS, context_config
from gateway.settings import ModelSettings
from quantization.plan import (
    GGUFModel,
    GGUFPlan,
    PlanError,
    available_memory,
    mib,
    plan_gguf,
    read_gguf,
)


def embedded_config(model: ModelSettings) -> EmbeddedConfig:
    return EmbeddedConfig(
        path=model.path,
        context_length=model.n_ctx,
        max_sequences=model.max_sequences,
        threads=model.threads,
        template=model.template,
        prefill_chunk=model.prefill_chunk,
        background_prefill=model.background_prefill,
        default_top_k=model.default_top_k,
        prefix_cache=model.prefix_cache,
    )


def plan_embedded(gguf: GGUFModel, cfg: EmbeddedConfig) -> GGUFPlan:
    engine = engine_config(cfg)
    ctx = context_config(engine, prefix_cache=engine.prefix_cache)
    return plan_gguf(
        gguf, n_ctx=ctx.n_ctx, n_seq_max=ctx.n_seq_max, n_batch=ctx.n_batch, swa_full=ctx.swa_full
    )


def largest_slots(gguf: GGUFModel, cfg: EmbeddedConfig, memory: int) -> int:
    """The most sequences (``max_sequences``) of this context length that fit ``memory``;
    0 if not even one does."""
    best = 0
    for slots in range(1, MAX_SEQUENCE_IDS + 1):  # the total grows with the slots
        if plan_embedded(gguf, replace(cfg, max_sequences=slots)).total > memory:
            break
        best = slots
    return best


@dataclass(frozen=True, slots=True)
class Planned:
    name: str
    gguf: GGUFModel
    cfg: EmbeddedConfig
    plan: GGUFPlan


def shortfall(planned: Sequence[Planned], available: int) -> str | None:
    """Why these models cannot all be loaded within ``available`` bytes, or None."""
    need = sum(p.plan.total for p in planned)
    if need <= available:
        return None
    lines = [f"the embedded models need {mib(need)}; this process may allocate {mib(available)}"]
    for p in planned:
        lines.append(
            f"  model '{p.name}': {mib(p.plan.total)} (weights {mib(p.plan.weights)}, KV cache "
            f"{mib(p.plan.kv)} for n_ctx {p.cfg.context_length} x {p.cfg.max_sequences} "
            f"sequences, compute {mib(p.plan.compute)})"
        )
    alone = available - (need - planned[-1].plan.total)
    slots = largest_slots(planned[-1].gguf, planned[-1].cfg, alone) if alone > 0 else 0
    lines.append(
        f"  lower n_ctx or max_sequences (model '{planned[-1].name}' fits {slots} sequences of "
        f"{planned[-1].cfg.context_length} here; `lockgate plan` shows more), or pass "
        "--skip-memory-check"
    )
    return "\n".join(lines)


def cannot_load(models: Sequence[tuple[ModelSettings, Path]]) -> str | None:
    """Why these embedded models (each with its GGUF file) cannot all be loaded in the
    memory this process may still allocate, or None. Reads GGUF headers: run it off
    the event loop."""
    planned = []
    for model, path in models:
        try:
            gguf = read_gguf(path)
        except PlanError as exc:
            return f"model '{model.name}': {exc}"
        cfg = embedded_config(model)
        planned.append(Planned(model.name, gguf, cfg, plan_embedded(gguf, cfg)))
    return shortfall(planned, available_memory()) if planned else None
