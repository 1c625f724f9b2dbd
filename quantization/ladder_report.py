"""The ladder's report: ``ladder.json``, a Markdown table and a plot with the Pareto front.

A variant is on the Pareto front when no other variant is both smaller and closer to the
reference (lower mean KL divergence): the only sizes worth choosing between.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MiB = 1 << 20


def pareto(variants: Sequence[dict[str, Any]]) -> set[str]:
    """Names of the measured variants that no other beats on both size and mean KLD."""
    measured = [v for v in variants if "kld_mean" in v["measures"]]
    return {
        v["name"]
        for v in measured
        if not any(
            o["size"] <= v["size"]
            and o["measures"]["kld_mean"] <= v["measures"]["kld_mean"]
            and (o["size"], o["measures"]["kld_mean"]) != (v["size"], v["measures"]["kld_mean"])
            for o in measured
        )
    }


def markdown(report: dict[str, Any]) -> str:
    front = pareto(report["variants"])
    relative = report["relative_to"]
    warning = f" **Every KLD, PPL and top-token figure is relative to the {relative}.**"
    lines = [
        f"Quantization ladder of `{Path(report['source']).name}` ({report['parameters']:,} "
        f"parameters, {report['threads']} threads).",
        "",
        f"Reference: {report['reference']}." + (warning if relative else ""),
        f"KLD over `{Path(report['evaluation_text']).name}` in chunks of "
        f"{report['kld_context']} tokens; speed from llama-batched-bench "
        f"({report['bench']['prompt_tokens']} prompt + {report['bench']['generated_tokens']} "
        "generated tokens per sequence; the median of "
        f"{report['bench'].get('repeats', 1)} runs). * = on the Pareto front (size vs mean KLD).",
        "",
        "| variant | size MiB | bits/weight | mean KLD | p99 KLD | PPL | ΔPPL | same top | "
        "pp tok/s x1 | tg tok/s x1 | pp tok/s x16 | tg tok/s x16 | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report["variants"]:
        m = v["measures"]
        quality = (
            f"{m['kld_mean']:.4f} | {m['kld_p99']:.3f} | {m['ppl']:.2f} | {m['ppl_delta']:+.2f} | "
            f"{m['same_top']:.1%}"
            if "kld_mean" in m
            else f"0 | 0 | {m.get('ppl', float('nan')):.2f} | 0 | 100%"
        )
        mark = " *" if v["name"] in front else ""
        lines.append(
            f"| {v['name']}{mark} | {v['size'] / MiB:.1f} | {v['bits_per_weight']:.2f} | "
            f"{quality} | {m['pp_1']:.0f} | {m['tg_1']:.1f} | {m['pp_16']:.0f} | "
            f"{m['tg_16']:.1f} | {m['peak_rss'] / MiB:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """KLD vs size and tokens/s vs size; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = report["variants"]
    front = pareto(variants)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    measured = [v for v in variants if "kld_mean" in v["measures"]]
    for v in measured:
        x, y = v["size"] / MiB, v["measures"]["kld_mean"]
        left.scatter(x, y, color="tab:red" if v["name"] in front else "tab:gray")
        left.annotate(v["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    on_front = sorted((v["size"] / MiB, v["measures"]["kld_mean"]) for v in measured
                      if v["name"] in front)  # fmt: skip
    if on_front:
        left.plot(*zip(*on_front, strict=True), color="tab:red", label="Pareto front")
        left.legend()
    left.set(xlabel="size (MiB)", ylabel="mean KL divergence (log)", yscale="log")
    relative = report["relative_to"]
    left.set_title("quality vs size" + (f" (vs {relative})" if relative else ""), fontsize=9)
    for key, label in (("tg_1", "generation, 1 seq"), ("tg_16", "generation, 16 seqs"),
                       ("pp_16", "prompt, 16 seqs")):  # fmt: skip
        points = sorted((v["size"] / MiB, v["measures"][key], v["name"]) for v in variants)
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    right.set(xlabel="size (MiB)", ylabel="tokens/s (log)", yscale="log")
    right.set_title("speed vs size", fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(f"{Path(report['source']).name}: quantization ladder", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(report: dict[str, Any], out: Path) -> None:
    (out / "ladder.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "ladder.md").write_text(markdown(report))
    plot(report, out / "ladder.png")
