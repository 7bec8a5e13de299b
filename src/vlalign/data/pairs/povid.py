"""POVID rows (as in POVID): one chosen response and two rejected ones, a text and an image negative.

POVID (Zhou et al., "Aligning Modalities in Vision Large Language Models via Preference
Fine-tuning", arXiv 2402.11411) trains against two kinds of dispreferred response per prompt:

1. the ground-truth response with hallucinations injected into its text (the paper asks GPT-4V;
   here :func:`vlalign.data.pairs.inject.inject_pairs` makes exactly one false statement: an
   absent object added, an attribute or a count changed);
2. the model's own response to a distorted image, where its language prior shows through (the
   paper adds diffusion noise to the image: the ``noise`` corruption of
   :mod:`vlalign.data.pairs.corrupt`; ``crop`` and ``mask`` work too).

A row holds ``chosen`` (the faithful response), ``rejected`` (the injected one) and
``rejected_extra`` (a one-element list: the response to the distorted image), in the column
layout that :func:`vlalign.data.io.load_samples` reads and that the DPO recipe's ``povid`` loss
scores as ``rejected_logps`` of shape ``(B, 2)``. Training always shows the original image; the
distorted one only produced the second negative.

:func:`povid_pairs` runs the three steps: injection, :func:`distorted_prompts` (the prompts with
their images distorted, deterministically: each image file's distortion is drawn from the seed
and the file name, as in :func:`~vlalign.data.pairs.corrupt.corrupt_pairs`), and the policy's
responses to them, which come from a ``respond`` callable (data knows no model:
``vlalign pairs --method=povid`` passes the generation of sample-and-rank). A row is dropped
(counted) when its distorted-image response is empty, repeats the chosen text (the pair would
carry no preference), or, with ``require_worse``, is not worse than the chosen: for a description
its claim score (:func:`~vlalign.data.pairs.rank.claim_score`) is not below the chosen's, for a
short answer it gives the same answer. POVID keeps every response; ``require_worse=False`` does.

Each row's meta keeps the source sample's columns and the injection's (``injected``, ``margin``:
the injection's claim-score gap), with ``source`` ``"povid"``, ``injection`` (the injection's
source, e.g. ``"inject-add"``), ``distortion`` (method, level, grid and the seed of each image)
and ``distorted_margin`` (the chosen's claim score minus the distorted-image response's; for a
short answer 1 when the answers differ, else 0). The statistics' margins are the
``distorted_margin`` values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vlalign.data.annotations import DESCRIBE, ObjectVocabulary, annotations_of, task_of
from vlalign.data.pairs import PairStats, pair_meta
from vlalign.data.pairs.corrupt import CORRUPTIONS, CorruptConfig, corrupt_image, image_seed
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.data.pairs.rank import claim_score
from vlalign.data.schema import PreferenceSample, PromptSample, SupervisedSample

SOURCE = "povid"

Respond = Callable[[Sequence[PromptSample]], Sequence[str]]
"""``respond(prompts) -> one response per prompt``: the policy answering the distorted images."""


def distorted_prompts(pairs: Sequence[PreferenceSample], distortion: CorruptConfig) -> list[PromptSample]:
    """Each pair's prompt with its images distorted by ``distortion`` (ids are the pairs' ids).

    The seed of each image is recorded in ``meta["distortion_seeds"]``.
    """
    if distortion.method not in CORRUPTIONS:
        raise ValueError(f"unknown distortion {distortion.method!r}; choose from {CORRUPTIONS}")
    out = []
    for pair in pairs:
        seeds = [image_seed(distortion.seed, pair.id, image, k) for k, image in enumerate(pair.images)]
        images = [
            corrupt_image(image, distortion.method, distortion.level, seed, grid=distortion.grid)
            for image, seed in zip(pair.images, seeds)
        ]
        out.append(PromptSample(pair.id, images, pair.prompt, {"distortion_seeds": seeds}))
    return out


def _answer(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def distorted_margin(pair: PreferenceSample, response: str, vocab: ObjectVocabulary) -> float:
    """How much better the chosen response is than ``response`` (see the module doc)."""
    if task_of(pair) == DESCRIBE:
        ann = annotations_of(pair, required_by="POVID pairs")
        assert ann is not None
        return claim_score(pair.chosen, ann, vocab) - claim_score(response, ann, vocab)
    return 0.0 if _answer(response) == _answer(pair.chosen) else 1.0


def povid_rows(
    pairs: Sequence[PreferenceSample],
    prompts: Sequence[PromptSample],
    responses: Sequence[str],
    vocab: ObjectVocabulary,
    distortion: CorruptConfig,
    stats: PairStats,
    *,
    require_worse: bool = True,
) -> list[PreferenceSample]:
    """POVID rows from injection pairs and the responses to their :func:`distorted_prompts`;
    drops are counted in ``stats`` (see the module doc)."""
    if not len(pairs) == len(prompts) == len(responses):
        raise ValueError(f"{len(pairs)} pairs, {len(prompts)} prompts and {len(responses)} responses")
    rows = []
    for pair, prompt, response in zip(pairs, prompts, responses):
        text = response.strip()
        if not text:
            stats.drop("empty distorted-image response")
            continue
        if text == pair.chosen.strip():
            stats.drop("distorted-image response equals chosen")
            continue
        margin = distorted_margin(pair, text, vocab)
        if require_worse and margin <= 0:
            stats.drop("distorted-image response not worse than chosen")
            continue
        info = {"method": distortion.method, "level": distortion.level, "grid": distortion.grid}
        meta = pair_meta(
            pair.meta,
            source=SOURCE,
            injection=pair.meta.get("source"),
            distortion={**info, "seeds": prompt.meta["distortion_seeds"]},
            distorted_margin=margin,
        )
        rows.append(
            PreferenceSample(
                f"{pair.id}/{SOURCE}", list(pair.images), pair.prompt, pair.chosen, pair.rejected, meta, [text]
            )
        )
        stats.add(SOURCE, margin)
    return rows


def povid_pairs(
    samples: Sequence[SupervisedSample],
    vocab: ObjectVocabulary,
    respond: Respond,
    *,
    inject: InjectConfig | None = None,
    distortion: CorruptConfig | None = None,
    require_worse: bool = True,
    chunk_size: int = 256,
) -> tuple[list[PreferenceSample], PairStats]:
    """POVID rows from faithful ``samples`` (completion = chosen): injection, then the policy's
    responses to the distorted images, asked ``chunk_size`` prompts at a time (so that only that
    many distorted images are held at once).

    ``distortion`` defaults to the ``noise`` corruption at level 0.5. Samples the injection
    cannot use are counted under its reasons, as in :func:`~vlalign.data.pairs.inject.inject_pairs`.
    """
    distortion = distortion or CorruptConfig(method="noise", level=0.5)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pairs, injected = inject_pairs(samples, vocab, inject)
    stats = PairStats(
        method=f"POVID (injection + responses to {distortion.method}-distorted images, level {distortion.level:g})",
        inputs=injected.inputs,
        dropped=dict(injected.dropped),
    )
    rows: list[PreferenceSample] = []
    for lo in range(0, len(pairs), chunk_size):
        chunk = pairs[lo : lo + chunk_size]
        prompts = distorted_prompts(chunk, distortion)
        responses = list(respond(prompts))
        rows.extend(povid_rows(chunk, prompts, responses, vocab, distortion, stats, require_worse=require_worse))
    return rows, stats
