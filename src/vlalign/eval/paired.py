"""Paired comparison of two evaluations on the same questions: the difference and its interval.

Two models answered the same suite (``records`` of :func:`vlalign.eval.suite.evaluate`). Each
metric is a ratio of sums over questions (POPE's F1 is ``2TP / (2TP + FP + FN)``, CHAIR_i is
``hallucinated mentions / mentions``, a task's accuracy ``right / asked``), so it is recomputed
from per-scene sums; the *paired bootstrap* draws whole scenes with replacement (the questions
about one image are not independent), sums both models' counts over the same draw and takes the
difference of the two metrics. Its spread is the uncertainty that comes from which scenes were
asked, with the models held fixed: the ``level`` interval is the percentile interval of the
differences over ``samples`` draws, ``se`` their standard deviation.

What it does not measure: the spread between training runs (another seed is another model);
give several runs per side to pool them (the counts of every run are summed per scene, the metric
of the pooled counts is about the mean over runs) and look at each run's difference too.

Counts per record (``part`` names the suite part; ``heldout`` metrics carry no prefix,
``compositional`` ones ``compositional/``, as in the suite's metrics):

- ``pope/<mode>`` records (``said_yes``, ``answer``): tp, fp, tn, fn -> accuracy, precision,
  recall, f1, yes_ratio;
- descriptions (``hallucinated``, ``recalled``, ``objects``, and ``mentions`` when written):
  chair_i (only with ``mentions``), chair_s, recall;
- short answers (``correct``): task/<task> accuracy;
- published benchmarks (:mod:`vlalign.eval.official`): POPE records carry ``label`` in place of
  ``answer``; CHAIR-on-COCO records (part ``chair``) count as descriptions with no prefix;
  AMBER's yes/no records (part ``amber/<dimension>``, ``response`` and ``label``) count correct
  answers, answered *No*, right *No* and true *no* into their dimension, ``amber/attribute``
  (state, number, action) and ``amber/discriminative`` -> accuracy, precision, recall, f1 with
  *No* positive; AMBER's descriptions (part ``amber/generative``, with their noun counts) ->
  chair, cover, hal, cog as fractions.

Records pair by image: the scene of a record is its ``image`` (the name as the benchmark file
gives it, so evaluations run from other folders pair up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlalign.eval.pope import pope_label

Record = dict[str, Any]


@dataclass(frozen=True)
class Interval:
    """The difference ``a - b`` of one metric, with its bootstrap interval and standard error."""

    a: float
    b: float
    difference: float
    low: float
    high: float
    se: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of zero."""
        return self.low > 0.0 or self.high < 0.0

    def text(self, *, with_difference: bool = True) -> str:
        """``"+0.018 [+0.008, +0.028]"`` (3 decimals, signed); without the difference, the bracket only."""
        bracket = f"[{self.low:+.3f}, {self.high:+.3f}]"
        return f"{self.difference:+.3f} {bracket}" if with_difference else bracket


def _prefix(part: str) -> str:
    return "" if part in ("heldout", "chair") else f"{part}/"


_AMBER_ATTRIBUTES = ("state", "number", "action")
_AMBER_GENERATIVE = ("nouns", "hallucinated_nouns", "truth_objects", "covered_objects", "targets", "covered_targets")


def _amber_counts(record: Record, part: str) -> dict[str, float]:
    if part == "amber/generative":
        counts = {f"{part}:{k}": float(record[k]) for k in _AMBER_GENERATIVE}
        return counts | {f"{part}:responses": 1.0, f"{part}:clean": float(record["hallucinated_nouns"] == 0)}
    dimension = part.split("/", 1)[1]
    truth_no, said_no = record["label"] == "no", record["response"] == "No"
    correct = (record["label"] == "yes" and record["response"] == "Yes") or (truth_no and said_no)
    groups = [part, *(["amber/attribute"] if dimension in _AMBER_ATTRIBUTES else []), "amber/discriminative"]
    cells = {"n": 1.0, "correct": float(correct), "no": float(said_no), "right_no": float(said_no and truth_no)}
    cells["truth_no"] = float(truth_no)
    return {f"{g}:{k}": v for g in groups for k, v in cells.items()}


