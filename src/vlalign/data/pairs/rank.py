"""Sample and rank (as in RLAIF-V and self-rewarding loops): score n responses, pair the far-apart.

The responses come from a policy (:func:`vlalign.models.generate.generate` with ``n > 1`` and a
temperature); a *scorer* rates them and :func:`rank_pairs` pairs a better one (chosen) with a
worse one (rejected) when their scores differ by at least ``threshold``.

A scorer is any ``(samples, completions) -> one float per completion`` (``samples[i]`` is the
prompt that ``completions[i]`` answers; the protocol of :class:`vlalign.rewards.combine.BatchScorer`).
The scorers themselves need answer checking or a model, which data does not know: the ground-truth
scorer, the claim verifier and reward models are in :mod:`vlalign.eval.scorers`
(:func:`~vlalign.eval.scorers.build_scorer` makes one from its config name).

What is here is plain text against annotations, shared with hallucination injection (whose pair
margins are claim-score gaps): claim-level verification of a description (RLAIF-V's divide and
conquer). A description is split into atomic claims, each object mention giving "there is an X"
(or "there is no X" when negated) and, where a count is said and the annotations have counts,
"there are k X" for an X that is present. Each claim is checked against the annotations
(:class:`~vlalign.data.annotations.Annotations`); :func:`claim_score` is
``(true claims - false claims) / reference claims``, where the reference is what the exact
description would claim (one existence claim per object present, plus one count claim each when
counts are known). So an exact description scores 1, each hallucinated object costs
``1 / reference``, a miscount swaps a true claim for a false one. :func:`description_f1` is the F1
between the (object, count) pairs a description states and the annotated ones (names only when
the data has no counts): 1 for an exact description.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vlalign.data.annotations import Annotations, ObjectVocabulary
from vlalign.data.pairs import PairStats, pair_meta
from vlalign.data.schema import PreferenceSample

Scorer = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]
"""``(samples, completions) -> one float per completion``: see the module doc."""

Pairing = Literal["best_worst", "all"]


# ----------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """One atomic, checkable statement of a description."""

    object: str
    kind: Literal["present", "absent", "count"]
    count: int | None
    true: bool


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


# ----------------------------------------------------------------------------- pairing


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
