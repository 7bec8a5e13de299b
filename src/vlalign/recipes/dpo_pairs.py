"""The batch phase of ``vlalign dpo``: preference samples laid out for one log-prob forward.

:class:`PairEncoder` turns a micro-batch of :class:`~vlalign.data.schema.PreferenceSample` into a
:class:`PairBatch` with ONE processor call: each prompt (and image) is encoded once and carries its
chosen and rejected completions (several rejected ones for POVID); for mDPO the same prompts with
corrupted images go through the same call; RLHF-V's differing segments, HSA-DPO's severities and
the keys of the reference cache are attached when the objective needs them; :func:`ddpo_sums`
turns the differing segments into RLHF-V's dense-weighted sequence log-probs;
:func:`precompute_reference` fills the reference cache with the encoded pairs before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vlalign.data.chat import response_affixes
from vlalign.data.collate import (
    EncodedPrompts,
    check_lengths,
    encode_completions,
    encode_prompts,
    end_of_turn_ids,
    pad_token_id_of,
)
from vlalign.data.pairs.corrupt import CorruptConfig, corrupt_image, corruption_seed
from vlalign.data.schema import DataError, PreferenceSample, PromptSample, load_image
from vlalign.losses import ddpo_sequence_logps, differing_segments
from vlalign.models.fingerprints import sample_content_hash
from vlalign.models.preference_batch import PreferenceBatch, PreferenceLogprobs, preference_batch
from vlalign.models.reference import PrecomputedReference, ReferencePolicy
from vlalign.recipes.preference_common import REJECTED_IMAGES, chunks, finish_precompute, numeric_column
from vlalign.training import Run


@dataclass
class PairBatch:
    """A micro-batch of preference pairs laid out for one log-prob forward (policy and reference alike)."""

    batch: PreferenceBatch
    samples: list[PreferenceSample]
    dropped_ids: list[str]
    keys: list[str] | None = None
    """Content hashes of the batch's prompts (corrupted ones after), keys of the reference cache."""
    severity: Tensor | None = None  # (B,) float64
    chosen_diff: list[list[bool]] | None = None
    """DDPO: per pair, which chosen tokens lie in segments that differ from the rejected one."""
    rejected_diff: list[list[bool]] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def sample_ids(self) -> list[str]:
        return [s.id for s in self.samples]