def record_counts(record: Record) -> dict[str, float]:
    """The counts one answer adds (keys ``<metric prefix>:<count>``); empty for a record no metric reads."""
    part = str(record.get("part", "heldout"))
    if part.startswith("amber/"):
        return _amber_counts(record, part)
    if part.startswith("pope/"):
        said, truth = bool(record["said_yes"]), pope_label(record["answer"] if "answer" in record else record["label"])
        cell = ("tp" if truth else "fp") if said else ("fn" if truth else "tn")
        return {f"{part}:{cell}": 1.0}
    prefix = _prefix(part)
    if "hallucinated" in record:
        hallucinated = len(record["hallucinated"])
        counts = {
            f"{prefix}chair:captions": 1.0,
            f"{prefix}chair:with_hallucination": float(hallucinated > 0),
            f"{prefix}chair:recalled": float(len(record.get("recalled", []))),
            f"{prefix}chair:present": float(len(set(record.get("objects", [])))),
        }
        if "mentions" in record:
            counts[f"{prefix}chair:hallucinated"] = float(hallucinated)
            counts[f"{prefix}chair:mentions"] = float(record["mentions"])
        return counts
    if "correct" in record:
        task = record.get("task", "answer")
        return {f"{prefix}task/{task}:asked": 1.0, f"{prefix}task/{task}:right": float(bool(record["correct"]))}
    return {}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den != 0)


