"""Preference batches laid out for ONE log-prob call, and their per-sequence log-probs.

:func:`preference_batch` lays out pairs, 1 + K negatives (POVID) and, with ``corrupted_prompts``,
the chosen completion under a corrupted image (mDPO: another prompt, same forward);
:func:`preference_logprobs` returns :class:`PreferenceLogprobs`, the per-sequence sums a
``PreferenceLogps`` needs. A reference policy scores ``batch.prompts`` / ``batch.completions``
and ``batch.split`` shapes its result the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlalign.data.collate import EncodedPrompts
from vlalign.models.logprobs import CompletionLogprobs, completion_logprobs
from vlalign.models.packing import concat_prompts


@dataclass
class PreferenceLogprobs:
    """Per-sequence log-probs of a preference batch, shaped as :class:`~vlalign.losses.PreferenceLogps` wants.

    ``*_rows`` index the rows of ``tokens`` (the per-token result) for per-token losses (DDPO).
    """

    chosen_logps: Tensor  # (B,)
    rejected_logps: Tensor  # (B,) or (B, K)
    chosen_lengths: Tensor  # (B,) long
    rejected_lengths: Tensor  # like rejected_logps
    chosen_rows: Tensor  # (B,) long
    rejected_rows: Tensor  # like rejected_logps
    tokens: CompletionLogprobs
    corrupted_chosen_logps: Tensor | None = None  # (B,): the chosen completion under the corrupted image (mDPO)
    corrupted_rows: Tensor | None = None  # (B,) long


@dataclass
class PreferenceBatch:
    """A preference batch laid out for ONE log-prob call (policy and reference alike).

    Prompt ``i`` (of B) carries ``[chosen_i, rejected_i1, ..., rejected_iK]``; with mDPO's
    corrupted images, corrupted prompt ``i`` (appended after the B prompts) carries ``[chosen_i]``.
    """

    prompts: EncodedPrompts
    completions: list[list[list[int]]]
    num_pairs: int
    num_rejected: int
    rejected_matrix: bool
    """Rejected log-probs come out as ``(B, K)`` (True) or ``(B,)`` (False, one rejected each)."""
    has_corrupted: bool

    def split(self, result: CompletionLogprobs) -> PreferenceLogprobs:
        """Per-sequence sums of ``result`` (of this batch's completions) as chosen / rejected / corrupted."""
        b, k = self.num_pairs, self.num_rejected
        device = result.logps.device
        base = torch.arange(b, device=device) * (1 + k)  # (B,)
        chosen = base
        rejected = base[:, None] + 1 + torch.arange(k, device=device)[None, :]  # (B, K)
        if not self.rejected_matrix:
            rejected = rejected[:, 0]
        sums, lengths = result.sums, result.lengths
        corrupted = b * (1 + k) + torch.arange(b, device=device) if self.has_corrupted else None
        return PreferenceLogprobs(
            chosen_logps=sums[chosen],
            rejected_logps=sums[rejected],
            chosen_lengths=lengths[chosen],
            rejected_lengths=lengths[rejected],
            chosen_rows=chosen,
            rejected_rows=rejected,
            tokens=result,
            corrupted_chosen_logps=sums[corrupted] if corrupted is not None else None,
            corrupted_rows=corrupted,
        )


def preference_batch(
    prompts: EncodedPrompts,
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]],
    *,
    corrupted_prompts: EncodedPrompts | None = None,
) -> PreferenceBatch:
    """Lay out pairs (``rejected[i]`` one completion's ids) or 1 + K negatives (``rejected[i]`` K completions).

    ``corrupted_prompts``: the same prompts with corrupted images (mDPO), in the same order; the
    chosen completion is scored under them too, in the same forward.
    """
    n = len(prompts)
    if len(chosen) != n or len(rejected) != n:
        raise ValueError(
            f"preference_batch: {n} prompts, {len(chosen)} chosen and {len(rejected)} rejected completions"
        )
    matrix = n > 0 and len(rejected[0]) > 0 and not isinstance(rejected[0][0], int)
    groups = [list(r) if matrix else [r] for r in rejected]
    k = len(groups[0]) if groups else 1
    for i, group in enumerate(groups):
        if len(group) != k:
            raise ValueError(
                f"preference_batch: sample {prompts.sample_ids[i]!r} has {len(group)} rejected "
                f"completions, the first has {k}; give every sample the same number"
            )
    completions = [[list(c)] + [list(r) for r in group] for c, group in zip(chosen, groups)]
    if corrupted_prompts is not None:
        if len(corrupted_prompts) != n:
            raise ValueError(f"preference_batch: {len(corrupted_prompts)} corrupted prompts for {n} prompts")
        prompts = concat_prompts(prompts, corrupted_prompts)
        completions += [[list(c)] for c in chosen]
    return PreferenceBatch(
        prompts=prompts,
        completions=completions,
        num_pairs=n,
        num_rejected=k,
        rejected_matrix=matrix,
        has_corrupted=corrupted_prompts is not None,
    )


def preference_logprobs(model: nn.Module, batch: PreferenceBatch, **kwargs: Any) -> PreferenceLogprobs:
    """:func:`completion_logprobs` of a :class:`PreferenceBatch`, split into chosen / rejected / corrupted."""
    return batch.split(completion_logprobs(model, batch.prompts, batch.completions, **kwargs))