class PairEncoder:
    """``PreferenceSample`` list -> :class:`PairBatch`, with ONE processor call per micro-batch.

    With ``corruption`` (mDPO), each sample's images are corrupted (or its ``rejected_images`` read)
    and the corrupted prompts go through the same processor call as the originals. Pairs longer
    than ``max_length`` (prompt + longest completion, under either image) are dropped and counted
    in ``num_dropped``, or refused with ``on_overflow="raise"``. ``response_tokens="trl"`` scores
    what TRL scores: everything the chat template writes after the prompt (the separator before the
    response, the response, the end of turn and the whitespace after it; ``response_affixes``).
    """

    def __init__(
        self,
        processor: Any,
        *,
        max_length: int | None,
        on_overflow: Literal["drop", "raise"] = "drop",
        corruption: CorruptConfig | None = None,
        extra_rejected: bool = False,
        severity_column: str | None = None,
        ddpo_min_match: int | None = None,
        content_keys: bool = False,
        response_tokens: Literal["vlalign", "trl"] = "vlalign",
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.on_overflow: Literal["drop", "raise"] = on_overflow
        self.corruption = corruption
        self.extra_rejected = extra_rejected
        self.severity_column = severity_column
        self.ddpo_min_match = ddpo_min_match
        self.content_keys = content_keys
        self.eot_ids = end_of_turn_ids(processor)
        if response_tokens not in ("vlalign", "trl"):
            raise ValueError(f"response_tokens must be 'vlalign' or 'trl', not {response_tokens!r}")
        self.affixes = response_affixes(processor) if response_tokens == "trl" else None
        self.pad_token_id = pad_token_id_of(processor)
        self.num_dropped = 0

    def _corrupted(self, sample: PreferenceSample, images: list[Any]) -> list[Any]:
        given = sample.meta.get(REJECTED_IMAGES)
        if given is not None:
            return [load_image(x) for x in given]
        c = self.corruption
        assert c is not None
        seed = corruption_seed(c.seed, sample.id)
        return [corrupt_image(im, c.method, c.level, seed + k, grid=c.grid) for k, im in enumerate(images)]

    def _texts(self, samples: Sequence[PreferenceSample]) -> list[list[str]]:
        if not self.extra_rejected:
            return [[s.chosen, s.rejected] for s in samples]
        k = 1 + len(samples[0].rejected_extra)
        for s in samples:
            if 1 + len(s.rejected_extra) != k:
                raise DataError(
                    f"sample {s.id!r} has {1 + len(s.rejected_extra)} rejected responses and sample "
                    f"{samples[0].id!r} has {k}; povid needs the same number in every row"
                )
        return [[s.chosen, s.rejected, *s.rejected_extra] for s in samples]

    def __call__(self, samples: Sequence[PreferenceSample], *, count: bool = True) -> PairBatch:
        if not samples:
            return PairBatch(preference_batch(_empty_prompts(), [], []), [], [])
        images = [[load_image(x) for x in s.images] for s in samples]
        views = [PromptSample(s.id, ims, s.prompt) for s, ims in zip(samples, images)]
        if self.corruption is not None:
            bad = [self._corrupted(s, ims) for s, ims in zip(samples, images)]
            views += [PromptSample(f"{s.id}#corrupted", ims, s.prompt) for s, ims in zip(samples, bad)]
        encoded = encode_prompts(self.processor, views)  # the micro-batch's one processor call
        n = len(samples)
        prompts = encoded.select(range(n))
        completions = encode_completions(
            self.processor, self._texts(samples), eot_ids=self.eot_ids, affixes=self.affixes
        )
        keep, _ = check_lengths(prompts, completions, max_length=self.max_length, on_overflow=self.on_overflow)
        corrupted = encoded.select(range(n, 2 * n)) if self.corruption is not None else None
        if corrupted is not None:
            ok, _ = check_lengths(
                corrupted, [[c[0]] for c in completions], max_length=self.max_length, on_overflow=self.on_overflow
            )
            keep = [i for i in keep if i in set(ok)]
        dropped = [samples[i].id for i in range(n) if i not in set(keep)]
        if count:
            self.num_dropped += len(dropped)
        return self._layout(samples, images, views, prompts, corrupted, completions, keep, dropped)

    def _layout(
        self,
        samples: Sequence[PreferenceSample],
        images: list[list[Any]],
        views: list[PromptSample],
        prompts: EncodedPrompts,
        corrupted: EncodedPrompts | None,
        completions: list[list[list[int]]],
        keep: list[int],
        dropped: list[str],
    ) -> PairBatch:
        kept = [samples[i] for i in keep]
        comps = [completions[i] for i in keep]
        rejected = [c[1:] for c in comps] if self.extra_rejected else [c[1] for c in comps]
        batch = preference_batch(
            prompts.select(keep),
            [c[0] for c in comps],
            rejected,
            corrupted_prompts=corrupted.select(keep) if corrupted is not None else None,
        )
        out = PairBatch(batch, kept, dropped)
        if self.content_keys:
            n = len(samples)
            keys = [sample_content_hash(samples[i].prompt, images[i]) for i in keep]
            if corrupted is not None:
                keys += [sample_content_hash(samples[i].prompt, views[n + i].images) for i in keep]
            out.keys = keys
        if self.severity_column and kept:
            out.severity = numeric_column(kept, self.severity_column, needed_by="the hsa_dpo loss")
        if self.ddpo_min_match is not None:
            diffs = [differing_segments(c[0], c[1], min_match_size=self.ddpo_min_match) for c in comps]
            out.chosen_diff = [d[0].tolist() for d in diffs]
            out.rejected_diff = [d[1].tolist() for d in diffs]
        return out


def _empty_prompts() -> EncodedPrompts:
    return EncodedPrompts([], [], {}, {}, {}, [], [])


# ----------------------------------------------------------------------------- RLHF-V dense weights


def _diff_mask(diffs: list[list[bool]], width: int, device: torch.device) -> Tensor:
    mask = torch.zeros((len(diffs), width), dtype=torch.bool)
    for i, row in enumerate(diffs):
        mask[i, : len(row)] = torch.tensor(row, dtype=torch.bool)
    return mask.to(device)


def ddpo_sums(
    lp: PreferenceLogprobs,
    pb: PairBatch,
    *,
    gamma: float,
    normalize: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """RLHF-V dense-weighted sequence log-probs of chosen, rejected (and corrupted chosen), ``(B,)`` each."""
    if lp.rejected_rows.ndim != 1:
        raise ValueError("ddpo_gamma > 0 needs one rejected response per pair (not povid's several)")
    assert pb.chosen_diff is not None and pb.rejected_diff is not None
    tok = lp.tokens
    width, device = tok.logps.shape[1], tok.logps.device
    seg_c, seg_r = _diff_mask(pb.chosen_diff, width, device), _diff_mask(pb.rejected_diff, width, device)

    def weighted(rows: Tensor, seg: Tensor) -> Tensor:
        return ddpo_sequence_logps(tok.logps[rows], tok.mask[rows], seg, gamma=gamma, normalize=normalize)

    corrupted = weighted(lp.corrupted_rows, seg_c) if lp.corrupted_rows is not None else None
    return weighted(lp.chosen_rows, seg_c), weighted(lp.rejected_rows, seg_r), corrupted


def precompute_reference(
    run: Run, reference: ReferencePolicy, encoder: PairEncoder, samples: Sequence[PreferenceSample], *, batch_size: int
) -> None:
    """Fill the reference cache for ``samples`` (main process), then free the reference model everywhere."""
    if not isinstance(reference, PrecomputedReference):
        return
    if run.accelerator.is_main_process:
        with run.accelerator.autocast():  # the precision the training steps compute in
            for chunk in tqdm(list(chunks(samples, batch_size)), desc="reference", disable=not run.cfg.progress):
                pb = encoder(chunk, count=False)
                if len(pb):
                    reference.logprobs(pb.batch.prompts, pb.batch.completions, sample_keys=pb.keys)
        run.print(
            f"reference cache: {reference.num_computed} completions computed, {reference.num_hits} cached "
            f"({reference.folder})"
        )
    finish_precompute(reference, run)