def metrics_from_counts(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Metric values from summed counts (arrays of one shape: one value per bootstrap draw, or scalars)."""

    def get(key: str) -> np.ndarray:
        return counts.get(key, np.zeros_like(next(iter(counts.values())), dtype=float))

    out: dict[str, np.ndarray] = {}
    groups = sorted({k.split(":")[0] for k in counts})
    for group in groups:
        if group == "amber/generative":
            responses = get(f"{group}:responses")
            out |= {
                f"{group}/chair": _ratio(get(f"{group}:hallucinated_nouns"), get(f"{group}:nouns")),
                f"{group}/cover": _ratio(get(f"{group}:covered_objects"), get(f"{group}:truth_objects")),
                f"{group}/hal": np.where(responses > 0, 1.0 - _ratio(get(f"{group}:clean"), responses), 0.0),
                f"{group}/cog": _ratio(get(f"{group}:covered_targets"), get(f"{group}:targets")),
            }
        elif group.startswith("amber/"):
            precision = _ratio(get(f"{group}:right_no"), get(f"{group}:no"))
            recall = _ratio(get(f"{group}:right_no"), get(f"{group}:truth_no"))
            out |= {
                f"{group}/accuracy": _ratio(get(f"{group}:correct"), get(f"{group}:n")),
                f"{group}/precision": precision,
                f"{group}/recall": recall,
                f"{group}/f1": _ratio(2 * precision * recall, precision + recall),
            }
        elif group.startswith("pope/"):
            tp, fp, tn, fn = (get(f"{group}:{c}") for c in ("tp", "fp", "tn", "fn"))
            total = tp + fp + tn + fn
            precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
            out |= {
                f"{group}/accuracy": _ratio(tp + tn, total),
                f"{group}/precision": precision,
                f"{group}/recall": recall,
                f"{group}/f1": _ratio(2 * precision * recall, precision + recall),
                f"{group}/yes_ratio": _ratio(tp + fp, total),
            }
        elif group.endswith("chair"):
            out[f"{group}/chair_s"] = _ratio(get(f"{group}:with_hallucination"), get(f"{group}:captions"))
            out[f"{group}/recall"] = _ratio(get(f"{group}:recalled"), get(f"{group}:present"))
            if f"{group}:mentions" in counts:
                out[f"{group}/chair_i"] = _ratio(get(f"{group}:hallucinated"), get(f"{group}:mentions"))
        else:
            out[group] = _ratio(get(f"{group}:right"), get(f"{group}:asked"))
    return out


def _question(record: Record) -> tuple[str, str]:
    return str(record.get("part", "heldout")), str(record["id"])


def _scene(record: Record) -> str:
    """The unit the bootstrap draws: the image (questions about one image share its difficulty)."""
    return str(record.get("image") or str(record["id"]).split("/")[0])


def scene_counts(
    runs: Sequence[Sequence[Record]], scene_of: dict[tuple[str, str], str] | None = None, *, side: str = ""
) -> tuple[list[str], list[str], np.ndarray]:
    """Counts summed over ``runs`` per scene: ``(scenes, keys, counts (scenes, keys))``.

    Every run must have answered the same questions (``(part, id)``), ``ValueError`` naming one
    that differs otherwise. ``scene_of`` maps a question to its scene (default: the first run's
    images), so that runs evaluated from other working folders still pair up; ``side`` names the
    runs in the error.
    """
    if not runs:
        raise ValueError("no evaluation to count")
    scene_of = scene_of if scene_of is not None else {_question(r): _scene(r) for r in runs[0]}
    table: dict[str, dict[str, float]] = {}
    for i, records in enumerate(runs):
        asked = {_question(r) for r in records}
        if asked != scene_of.keys():
            raise ValueError(_mismatch(set(scene_of), asked, f"{side + ' ' if side else ''}evaluation {i + 1}"))
        for r in records:
            row = table.setdefault(scene_of[_question(r)], {})
            for key, value in record_counts(r).items():
                row[key] = row.get(key, 0.0) + value
    scenes = sorted(table)
    keys = sorted({k for row in table.values() for k in row})
    matrix = np.array([[table[s].get(k, 0.0) for k in keys] for s in scenes], dtype=float).reshape(
        len(scenes), len(keys)
    )
    return scenes, keys, matrix


def _mismatch(first: set[tuple[str, str]], other: set[tuple[str, str]], which: str) -> str:
    missing, extra = sorted(first - other), sorted(other - first)
    example = (
        f"{missing[0][1]!r} ({missing[0][0]}) is missing" if missing else f"{extra[0][1]!r} ({extra[0][0]}) is new"
    )
    return (
        f"{which} answered other questions than the first one ({len(other)} vs {len(first)}; e.g. "
        f"{example}): compare evaluations run with the same suite settings"
    )


def paired_bootstrap(
    a: Sequence[Sequence[Record]],
    b: Sequence[Sequence[Record]],
    *,
    samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """``metric(a) - metric(b)`` for every metric both sides have, with its paired-bootstrap interval.

    ``a`` and ``b``: one or more evaluations' records per side (runs of one side are pooled), every
    one on the same questions. Draws whole scenes (see the module doc); deterministic in ``seed``.
    """
    if not a or not b:
        raise ValueError("paired_bootstrap needs at least one evaluation on each side")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    scene_of = {_question(r): _scene(r) for r in a[0]}
    scenes, keys_a, counts_a = scene_counts(a, scene_of, side="a")
    _, keys_b, counts_b = scene_counts(b, scene_of, side="b")  # the same scenes, in the same order
    # each side's metrics from its own counts: a count one side lacks (CHAIR_i's mentions in older
    # records) leaves that metric out instead of reading as zero
    weights = np.random.default_rng(seed).multinomial(
        len(scenes), np.full(len(scenes), 1.0 / len(scenes)), size=samples
    )
    point_a, point_b = (
        _metrics(counts_a.sum(0, keepdims=True), keys_a),
        _metrics(counts_b.sum(0, keepdims=True), keys_b),
    )
    draws_a, draws_b = _metrics(weights @ counts_a, keys_a), _metrics(weights @ counts_b, keys_b)
    tail = (1.0 - level) / 2.0
    out: dict[str, Interval] = {}
    for name in sorted(set(point_a) & set(point_b)):
        diffs = draws_a[name] - draws_b[name]
        low, high = np.quantile(diffs, [tail, 1.0 - tail])
        pa, pb = float(point_a[name][0]), float(point_b[name][0])
        out[name] = Interval(a=pa, b=pb, difference=pa - pb, low=float(low), high=float(high), se=float(diffs.std()))
    return out


def _metrics(summed: np.ndarray, keys: list[str]) -> dict[str, np.ndarray]:
    return metrics_from_counts({k: summed[:, j] for j, k in enumerate(keys)})


__all__: Sequence[str] = ("Interval", "metrics_from_counts", "paired_bootstrap", "record_counts", "scene_counts")
