"""POPE as published (Li et al. 2023, github AoiDragon/POPE), scored as its ``evaluate.py`` scores it.

Question files: ``{coco,aokvqa,gqa}_pope_{random,popular,adversarial}.json``, one JSON object per
line, ``{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a
snowboard in the image?", "label": "yes"}`` (the SEEM-built A-OKVQA / GQA files hold the same
objects as one JSON array; :func:`read_pope_file` reads both).

The official answer rule (``evaluate.py``): keep the text before the first ``"."``, delete every
``","``, split on single spaces; the answer is *no* when a piece is exactly ``No``, ``no`` or
``not``, otherwise *yes*. So ``"NO"``, ``"No!"``, ``"Not at all."``, ``"(no)"`` and ``"No\\n..."``
read as *yes*, and ``"Yes, there is no cat"`` as *no*.

Metrics, *yes* positive, labels ``"no"`` -> negative and anything else positive::

    accuracy  = (TP + TN) / N        precision = TP / (TP + FP)       recall = TP / (TP + FN)
    F1        = 2 P R / (P + R)      yes_ratio = (#answers yes) / N

Where ``evaluate.py`` divides by zero (no yes answer, no yes label, P = R = 0, no answers) it
raises ``ZeroDivisionError``; here the metric is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlalign.eval.benchmarks._io import BenchmarkFileError, read_json_records, require, safe_ratio

POPE_MODES = ("random", "popular", "adversarial")
POPE_DATASETS = ("coco", "aokvqa", "gqa")
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question as published; ``line`` is where it starts in ``source``."""

    question_id: int
    image: str
    text: str
    label: str
    source: str = ""
    line: int = 0


def pope_file_name(dataset: str, mode: str) -> str:
    """The published name of a question file, e.g. ``coco_pope_random.json``."""
    if dataset not in POPE_DATASETS or mode not in POPE_MODES:
        raise ValueError(f"unknown POPE file {dataset!r}/{mode!r}: datasets {POPE_DATASETS}, modes {POPE_MODES}")
    return f"{dataset}_pope_{mode}.json"


def read_pope_file(path: str | Path, image_root: str | Path | None = None) -> list[PopeQuestion]:
    """The validated questions of a POPE question file (JSON Lines or one JSON array).

    Each record needs ``question_id`` (integer, unique in the file), ``image`` (non-empty string),
    ``text`` (string) and ``label`` (``"yes"`` or ``"no"``; ``evaluate.py`` would read any other
    value as yes, so it is refused here). The first problem raises :class:`BenchmarkFileError`
    naming the file, line and column. With ``image_root``, every image must exist there too
    (:func:`check_pope_images`).
    """
    questions: list[PopeQuestion] = []
    seen: dict[int, int] = {}
    for row in read_json_records(path):
        qid = require(row, "question_id", int)
        image = require(row, "image", str)
        if not image.strip():
            raise BenchmarkFileError(row.path, "empty image name", line=row.line, column="image")
        text = require(row, "text", str)
        label = require(row, "label", str, choices=("yes", "no"))
        if qid in seen:
            raise BenchmarkFileError(
                row.path, f"question_id {qid} repeats the one on line {seen[qid]}", line=row.line, column="question_id"
            )
        seen[qid] = row.line
        questions.append(PopeQuestion(qid, image, text, label, row.path, row.line))
    if not questions:
        raise BenchmarkFileError(path, "no questions")
    if image_root is not None:
        check_pope_images(questions, image_root)
    return questions


def missing_pope_images(questions: Sequence[PopeQuestion], image_root: str | Path) -> list[str]:
    """The image names (each once, in file order) that are not files under ``image_root``."""
    root = Path(image_root)
    missing: dict[str, None] = {}
    for q in questions:
        if q.image not in missing and not (root / q.image).is_file():
            missing[q.image] = None
    return list(missing)


def check_pope_images(questions: Sequence[PopeQuestion], image_root: str | Path) -> None:
    """Raise :class:`BenchmarkFileError` naming the first missing image (and how many are missing)."""
    missing = missing_pope_images(questions, image_root)
    if missing:
        first = next(q for q in questions if q.image == missing[0])
        raise BenchmarkFileError(
            first.source,
            f"image {missing[0]!r} is not in {str(image_root)!r} ({len(missing)} of the file's images are missing)",
            line=first.line,
            column="image",
        )


