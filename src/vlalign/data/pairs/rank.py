"""Sample and rank (as in RLAIF-V and self-rewarding loops): score n responses, pair the far-apart.

The responses come from a policy (:func:`vlalign.models.generate.generate` with ``n > 1`` and a
temperature); a *scorer* rates them and :func:`rank_pairs` pairs a better one (chosen) with a
worse one (rejected) when their scores differ by at least ``threshold``.

A scorer is any ``(samples, completions) -> one float per completion``
(:class:`vlalign.rewards.combine.BatchScorer`; ``samples[i]`` is the prompt that
``completions[i]`` answers). Two are defined here; a reward model plugs into the same protocol.

- :class:`GroundTruthScorer`: exact ground truth where the data has it. A short-answer row
  (``meta["answer"]``) scores 1 if the answer is right (:func:`vlalign.eval.tasks.answer_correct`),
  else 0. A description scores the F1 between the (object, count) pairs it states and the
  annotated ones (names only when the data has no counts): 1 for an exact description.
- :class:`ClaimVerifier`: claim-level verification (RLAIF-V's divide and conquer). A description
  is split into atomic claims, each object mention giving "there is an X" (or "there is no X" when
  negated) and, where a count is said and the annotations have counts, "there are k X" for an X
  that is present. Each claim is checked against the annotations; the score is
  ``(true claims - false claims) / reference claims``, where the reference is what the exact
  description would claim (one existence claim per object present, plus one count claim each
  when counts are known). So an exact description scores 1, each hallucinated object costs
  ``1 / reference``, a miscount swaps a true claim for a false one. Short answers score as in
  the ground-truth scorer.

Both need the object annotations of descriptions (``meta["objects"]``, see
:func:`vlalign.eval.parsing.annotations_of`) and an object vocabulary; a row without them is a
:class:`~vlalign.data.schema.DataError` naming the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlalign.data.pairs import PairStats, pair_meta
from vlalign.data.schema import DataError, PreferenceSample
from vlalign.eval.parsing import Annotations, ObjectVocabulary, annotations_of
from vlalign.eval.tasks import DESCRIBE, answer_correct, task_of
from vlalign.rewards.combine import BatchScorer

Scorer = BatchScorer
"""``(samples, completions) -> list of floats``: see the module doc."""

Pairing = Literal["best_worst", "all"]


# ----------------------------------------------------------------------------- scorers


@dataclass(frozen=True)
class Claim:
    """One atomic, checkable statement of a description."""

    object: str
    kind: Literal["present", "absent", "count"]
    count: int | None
    true: bool


def _needs_vocab(vocab: ObjectVocabulary | None, sample: Any, who: str) -> ObjectVocabulary:
    if vocab is None:
        raise DataError(
            f"{who}: sample {getattr(sample, 'id', '?')!r} is a description; scoring descriptions needs an "
            "object vocabulary (the shapes world's manifest.json, or a JSON file {object: [phrases]})"
        )
    return vocab


def split_claims(text: str, ann: Annotations, vocab: ObjectVocabulary) -> list[Claim]:
    """The atomic claims of ``text``, each checked against ``ann`` (see the module doc)."""
    claims: list[Claim] = []
    for m in vocab.find(text):
        present = m.name in ann.objects
        if m.negated:
            claims.append(Claim(m.name, "absent", None, not present))
            continue
        claims.append(Claim(m.name, "present", None, present))
        if present and m.count is not None and ann.counts is not None:
            claims.append(Claim(m.name, "count", m.count, ann.counts.get(m.name, 0) == m.count))
    return claims


def reference_claims(ann: Annotations) -> int:
    """How many claims the exact description of ``ann`` makes."""
    return len(ann.objects) * (2 if ann.counts is not None else 1)


def claim_score(text: str, ann: Annotations, vocab: ObjectVocabulary) -> float:
    """``(true - false) / reference`` claims of ``text`` (see the module doc)."""
    claims = split_claims(text, ann, vocab)
    good = sum(c.true for c in claims)
    return (good - (len(claims) - good)) / max(1, reference_claims(ann))


def stated_pairs(text: str, ann: Annotations, vocab: ObjectVocabulary) -> set[tuple[str, int | None]]:
    """The (object, count) pairs ``text`` affirms (count None when unsaid or the data has no counts)."""
    return {(m.name, m.count if ann.counts is not None else None) for m in vocab.find(text) if not m.negated}


def description_f1(text: str, ann: Annotations, vocab: ObjectVocabulary) -> float:
    """F1 between the (object, count) pairs of ``text`` and those of the annotations."""
    said = stated_pairs(text, ann, vocab)
    truth = {(o, ann.counts.get(o) if ann.counts is not None else None) for o in ann.objects}
    hits = len(said & truth)
    return 2 * hits / (len(said) + len(truth)) if said or truth else 1.0


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


def score_groups(scorer: Scorer, samples: Sequence[Any], completions: Sequence[Sequence[str]]) -> list[list[float]]:
    """Scores of ``completions[i][k]`` (answers to ``samples[i]``), in one scorer call."""
    flat_samples = [s for s, group in zip(samples, completions, strict=True) for _ in group]
    flat = [c for group in completions for c in group]
    scores = [float(x) for x in scorer(flat_samples, flat)] if flat else []
    if len(scores) != len(flat):
        raise ValueError(f"the scorer returned {len(scores)} scores for {len(flat)} completions")
    out, pos = [], 0
    for group in completions:
        out.append(scores[pos : pos + len(group)])
        pos += len(group)
    return out


# ----------------------------------------------------------------------------- pairing


def _candidates(
    scored: list[tuple[str, float]], threshold: float, pairing: Pairing, limit: int
) -> list[tuple[int, int]]:
    """Index pairs (better, worse) of ``scored`` (sorted best first) whose gap reaches ``threshold``."""
    if pairing == "best_worst":
        pairs = [(0, len(scored) - 1)]
    else:
        pairs = [(i, j) for i in range(len(scored)) for j in range(i + 1, len(scored))]
        pairs.sort(key=lambda ij: -(scored[ij[0]][1] - scored[ij[1]][1]))
    gap = [(i, j) for i, j in pairs if scored[i][1] - scored[j][1] >= threshold and scored[i][1] > scored[j][1]]
    return gap[:limit]


def rank_pairs(
    samples: Sequence[Any],
    completions: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    threshold: float = 0.0,
    pairing: Pairing = "best_worst",
    max_pairs_per_prompt: int = 1,
    source: str = "rank",
) -> tuple[list[PreferenceSample], PairStats]:
    """Pairs (chosen = higher score) from scored responses; the chosen always scores strictly more.

    Per prompt, identical responses are merged (the first one's score kept). ``pairing``:
    ``"best_worst"`` pairs the best response with the worst; ``"all"`` takes every pair whose gap
    reaches ``threshold``, largest gaps first. At most ``max_pairs_per_prompt`` pairs per prompt.
    """
    if pairing not in ("best_worst", "all"):
        raise ValueError(f"pairing must be 'best_worst' or 'all', not {pairing!r}")
    stats = PairStats(method="sample-and-rank")
    pairs: list[PreferenceSample] = []
    for sample, texts, values in zip(samples, completions, scores, strict=True):
        stats.inputs += 1
        unique: dict[str, float] = {}
        for text, value in zip(texts, values, strict=True):
            if not text.strip():
                stats.drop("empty response")
                continue
            unique.setdefault(text, float(value))
        if len(unique) < 2:
            stats.drop("fewer than 2 distinct responses")
            continue
        scored = sorted(unique.items(), key=lambda kv: -kv[1])
        if scored[0][1] == scored[-1][1]:
            stats.drop("all scores equal")
            continue
        chosen_pairs = _candidates(scored, threshold, pairing, max_pairs_per_prompt)
        if not chosen_pairs:
            stats.drop("score gap below threshold")
            continue
        for k, (i, j) in enumerate(chosen_pairs):
            (good, s_good), (bad, s_bad) = scored[i], scored[j]
            meta = pair_meta(
                sample.meta, source=source, chosen_score=s_good, rejected_score=s_bad, margin=s_good - s_bad
            )
            pairs.append(
                PreferenceSample(f"{sample.id}/{source}/{k}", list(sample.images), sample.prompt, good, bad, meta)
            )
            stats.add(source, s_good - s_bad)
    return pairs, stats


def sample_and_rank(
    samples: Sequence[Any],
    completions: Sequence[Sequence[str]],
    scorer: Scorer,
    **kwargs: Any,
) -> tuple[list[PreferenceSample], PairStats]:
    """Score ``completions`` with ``scorer`` and pair them by :func:`rank_pairs` (same keywords)."""
    return rank_pairs(samples, completions, score_groups(scorer, samples, completions), **kwargs)


# ----------------------------------------------------------------------------- scorer by name

SCORER_NAMES: tuple[str, ...] = ("ground_truth", "claims")


def build_scorer(spec: str, vocabulary: ObjectVocabulary | None = None) -> Scorer:
    """A scorer from its config name: ``ground_truth``, ``claims``, the folder of a reward model saved
    by ``vlalign rm`` (``<run>/model``, holding ``reward_model.json``), or ``file.py:name`` /
    ``package.module:name`` naming a scorer (``(samples, completions) -> scores``) or a function of no
    arguments that returns one."""
    if spec == "ground_truth":
        return GroundTruthScorer(vocabulary)
    if spec == "claims":
        return ClaimVerifier(vocabulary)
    from vlalign.models.heads import INFO_FILE

    if (Path(spec) / INFO_FILE).is_file():
        from vlalign.rewards.model import load_reward_scorer

        return load_reward_scorer(spec)
    if ":" not in spec:
        raise ValueError(
            f"unknown scorer {spec!r}: use one of {SCORER_NAMES}, a reward model folder "
            f"(with {INFO_FILE}), or 'file.py:name' / 'module:name'"
        )
    import inspect

    from vlalign.rewards.combine import load_user_function

    target = load_user_function(spec)
    if inspect.isclass(target) or _arity(target) == 0:
        target = target()
    if not callable(target):
        raise ValueError(f"scorer {spec!r} is not callable as (samples, completions) -> scores")
    return target


def _arity(fn: Any) -> int:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return -1
    return sum(
        p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params
    )
