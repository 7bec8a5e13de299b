"""Pairwise (Bradley-Terry) loss for training a scalar reward model on preference pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .preference import LossOutput

CENTER_MODES = ("squared", "abs_mean")


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | float | None = None,
    center_coef: float = 0.0,
    center_mode: str = "squared",
) -> LossOutput:
    """Bradley-Terry pairwise loss, with an optional margin and a term that keeps rewards centred.

    Papers: Bradley & Terry (1952); Ouyang et al., InstructGPT, arXiv 2203.02155, eq. 1;
    margin: Llama 2, arXiv 2307.09288; centring: Eisenstein et al., arXiv 2312.09244 (squared,
    TRL's ``center_rewards_coefficient``) or LLaVA-RLHF, arXiv 2309.14525 (absolute batch mean).
    Equation: L_i = −log σ(R_w,i − R_l,i − m_i) + c·C_i with
    ``center_mode="squared"``: C_i = (R_w,i + R_l,i)²  (a per-example term), or
    ``center_mode="abs_mean"``: C_i = |mean_j (R_w,j + R_l,j)| (one batch term, the same for every i,
    so that the mean of the returned losses is the batch loss).
    Inputs are ``(B,)`` scalar rewards. Departures: the abs-mean form couples the examples of a
    batch, so it does not decompose over data-parallel shards; the squared form does.
    Metrics: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.ndim != 1:
        raise ValueError(
            f"chosen_rewards and rejected_rewards must both have shape (B,), got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    if center_mode not in CENTER_MODES:
        raise ValueError(f"center_mode must be one of {CENTER_MODES}, got {center_mode!r}")
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    losses = -F.logsigmoid(diff)
    if center_coef:
        total = chosen_rewards + rejected_rewards
        if center_mode == "squared":
            losses = losses + center_coef * total**2
        else:
            losses = losses + center_coef * total.mean().abs()
    chosen = chosen_rewards.detach()
    rejected = rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "rewards/accuracy": (chosen > rejected).to(chosen.dtype).mean(),
    }
    return LossOutput(losses, metrics)


REWARD_MODEL_LOSSES = {"bradley_terry": bradley_terry_loss}
"""Reward-model losses by name; signature ``fn(chosen_rewards, rejected_rewards, **hp)``."""
