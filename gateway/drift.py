"""Drift signals per model: is the model answering as it did?

Each finished generation gives a few cheap features, computed inline from what the
service already has: prompt and completion tokens and the time to first token
(numbers); the finish reason, an empty answer, a refusal (a pattern on the first
characters of the answer) and, under a JSON response format, whether the answer
parses (categories). Per model, the first ``reference_size`` requests after a model
version appears (its instances' identities) are its reference; the last
``window_size`` are the current window. They are compared with the population
stability index for numbers (bins: the reference's deciles) and the Jensen-Shannon
divergence (base 2, 0 to 1) for categories, once both hold ``min_requests``.

Rules of thumb (README: Drift): PSI under 0.1 is stable, 0.1-0.25 a moderate shift,
over 0.25 a significant one; JS over 0.1 deserves a look. ``pin`` makes the current
window the reference (after a deliberate change).

    tracker = DriftTracker(settings.drift)
    tracker.observe("gemma", version, Features.of(...))
    tracker.scores("gemma")   # [(feature, test, value)], [] until there is enough
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import DriftSettings

NUMERIC = ("prompt_tokens", "completion_tokens", "ttft_seconds")
CATEGORICAL = ("finish_reason", "empty", "refusal", "json_valid")
# How much of an answer the refusal pattern sees: refusals come first.
REFUSAL_PREFIX = 200
_EPSILON = 1e-4  # an empty bin's share, so that PSI stays finite
RESOLUTION = 0.05  # of the reference's median: the finest difference PSI's bins resolve


@dataclass(frozen=True, slots=True)
class Features:
    prompt_tokens: int
    completion_tokens: int
    ttft_seconds: float
    finish_reason: str
    empty: str  # "yes" | "no"
    refusal: str  # "yes" | "no"
    json_valid: str | None  # "yes" | "no" under a JSON response format, else None

    def number(self, name: str) -> float:
        return float(getattr(self, name))

    def category(self, name: str) -> str | None:
        value: str | None = getattr(self, name)
        return value


def features(
    *,
    prompt_tokens: int,
    completion_tokens: int,
    ttft_seconds: float,
    finish_reason: str | None,
    text: str,
    json_mode: bool,
    refusal: re.Pattern[str],
) -> Features:
    """The features of one answer (``text``: the first choice's, as generated)."""
    json_valid = None
    if json_mode:
        import orjson

        try:
            orjson.loads(text)
            json_valid = "yes"
        except orjson.JSONDecodeError:
            json_valid = "no"
    return Features(
        prompt_tokens,
        completion_tokens,
        ttft_seconds,
        finish_reason or "none",
        "yes" if not text.strip() else "no",
        "yes" if refusal.search(text[:REFUSAL_PREFIX]) else "no",
        json_valid,
    )


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference``."""
    import numpy as np  # on the scrape, not at import: the CLI only needs the names

    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    deciles = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    # Edges closer than 5% of the reference's median are merged: on a tight distribution
    # (a TTFT of 55 +- 1 ms) deciles a fraction of a millisecond apart would make noise
    # look like a shift. A real 10% move still crosses a bin.
    tolerance = RESOLUTION * max(abs(float(np.median(ref))), 1e-9)
    kept: list[float] = []
    for edge in deciles:
        if not kept or edge - kept[-1] >= tolerance:
            kept.append(float(edge))
    edges = np.asarray(kept)
    # Bins (-inf, e1], (e1, e2]... (ek, inf) between the reference's deciles: values
    # beyond its range count, and a constant reference still has a bin of its own.
    ref_share = np.bincount(np.searchsorted(edges, ref, side="left"), minlength=len(edges) + 1)
    cur_share = np.bincount(np.searchsorted(edges, cur, side="left"), minlength=len(edges) + 1)
    p = np.maximum(ref_share / len(ref), _EPSILON)
    q = np.maximum(cur_share / len(cur), _EPSILON)
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(reference: Iterable[str], current: Iterable[str]) -> float:
    """Jensen-Shannon divergence (base 2: 0 alike, 1 disjoint) of two category samples."""
    p, q = Counter(reference), Counter(current)
    n_p, n_q = sum(p.values()), sum(q.values())
    total = 0.0
    for key in p.keys() | q.keys():
        a, b = p[key] / n_p, q[key] / n_q
        m = (a + b) / 2
        if a:
            total += a * math.log2(a / m) / 2
        if b:
            total += b * math.log2(b / m) / 2
    return max(0.0, min(1.0, total))


@dataclass(slots=True)
class _Model:
    version: str
    reference: list[Features] = field(default_factory=list)
    current: deque[Features] = field(default_factory=deque)


class DriftTracker:
    """The reference and current windows of every model, and their scores."""

    def __init__(self, settings: DriftSettings) -> None:
        self.settings = settings
        self.refusal = re.compile(settings.refusal_pattern)
        self._models: dict[str, _Model] = {}
        self._versions: dict[tuple[int, ...], str] = {}

    def configure(self, settings: DriftSettings) -> None:
        """A reload: new window sizes and refusal pattern; what was seen is kept (the
        windows cut to their new sizes)."""
        self.settings = settings
        self.refusal = re.compile(settings.refusal_pattern)
        for m in self._models.values():
            del m.reference[settings.reference :]
            m.current = deque(m.current, maxlen=settings.window)

    def observe(self, model: str, version: str, f: Features) -> None:
        m = self._models.get(model)
        if m is None or m.version != version:  # a new model version: a new reference
            m = self._models[model] = _Model(version, current=deque(maxlen=self.settings.window))
        if len(m.reference) < self.settings.reference:
            m.reference.append(f)
        m.current.append(f)

    def version(self, instances: Sequence[Any]) -> str:
        """What identifies a model's version: its instances and what they serve (cached
        per instance list, which changes only when the instances do)."""
        key = tuple(id(m) for m in instances)
        known = self._versions.get(key)
        if known is None:
            parts = []
            for m in instances:
                info = m.backend.describe()
                parts.append(f"{m.public_id}:{info.family}:{info.quantization}:{info.parameters}")
            known = self._versions[key] = " ".join(parts)
        return known

    def pin(self, model: str) -> bool:
        """Make the current window the reference; False if the model has none."""
        m = self._models.get(model)
        if m is None or not m.current:
            return False
        m.reference = list(m.current)
        return True

    def models(self) -> list[str]:
        return sorted(self._models)

    def windows(self, model: str) -> tuple[str, list[Features], list[Features]] | None:
        m = self._models.get(model)
        return None if m is None else (m.version, list(m.reference), list(m.current))

    def summary(self) -> list[tuple[str, int, int, list[tuple[str, str, float]]]]:
        """Every model's window sizes and scores (the metrics collector reads this)."""
        return [
            (name, len(m.reference), len(m.current), self.scores(name))
            for name, m in sorted(self._models.items())
        ]

    def scores(self, model: str) -> list[tuple[str, str, float]]:
        """``(feature, "psi" | "js", value)`` once both windows hold ``min_requests``."""
        m = self._models.get(model)
        least = self.settings.min_requests
        if m is None or len(m.reference) < least or len(m.current) < least:
            return []
        found = []
        for name in NUMERIC:
            found.append(
                (
                    name,
                    "psi",
                    psi([f.number(name) for f in m.reference], [f.number(name) for f in m.current]),
                )
            )
        for name in CATEGORICAL:
            ref = [c for f in m.reference if (c := f.category(name)) is not None]
            cur = [c for f in m.current if (c := f.category(name)) is not None]
            if len(ref) >= least and len(cur) >= least:
                found.append((name, "js", jensen_shannon(ref, cur)))
        return found


def window_values(window: Sequence[Features]) -> dict[str, list[float] | list[str]]:
    """Each feature's values over a window (categories without a value left out)."""
    values: dict[str, list[float] | list[str]] = {
        name: [f.number(name) for f in window] for name in NUMERIC
    }
    for name in CATEGORICAL:
        values[name] = [c for f in window if (c := f.category(name)) is not None]
    return values
