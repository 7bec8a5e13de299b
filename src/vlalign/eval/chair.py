"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning") and object recall.

Over generated descriptions, each against the objects annotated in its image::

    CHAIR_i = hallucinated object mentions / all object mentions
    CHAIR_s = descriptions with at least one hallucinated mention / all descriptions
    recall  = sum over descriptions of |distinct objects mentioned AND present|
              / sum over descriptions of |objects present|

Mentions are found with an :class:`~vlalign.data.annotations.ObjectVocabulary` (synonyms and plurals,
longest phrase first), counted once per occurrence as in the reference implementation
(a description naming the same absent object twice has two hallucinated mentions). Departure
from the reference: negated mentions (``"no red circle"``) are not mentions (the reference has
no negation handling; the shapes world's captions never negate, but a model could). A
description without any mention counts in CHAIR_s's denominator and adds nothing to CHAIR_i's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vlalign.data.annotations import ObjectVocabulary


@dataclass
class CaptionReport:
    """The CHAIR bookkeeping of one description."""

    mentions: list[str]
    """Object names mentioned, one entry per occurrence (negated ones left out)."""
    hallucinated: list[str]
    """The mentions of objects not in the image."""
    recalled: list[str]
    """Distinct objects present that the description names."""
    n_present: int


@dataclass
class ChairResult:
    """CHAIR_i, CHAIR_s and recall over a set of descriptions, with the per-description reports."""

    chair_i: float
    chair_s: float
    recall: float
    n: int
    mentions: int
    hallucinated: int
    captions: list[CaptionReport] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            "chair_i": self.chair_i,
            "chair_s": self.chair_s,
            "recall": self.recall,
            "n": float(self.n),
            "mentions_per_caption": self.mentions / self.n if self.n else 0.0,
        }


def caption_report(text: str, present: Sequence[str], vocab: ObjectVocabulary) -> CaptionReport:
    """Which objects ``text`` mentions, and which of those are hallucinated."""
    truth = set(present)
    mentions = vocab.mentioned(text)
    return CaptionReport(
        mentions=mentions,
        hallucinated=[m for m in mentions if m not in truth],
        recalled=sorted({m for m in mentions if m in truth}),
        n_present=len(truth),
    )


def chair(texts: Sequence[str], present: Sequence[Sequence[str]], vocab: ObjectVocabulary) -> ChairResult:
    """CHAIR_i, CHAIR_s and object recall of ``texts[k]`` against the objects ``present[k]``."""
    if len(texts) != len(present):
        raise ValueError(f"{len(texts)} descriptions for {len(present)} annotations")
    reports = [caption_report(t, p, vocab) for t, p in zip(texts, present)]
    mentions = sum(len(r.mentions) for r in reports)
    hallucinated = sum(len(r.hallucinated) for r in reports)
    n_present = sum(r.n_present for r in reports)
    return ChairResult(
        chair_i=hallucinated / mentions if mentions else 0.0,
        chair_s=sum(bool(r.hallucinated) for r in reports) / len(reports) if reports else 0.0,
        recall=sum(len(r.recalled) for r in reports) / n_present if n_present else 0.0,
        n=len(reports),
        mentions=mentions,
        hallucinated=hallucinated,
        captions=reports,
    )
