"""Scorers of responses for sample-and-rank and the win rate: ground truth, claims, reward models.

A scorer is any ``(samples, completions) -> one float per completion``
(:class:`vlalign.rewards.combine.BatchScorer`; ``samples[i]`` is the prompt that
``completions[i]`` answers). :func:`vlalign.data.pairs.rank.sample_and_rank` pairs the responses it
scores; ``vlalign eval`` uses one for the win rate. Two are defined here; a reward model
(:class:`vlalign.rewards.model.RewardModelScorer`) plugs into the same protocol.

- :class:`GroundTruthScorer`: exact ground truth where the data has it. A short-answer row
  (``meta["answer"]``) scores 1 if the answer is right (:func:`vlalign.eval.tasks.answer_correct`),
  else 0. A description scores :func:`~vlalign.data.pairs.rank.description_f1`, the F1 between
  the (object, count) pairs it states and the annotated ones: 1 for an exact description.
- :class:`ClaimVerifier`: claim-level verification (RLAIF-V's divide and conquer): a description
  scores :func:`~vlalign.data.pairs.rank.claim_score`, ``(true claims - false claims) / reference
  claims``. Short answers score as in the ground-truth scorer.

Both need the object annotations of descriptions (``meta["objects"]``, see
:func:`vlalign.data.annotations.annotations_of`) and an object vocabulary; a row without them is a
:class:`~vlalign.data.schema.DataError` naming the row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlalign.data.annotations import DESCRIBE, ObjectVocabulary, annotations_of, task_of
from vlalign.data.pairs.rank import Scorer, claim_score, description_f1
from vlalign.data.schema import DataError
from vlalign.eval.tasks import answer_correct
from vlalign.models.heads import INFO_FILE
from vlalign.rewards.model import load_reward_scorer
from vlalign.rewards.user import load_user_function


def _needs_vocab(vocab: ObjectVocabulary | None, sample: Any, who: str) -> ObjectVocabulary:
    if vocab is None:
        raise DataError(
            f"{who}: sample {getattr(sample, 'id', '?')!r} is a description; scoring descriptions needs an "
            "object vocabulary (the shapes world's manifest.json, or a JSON file {object: [phrases]})"
        )
    return vocab


class GroundTruthScorer:
    """Exact ground truth: answer correctness, or (object, count) F1 of a description."""

    def __init__(self, vocabulary: ObjectVocabulary | None = None) -> None:
        self.vocabulary = vocabulary

    def score(self, sample: Any, text: str) -> float:
        if task_of(sample) != DESCRIBE:
            if "answer" not in (getattr(sample, "meta", None) or {}):
                raise DataError(
                    f"ground-truth scorer: sample {sample.id!r} has neither an 'answer' nor object annotations"
                )
            return float(answer_correct(text, sample))
        vocab = _needs_vocab(self.vocabulary, sample, "ground-truth scorer")
        ann = annotations_of(sample, required_by="the ground-truth scorer")
        assert ann is not None
        return description_f1(text, ann, vocab)

    def __call__(self, samples: Sequence[Any], completions: Sequence[str]) -> list[float]:
        return [self.score(s, c) for s, c in zip(samples, completions, strict=True)]


class ClaimVerifier:
    """Claim-level verification of descriptions against annotations (see the module doc)."""

    def __init__(self, vocabulary: ObjectVocabulary | None = None) -> None:
        self.vocabulary = vocabulary

    def score(self, sample: Any, text: str) -> float:
        if task_of(sample) != DESCRIBE and "answer" in (getattr(sample, "meta", None) or {}):
            return float(answer_correct(text, sample))
        vocab = _needs_vocab(self.vocabulary, sample, "claim verifier")
        ann = annotations_of(sample, required_by="the claim verifier")
        assert ann is not None
        return claim_score(text, ann, vocab)

    def __call__(self, samples: Sequence[Any], completions: Sequence[str]) -> list[float]:
        return [self.score(s, c) for s, c in zip(samples, completions, strict=True)]


# ----------------------------------------------------------------------------- scorer by name

SCORERS: dict[str, Callable[[ObjectVocabulary | None], Scorer]] = {
    "ground_truth": GroundTruthScorer,
    "claims": ClaimVerifier,
}
"""Scorer name -> ``factory(vocabulary) -> scorer``; :func:`build_scorer` looks names up here."""

SCORER_NAMES: tuple[str, ...] = tuple(SCORERS)


def build_scorer(spec: str, vocabulary: ObjectVocabulary | None = None) -> Scorer:
    """A scorer from its config name: ``ground_truth``, ``claims``, the folder of a reward model saved
    by ``vlalign rm`` (``<run>/model``, holding ``reward_model.json``), or ``file.py:name`` /
    ``package.module:name`` naming a scorer (``(samples, completions) -> scores``) or a function of no
    arguments that returns one."""
    if spec in SCORERS:
        return SCORERS[spec](vocabulary)
    if (Path(spec) / INFO_FILE).is_file():
        return load_reward_scorer(spec)
    if ":" not in spec:
        raise ValueError(
            f"unknown scorer {spec!r}: use one of {tuple(SCORERS)}, a reward model folder "
            f"(with {INFO_FILE}), or 'file.py:name' / 'module:name'"
        )
    target = load_user_function(spec)
    if inspect.isclass(target) or _arity(target) == 0:
        target = target()
    if not callable(target):
        raise ValueError(f"scorer {spec!r} is not callable as (samples, completions) -> scores")
    return target


def _arity(fn: Any) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return -1
    return sum(
        p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params
    )
