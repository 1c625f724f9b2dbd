"""``lockgate plan``: will a model fit, and how many sequences of a context length will?

    lockgate plan                                  # the default model, default settings
    lockgate plan model.gguf --n-ctx 8192 --slots 4 --memory 8GiB
    lockgate plan ./hf-model-dir --n-ctx 4096 --gpu-memory 24GiB --json

A GGUF file is planned as the embedded engine would load it (one llama.cpp context of
``n_ctx`` x ``slots`` cells, prefix-cache sequence ids, steps of ``batch_tokens``); a
directory as vLLM would serve it (KV bytes per token, and the KV budget on a GPU).
Nothing is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from backends.llama.backend import EmbeddedConfig
from backends.model_store import ModelFileError, resolve_model_path
from gateway.memory_plan import largest_slots, plan_embedded
from quantization.plan import (
    PlanError,
    available_memory,
    mib,
    parse_size,
    plan_vllm,
    read_gguf,
    read_hf,
)

quantize = typer.Typer(
    no_args_is_help=True,
    help="Offline GGUF tools: the quantization ladder (quality, speed and memory per type).",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@quantize.command("ladder")
def ladder(
    source: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a GGUF file")],
    types: Annotated[str, typer.Option(help="comma-separated llama-quantize types")] = (
        "q8_0,q6_k,q5_k_m,q4_k_m,q4_0,q3_k_m,q2_k"
    ),
    imatrix: Annotated[bool, typer.Option(help="also with an importance matrix")] = False,
    out: Annotated[Path, typer.Option(help="where the files and the report go")] = Path(
        "quantize-ladder"
    ),
    llama_bin: Annotated[Path | None, typer.Option(help="llama.cpp's tools")] = None,
    repeats: Annotated[
        int, typer.Option(min=1, help="speed runs per variant (the median is reported)")
    ] = 3,
) -> None:
    """Quantize SOURCE to each type and measure each: size, KLD, PPL, speed, memory."""
    from quantization.ladder import LadderConfig, LadderError
    from quantization.ladder import ladder as run_ladder

    chosen = tuple(t.strip().lower() for t in types.split(",") if t.strip())
    try:
        run_ladder(LadderConfig(source, chosen, out, imatrix, bin_dir=llama_bin, repeats=repeats))
    except LadderError as exc:
        typer.echo(f"lockgate: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo((out / "ladder.md").read_text())


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except PlanError as exc:
        raise typer.BadParameter(str(exc)) from None


def plan(
    model: Annotated[
        Path | None,
        typer.Argument(
            help="a GGUF file or a Hugging Face model directory (default: the packaged model)"
        ),
    ] = None,
    n_ctx: Annotated[int, typer.Option(min=1, help="context per sequence")] = 2048,
    slots: Annotated[
        int, typer.Option(min=1, max=256, help="sequences at once (max_sequences)")
    ] = 16,
    memory: Annotated[
        str | None, typer.Option(help="memory budget, e.g. 8GiB (default: what is available now)")
    ] = None,
    prefix_cache: Annotated[bool, typer.Option(help="prefix-cache sequence ids (GGUF)")] = True,
    gpu_memory: Annotated[str, typer.Option(help="GPU memory (vLLM directory)")] = "24GiB",
    gpu_memory_utilization: Annotated[float, typer.Option(help="vLLM's share of it")] = 0.9,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts")] = False,
) -> None:
    """How much memory a model needs at a context length and sequence count (nothing loaded)."""
    try:
        if model is not None and model.is_dir():
            result = _plan_hf(model, n_ctx, _size(gpu_memory) or 0, gpu_memory_utilization)
        else:
            path = resolve_model_path(str(model) if model is not None else None, progress=False)
            budget = _size(memory) or available_memory()
            result = _plan_gguf(path, n_ctx, slots, budget, prefix_cache)
    except (PlanError, ModelFileError) as exc:
        typer.echo(f"lockgate: {exc}", err=True)
        raise typer.Exit(2) from None
    text = result.pop("text")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for key, value in text:
        typer.echo(f"{key:<11}{value}")


def _plan_gguf(path: Path, n_ctx: int, slots: int, budget: int, cache: bool) -> dict[str, Any]:
    gguf = read_gguf(path)
    cfg = EmbeddedConfig(
        path=str(path), context_length=n_ctx, max_sequences=slots,
        prefix_cache="shared" if cache else "off",
    )  # fmt: skip
    p = plan_embedded(gguf, cfg)
    per_token = gguf.kv_bytes_per_cell(swa=False) + gguf.kv_bytes_per_cell(swa=True)
    fits = largest_slots(gguf, cfg, budget)
    windowed = sum(gguf.swa_layers)
    layers = f"{gguf.n_layer} layers" + (
        f", {windowed} with a {gguf.sliding_window}-token window" if windowed else ""
    )
    text = [
        ("model", f"{path} ({gguf.architecture}, {layers})"),
        ("settings", f"n_ctx {n_ctx} per sequence x {slots} sequences, prefix cache "
                     f"{'on' if cache else 'off'}"),
        ("weights", f"{mib(p.weights)}" + (f" + {mib(p.repacked)} repacked" if p.repacked else "")),
        ("KV cache", f"{mib(p.kv)}: {p.kv_cells:,} cells x {per_token / 1024:.1f} KiB per token"
                     f" ({mib(per_token * n_ctx)} per sequence of {n_ctx})"),
        ("output", mib(p.output)),
        ("compute", mib(p.compute)),
        ("total", mib(p.total)),
        ("fits", f"{fits} sequences of {n_ctx} within {mib(budget)}"
                 + ("" if fits >= slots else f": {slots} do NOT fit")),
    ]  # fmt: skip
    if gguf.n_ctx_train and n_ctx > gguf.n_ctx_train:
        text.append(("warning", f"n_ctx {n_ctx} exceeds the model's {gguf.n_ctx_train}"))
    return {
        "kind": "gguf",
        "model": str(path),
        "architecture": gguf.architecture,
        "n_ctx": n_ctx,
        "slots": slots,
        "plan": {**asdict(p), "total": p.total},
        "kv_bytes_per_token": per_token,
        "budget": budget,
        "max_slots": fits,
        "fits": fits >= slots,
        "text": text,
    }


def _plan_hf(directory: Path, n_ctx: int, gpu: int, utilization: float) -> dict[str, Any]:
    hf = read_hf(directory)
    p = plan_vllm(hf, n_ctx=n_ctx, gpu_memory=gpu, utilization=utilization)
    text = [
        ("model", f"{directory} ({hf.architecture}, {hf.n_layer} layers, {hf.dtype})"),
        ("weights", mib(p.weights)),
        ("KV cache", f"{p.kv_per_token / 1024:.1f} KiB per token, {mib(p.kv_per_sequence)} per "
                     f"sequence of {n_ctx}"),
        ("budget", f"{mib(p.kv_budget)} for KV on {mib(gpu)} at {utilization:.2f} (less weights"
                   " and ~1 GiB of activations and CUDA graphs)"),
        ("fits", f"{p.max_sequences} sequences of {n_ctx} at once"),
    ]  # fmt: skip
    return {"kind": "vllm", "model": str(directory), "n_ctx": n_ctx, "plan": asdict(p),
            "gpu_memory": gpu, "text": text}  # fmt: skip
