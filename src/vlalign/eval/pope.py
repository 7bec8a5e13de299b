"""POPE metrics (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models").

Questions ``"Is there a <object> in the image?"`` about objects present (label yes) and absent
(label no, sampled randomly, among popular objects, or adversarially among objects that co-occur
with the present ones). With *yes* as the positive class::

    accuracy  = (TP + TN) / N         precision = TP / (TP + FP)      recall = TP / (TP + FN)
    F1        = 2 P R / (P + R)       yes_ratio = (TP + FP) / N

A hallucinating model says yes to absent objects: FP grows, precision and F1 fall, the yes-ratio
rises above the share of yes labels (0.5 in balanced POPE files). Answers are read by
:func:`vlalign.eval.parsing.pope_says_yes` (as the POPE code does); answers that say neither yes
nor no are counted as POPE counts them (yes) and reported as ``unclear``. A ratio with a zero
denominator is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlalign.eval.parsing import pope_is_clear, pope_says_yes


@dataclass(frozen=True)
class Confusion:
    """Counts of a yes/no evaluation, yes positive."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def confusion(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> Confusion:
    """The confusion matrix of yes/no predictions against labels."""
    if len(predicted_yes) != len(label_yes):
        raise ValueError(f"{len(predicted_yes)} predictions for {len(label_yes)} labels")
    pairs = list(zip(predicted_yes, label_yes))
    return Confusion(
        tp=sum(p and y for p, y in pairs),
        fp=sum(p and not y for p, y in pairs),
        tn=sum(not p and not y for p, y in pairs),
        fn=sum(not p and y for p, y in pairs),
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def confusion_metrics(c: Confusion) -> dict[str, float]:
    """accuracy, precision, recall, f1 and yes_ratio of a confusion matrix (see the module doc)."""
    precision = _ratio(c.tp, c.tp + c.fp)
    recall = _ratio(c.tp, c.tp + c.fn)
    return {
        "accuracy": _ratio(c.tp + c.tn, c.total),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(c.tp + c.fp, c.total),
    }


def pope_metrics(answers: Sequence[str], labels: Sequence[str | bool]) -> dict[str, float]:
    """POPE metrics of raw answers against labels (``"Yes"``/``"No"`` or booleans).

    Returns accuracy, precision, recall, f1, yes_ratio, ``unclear`` (share of answers saying
    neither yes nor no, counted as yes) and ``n`` (questions).
    """
    truth = [pope_label(v) for v in labels]
    said = [pope_says_yes(a) for a in answers]
    out = confusion_metrics(confusion(said, truth))
    out["unclear"] = _ratio(sum(not pope_is_clear(a) for a in answers), len(answers))
    out["n"] = float(len(answers))
    return out


def pope_label(value: str | bool) -> bool:
    """A POPE label (``"Yes"``/``"No"``, any case, a final full stop allowed, or a boolean) as a boolean."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower().rstrip(".")
    if text not in ("yes", "no"):
        raise ValueError(f"a POPE label must be 'Yes' or 'No', got {value!r}")
    return text == "yes"