def read_pope_answers(path: str | Path, field: str = "answer") -> list[str]:
    """The answers of an answer file in POPE's format (``{"question": ..., "answer": ...}`` per line, in question order)."""
    return [require(row, field, str) for row in read_json_records(path)]


def pope_answer_official(text: str) -> str:
    """``"yes"`` or ``"no"`` as POPE's ``evaluate.py`` reads an answer (rule in the module docstring)."""
    first = text.split(".")[0]
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


@dataclass(frozen=True)
class PopeMetrics:
    """Counts and the five metrics of one POPE file (fractions in [0, 1], NaN where undefined)."""

    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def as_dict(self) -> dict[str, float]:
        """The five metrics by name (:data:`POPE_METRICS`) and the four counts."""
        return {name: getattr(self, name) for name in (*POPE_METRICS, "tp", "fp", "tn", "fn")}


def pope_metrics(labels: Sequence[str], answers: Sequence[str]) -> PopeMetrics:
    """POPE's metrics of ``answers`` (``"yes"``/``"no"``, already read) against ``labels``.

    As ``evaluate.py``: a label or answer is negative when it is exactly ``"no"``, positive otherwise.
    """
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} labels but {len(answers)} answers: POPE pairs them by position")
    tp = fp = tn = fn = 0
    for label, answer in zip(labels, answers):
        said_yes, is_yes = answer != "no", label != "no"
        tp += said_yes and is_yes
        fp += said_yes and not is_yes
        tn += not said_yes and not is_yes
        fn += not said_yes and is_yes
    precision = safe_ratio(tp, tp + fp)
    recall = safe_ratio(tp, tp + fn)
    f1 = safe_ratio(2 * precision * recall, precision + recall)
    n = tp + fp + tn + fn
    return PopeMetrics(tp, fp, tn, fn, safe_ratio(tp + tn, n), precision, recall, f1, safe_ratio(tp + fp, n))


def average_pope(results: Mapping[str, PopeMetrics]) -> dict[str, float]:
    """The mean of each metric over the modes, as papers print an "Average" row."""
    if not results:
        raise ValueError("no POPE results to average")
    return {m: sum(getattr(r, m) for r in results.values()) / len(results) for m in POPE_METRICS}


def format_pope_table(
    results: Mapping[str, PopeMetrics], *, percent: bool = True, digits: int = 1, average: bool = True
) -> str:
    """A Markdown table as papers print POPE: one row per mode, then the average.

    ``results`` maps a row name (``"random"``, ``"coco/popular"``, ...) to its metrics; values in
    percent with ``digits`` decimals by default (``percent=False``: fractions with ``digits + 2``).
    """
    scale, places = (100.0, digits) if percent else (1.0, digits + 2)

    def cell(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value * scale:.{places}f}"

    header = "| Setting | Accuracy | Precision | Recall | F1 | Yes-ratio |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(getattr(r, m)) for m in POPE_METRICS) + " |")
    if average and len(results) > 1:
        mean = average_pope(results)
        lines.append("| Average | " + " | ".join(cell(mean[m]) for m in POPE_METRICS) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Disagreements:
    """How often two answer readers disagree, with the first ``examples`` texts where they do."""

    total: int
    count: int
    examples: tuple[tuple[str, str, str], ...]  # (text, reading a, reading b)

    @property
    def rate(self) -> float:
        return safe_ratio(self.count, self.total)


def count_disagreements(
    texts: Sequence[str],
    reader_a: Callable[[str], object] = pope_answer_official,
    reader_b: Callable[[str], object] | None = None,
    *,
    examples: int = 10,
) -> Disagreements:
    """Count the answers that ``reader_a`` and ``reader_b`` read differently (e.g. POPE's rule vs a stricter reader)."""
    if reader_b is None:
        raise ValueError("give the second reader to compare against")
    found: list[tuple[str, str, str]] = []
    count = 0
    for text in texts:
        a, b = reader_a(text), reader_b(text)
        if a != b:
            count += 1
            if len(found) < examples:
                found.append((text, str(a), str(b)))
    return Disagreements(len(texts), count, tuple(found))
