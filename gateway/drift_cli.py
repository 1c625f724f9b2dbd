"""``lockgate drift report|pin``: a model's drift signals from a running gateway.

    lockgate drift report --model gemma --png drift.png
    lockgate drift pin --model gemma        # the current window becomes the reference

They use the admin API (``/admin/drift/{model}``) with the admin key in
``$LOCKGATE_AUTH__ADMIN_KEY``, like ``lockgate tenants``.
"""

from __future__ import annotations

from pathlib import Path
from statistics import fmean, median
from typing import Annotated, Any
from urllib.parse import quote

import typer

from gateway.admin_cli import DEFAULT_URL, Url, call
from gateway.drift import CATEGORICAL, NUMERIC

drift = typer.Typer(
    no_args_is_help=True,
    help="Is a model answering as it did? Its drift signals (README: Drift).",
    context_settings={"help_option_names": ["-h", "--help"]},
)

Model = Annotated[str, typer.Option("--model", "-m", help="the public model name")]


def verdict(test: str, value: float) -> str:
    """The usual reading of a score: PSI 0.1 / 0.25, JS 0.05 / 0.1."""
    low, high = (0.1, 0.25) if test == "psi" else (0.05, 0.1)
    return "stable" if value < low else "moderate" if value < high else "significant"


def _summary(name: str, values: list[Any]) -> str:
    if not values:
        return "-"
    if name in NUMERIC:
        return f"mean {fmean(values):.3g}, median {median(values):.3g}"
    top = max(set(values), key=values.count)
    return f"{top} {values.count(top) / len(values):.0%}"


def table(report: dict[str, Any]) -> str:
    scores = {s["feature"]: (s["test"], s["value"]) for s in report["scores"]}
    ref, cur = report["reference"], report["current"]
    rows = [("feature", "test", "score", "reading", "reference", "current")]
    for name in (*NUMERIC, *CATEGORICAL):
        test, value = scores.get(name, ("psi" if name in NUMERIC else "js", None))
        rows.append(
            (
                name,
                test,
                "-" if value is None else f"{value:.3f}",
                "not enough requests" if value is None else verdict(test, value),
                _summary(name, ref[name]),
                _summary(name, cur[name]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    head = (
        f"model {report['model']} ({report['version']}): reference "
        f"{len(ref['prompt_tokens'])} requests, current {len(cur['prompt_tokens'])}"
    )
    return "\n".join([head, *lines])


def plot(report: dict[str, Any], path: Path) -> None:
    """Each feature's distribution, reference against current."""
    try:
        import matplotlib
    except ImportError:
        typer.echo("lockgate: --png needs matplotlib: pip install 'lockgate[bench]'", err=True)
        raise typer.Exit(2) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = (*NUMERIC, *CATEGORICAL)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, name in zip(axes.flat, names, strict=False):
        ref, cur = report["reference"][name], report["current"][name]
        if name in NUMERIC:
            both = ref + cur
            if both:
                bins = 20 if max(both) > min(both) else 1
                ax.hist([ref, cur], bins=bins, density=True, label=["reference", "current"])
        else:
            cats = sorted(set(ref) | set(cur))
            share = [[v.count(c) / len(v) if v else 0 for c in cats] for v in (ref, cur)]
            x = range(len(cats))
            ax.bar([i - 0.2 for i in x], share[0], width=0.4, label="reference")
            ax.bar([i + 0.2 for i in x], share[1], width=0.4, label="current")
            ax.set_xticks(list(x), cats)
        ax.set_title(name)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle(f"Drift of {report['model']}: reference vs current window")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@drift.command()
def report(
    model: Model,
    png: Annotated[Path | None, typer.Option(help="write the distributions here")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Print the model's drift table (and plot its distributions)."""
    data = call(url, "GET", f"/admin/drift/{quote(model, safe='')}")
    typer.echo(table(data))
    if png is not None:
        plot(data, png)
        typer.echo(f"wrote {png}")


@drift.command()
def pin(model: Model, url: Url = DEFAULT_URL) -> None:
    """Make the current window the model's reference (after a deliberate change)."""
    typer.echo(table(call(url, "POST", f"/admin/drift/{quote(model, safe='')}/pin")))
