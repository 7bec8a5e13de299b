"""Preference objectives made for vision-language models: mDPO, DDPO (RLHF-V), HSA-DPO, POVID.

They build on :class:`~vlalign.losses.preference.PreferenceLogps` and keep the paired-loss
signature ``fn(logps, *, beta, **hp) -> LossOutput``. DDPO is not a loss of its own: it changes how
per-token log-probs are reduced to per-sequence ones (:func:`ddpo_sequence_logps`), after which
plain DPO applies; :func:`differing_segments` finds the tokens that get the larger weight.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .preference import (
    LossOutput,
    PreferenceLogps,
    PreferenceLoss,
    implicit_reward_metrics,
    require_reference,
)


def mdpo_loss(
    logps: PreferenceLogps,
    *,
    beta: float = 0.1,
    anchor_delta: float = 0.0,
    conditional_weight: float = 1.0,
    anchor_weight: float = 1.0,
) -> LossOutput:
    """mDPO: DPO plus an image-conditional preference term and a reward anchor.

    Paper: Wang et al., "mDPO: Conditional Preference Optimization for Multimodal LLMs",
    arXiv 2406.11839. With m' a corrupted image:
    L = −log σ(β·h) − log σ(β·[r(y_w|m) − r(y_w|m')]) − log σ(β·r(y_w|m) − δ).
    Needs ``corrupted_chosen_logps`` and ``ref_corrupted_chosen_logps`` in ``logps``.
    Departures: the two extra terms carry weights (1 and 1 in the paper and its code); δ = 0 as in
    the code. How m' is made (random crop in the paper, masked visual tokens in the code) is the
    caller's choice.
    """
    if logps.corrupted_chosen_logps is None or logps.ref_corrupted_chosen_logps is None:
        raise ValueError(
            "mdpo needs corrupted_chosen_logps and ref_corrupted_chosen_logps: the chosen completion's "
            "log-probs under a corrupted image, from the policy and the reference"
        )
    chosen_ratio, rejected_ratio = require_reference(logps, "mdpo")
    corrupted_ratio = logps.corrupted_chosen_logps - logps.ref_corrupted_chosen_logps  # (B,)
    dpo_term = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    conditional_term = -F.logsigmoid(beta * (chosen_ratio - corrupted_ratio))
    anchor_term = -F.logsigmoid(beta * chosen_ratio - anchor_delta)
    losses = dpo_term + conditional_weight * conditional_term + anchor_weight * anchor_term
    metrics = implicit_reward_metrics(beta * chosen_ratio, beta * rejected_ratio, logps)
    corrupted_rewards = (beta * corrupted_ratio).detach()
    chosen_rewards = (beta * chosen_ratio).detach()
    metrics.update(
        {
            "rewards/corrupted_chosen": corrupted_rewards.mean(),
            "rewards/conditional_margin": (chosen_rewards - corrupted_rewards).mean(),
            "rewards/conditional_accuracy": (chosen_rewards > corrupted_rewards).to(losses.dtype).mean(),
            "loss/dpo": dpo_term.detach().mean(),
            "loss/conditional": conditional_term.detach().mean(),
            "loss/anchor": anchor_term.detach().mean(),
        }
    )
    return LossOutput(losses, metrics)


def ddpo_token_weights(
    mask: Tensor, segment_mask: Tensor, *, gamma: float = 5.0, dtype: torch.dtype | None = None
) -> Tensor:
    """Dense DDPO weights: γ on tokens of differing segments, 1 on other completion tokens, 0 on padding.

    ``mask`` and ``segment_mask`` are ``(B, T)`` bool; returns ``(B, T)`` in ``dtype`` (default dtype
    if None).
    """
    if mask.shape != segment_mask.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and segment_mask {tuple(segment_mask.shape)} must match")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    one = torch.ones((), dtype=dtype, device=mask.device)
    weights = torch.where(segment_mask.bool(), gamma * one, one)
    return torch.where(mask.bool(), weights, 0 * one)


def ddpo_sequence_logps(
    token_logps: Tensor, mask: Tensor, segment_mask: Tensor, *, gamma: float = 5.0, normalize: bool = True
) -> Tensor:
    """RLHF-V's dense-weighted sequence log-prob, to be fed to DPO in place of the plain sum.

    Paper: Yu et al., "RLHF-V", arXiv 2312.00849 (DDPO):
    log π(y|x) = (1/N)·[Σ_{t∈y_u} log p(y_t) + γ·Σ_{t∈y_c} log p(y_t)], N = |y_u| + γ·|y_c|,
    y_c the tokens of corrected (differing) segments, y_u the rest.
    ``token_logps``, ``mask``, ``segment_mask``: ``(B, T)``. Returns ``(B,)``.
    Departures: ``normalize=False`` gives the unnormalised weighted sum (the RLAIF-V code's
    ``dpo_use_average=False``). γ = 5 as in the paper; the RLAIF-V code defaults to 3.
    """
    weights = ddpo_token_weights(mask, segment_mask, gamma=gamma, dtype=token_logps.dtype)  # (B, T)
    safe_logps = torch.where(mask.bool(), token_logps, 0.0)
    weighted = (safe_logps * weights).sum(-1)  # (B,)
    if not normalize:
        return weighted
    return weighted / weights.sum(-1).clamp(min=torch.finfo(weights.dtype).tiny)


def differing_segments(
    chosen_ids: Sequence[int], rejected_ids: Sequence[int], *, min_match_size: int = 3
) -> tuple[Tensor, Tensor]:
    """Mark the tokens of a chosen/rejected pair that lie outside their common segments.

    Matching blocks come from :class:`difflib.SequenceMatcher` (``autojunk`` off, so frequent
    tokens still match); blocks shorter than ``min_match_size`` tokens do not count as common,
    as in the RLHF-V/RLAIF-V code (``get_diff_ids`` with ``min_match_size=3``), so a shared
    one-token "the" inside a rewritten phrase stays part of the differing segment.
    Returns two bool tensors of lengths ``len(chosen_ids)`` and ``len(rejected_ids)``.
    """
    if min_match_size < 1:
        raise ValueError(f"min_match_size must be >= 1, got {min_match_size}")
    chosen = list(chosen_ids)
    rejected = list(rejected_ids)
    chosen_diff = torch.ones(len(chosen), dtype=torch.bool)
    rejected_diff = torch.ones(len(rejected), dtype=torch.bool)
    matcher = difflib.SequenceMatcher(None, chosen, rejected, autojunk=False)
    for block in matcher.get_matching_blocks():
        if block.size >= min_match_size:
            chosen_diff[block.a : block.a + block.size] = False
            rejected_diff[block.b : block.b + block.size] = False
    return chosen_diff, rejected_diff


def hsa_dpo_loss(
    logps: PreferenceLogps,
    *,
    beta: float = 0.1,
    severity: Tensor | float = 1.0,
    chosen_weight: Tensor | float = 1.0,
) -> LossOutput:
    """HSA-DPO: DPO whose rejected log-probs are scaled by the response's hallucination severity.

    Paper: Xiao et al., "Detecting and Mitigating Hallucination in LVLMs via Fine-Grained AI
    Feedback", arXiv 2404.14233.
    Equation: logits = [w_c·lp_w − w_r·lp_l] − [w_c·ref_w − w_r·ref_l], L = −log σ(β·logits),
    w_r = ``severity`` (B,) of the rejected response, w_c = ``chosen_weight`` (1 by default).
    Departures: none (matches the authors' ``dpo_loss`` with ``use_rejected_score``). Rewards
    are reported unweighted, as in their code. Add the paper's auxiliary LM term with
    ``combine_losses(weights={"hsa_dpo": 1, "nll": γ})``.
    """
    chosen_ratio, rejected_ratio = require_reference(logps, "hsa_dpo")
    w_r = torch.as_tensor(severity, dtype=rejected_ratio.dtype, device=rejected_ratio.device)
    w_c = torch.as_tensor(chosen_weight, dtype=chosen_ratio.dtype, device=chosen_ratio.device)
    logits = w_c * chosen_ratio - w_r * rejected_ratio  # (B,)
    losses = -F.logsigmoid(beta * logits)
    metrics = implicit_reward_metrics(beta * chosen_ratio, beta * rejected_ratio, logps)
    metrics["hsa/severity"] = w_r.detach().float().mean().to(losses.dtype)
    return LossOutput(losses, metrics)


def povid_loss(
    logps: PreferenceLogps, *, beta: float = 0.1, negative_weights: Sequence[float] | Tensor | None = None
) -> LossOutput:
    """POVID: DPO against several rejected responses per chosen one, averaged.

    Paper: Zhou et al., "Aligning Modalities in VLMs via Preference Fine-tuning" (POVID),
    arXiv 2402.11411. Rejected responses are (K = 2) text with injected hallucinations and the
    model's own answer under a noised image:
    L = Σ_k w_k·[−log σ(β·(r(y_w) − r(y_l^k)))], w = (0.5, 0.5) by default (uniform 1/K).
    ``logps.rejected_logps`` is ``(B, K)``. Departures: none for K = 2 (matches the authors'
    ``0.5 * self_losses + 0.5 * losses``); any K and weights are allowed.
    """
    chosen_ratio, rejected_ratio = require_reference(logps, "povid")
    if rejected_ratio.ndim != 2:
        raise ValueError("povid needs rejected_logps of shape (B, K): K rejected responses per chosen one")
    num_negatives = rejected_ratio.shape[1]
    if negative_weights is None:
        weights = torch.full((num_negatives,), 1.0 / num_negatives, dtype=chosen_ratio.dtype)
    else:
        weights = torch.as_tensor(negative_weights, dtype=chosen_ratio.dtype)
        if weights.shape != (num_negatives,):
            raise ValueError(
                f"negative_weights must have {num_negatives} entries (one per rejected response), "
                f"got shape {tuple(weights.shape)}"
            )
    weights = weights.to(chosen_ratio.device)
    per_negative = -F.logsigmoid(beta * (chosen_ratio.unsqueeze(-1) - rejected_ratio))  # (B, K)
    losses = (per_negative * weights).sum(-1)
    metrics = implicit_reward_metrics(beta * chosen_ratio, beta * rejected_ratio, logps)
    for k in range(num_negatives):
        metrics[f"loss/negative_{k}"] = per_negative[:, k].detach().mean()
    return LossOutput(losses, metrics)


LVLM_LOSSES: dict[str, PreferenceLoss] = {
    "mdpo": mdpo_loss,
    "hsa_dpo": hsa_dpo_loss,
    "povid": povid_loss,
}
"""LVLM preference objectives by name, same signature as ``PREFERENCE_LOSSES``. DDPO is
``"sigmoid"`` applied to :func:`ddpo_sequence_logps` outputs."""
