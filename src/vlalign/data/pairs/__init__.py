"""Preference pairs: what every construction method shares (statistics, row metadata).

Four methods build preference datasets in the standard layout (``images``, ``prompt``,
``chosen``, ``rejected``, and ``rejected_extra`` for POVID; extra columns land in a sample's
``meta``), each pair tagged with a ``source`` column:

============================  ===================================================  =====================
method                        module                                               ``source``
============================  ===================================================  =====================
hallucination injection       :mod:`vlalign.data.pairs.inject` (POVID, HA-DPO)     ``inject-add``,
                                                                                   ``inject-attribute``,
                                                                                   ``inject-count``,
                                                                                   ``inject-probe``
image corruption              :mod:`vlalign.data.pairs.corrupt` (mDPO, POVID, BPO) ``corrupt-crop``,
                                                                                   ``corrupt-mask``,
                                                                                   ``corrupt-noise``
sample and rank               :mod:`vlalign.data.pairs.rank` (RLAIF-V, self-       ``rank``
                              rewarding loops)
injection + response to a     :mod:`vlalign.data.pairs.povid` (POVID: two          ``povid``
distorted image               negatives per row)
============================  ===================================================  =====================

Each returns its pairs and a :class:`PairStats`: pairs made, pairs dropped and why, and the
distribution of the pairs' margins (what a margin is depends on the method: the claim-score gap
between chosen and rejected for injection and ranking, the mean absolute pixel change for image
corruption, the claim-score gap between chosen and the distorted-image response for POVID).
``vlalign pairs`` (:mod:`vlalign.commands.pairs`) writes ``<out>.jsonl`` and
``<out>.stats.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

RESERVED_COLUMNS = frozenset({"id", "images", "prompt", "completion", "chosen", "rejected", "rejected_extra", "label"})
"""Columns a pair's meta may not reuse (they hold the pair itself)."""


@dataclass
class PairStats:
    """What a pair-construction run made, dropped and how far apart its pairs are."""

    method: str
    inputs: int = 0
    """Samples (or prompts) examined."""
    made: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    """Pairs made per ``source`` value."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Candidates dropped, per reason."""
    margins: list[float] = field(default_factory=list)

    def add(self, source: str, margin: float) -> None:
        """Count one pair made."""
        self.made += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        self.margins.append(float(margin))

    def drop(self, reason: str, k: int = 1) -> None:
        """Count ``k`` candidates dropped for ``reason``."""
        self.dropped[reason] = self.dropped.get(reason, 0) + k

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary: counts, drop reasons and margin quantiles and histogram."""
        return {
            "method": self.method,
            "inputs": self.inputs,
            "made": self.made,
            "by_source": dict(sorted(self.by_source.items())),
            "dropped": dict(sorted(self.dropped.items(), key=lambda kv: -kv[1])),
            "dropped_total": sum(self.dropped.values()),
            "margin": margin_summary(self.margins),
        }

    def describe(self) -> str:
        """One paragraph for the terminal."""
        s = self.summary()
        lines = [f"{self.method}: {self.made} pairs from {self.inputs} inputs"]
        if s["by_source"]:
            lines.append("  by source: " + ", ".join(f"{k} {v}" for k, v in s["by_source"].items()))
        if s["dropped"]:
            lines.append("  dropped: " + ", ".join(f"{v} {k}" for k, v in s["dropped"].items()))
        m = s["margin"]
        if m["n"]:
            lines.append(
                f"  margin: mean {m['mean']:.3f}, min {m['min']:.3f}, median {m['p50']:.3f}, max {m['max']:.3f}"
            )
        return "\n".join(lines)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def margin_summary(margins: list[float], bins: int = 10) -> dict[str, Any]:
    """n, mean, min, p10, p50, p90, max and a ``bins``-bin histogram (edges and counts)."""
    if not margins:
        return {"n": 0}
    v = sorted(margins)
    lo, hi = v[0], v[-1]
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = [0] * bins
    for x in v:
        counts[min(int((x - lo) / width), bins - 1)] += 1
    return {
        "n": len(v),
        "mean": sum(v) / len(v),
        "min": lo,
        "p10": _quantile(v, 0.1),
        "p50": _quantile(v, 0.5),
        "p90": _quantile(v, 0.9),
        "max": hi,
        "histogram": {"edges": [lo + k * width for k in range(bins + 1)], "counts": counts},
    }


def pair_meta(meta: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A pair's meta: the source sample's meta without reserved columns, plus ``extra``."""
    out = {k: v for k, v in meta.items() if k not in RESERVED_COLUMNS}
    out.update(extra)
    return out
