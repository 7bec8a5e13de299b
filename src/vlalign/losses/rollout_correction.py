"""Correction for the mismatch between the rollout engine and the trainer.

When completions are sampled by a separate inference engine (vLLM), the engine's distribution
π_engine differs slightly from the trainer's π_θ_old even with identical weights (other kernels,
other precision, other reduction order). The policy-gradient estimate then is off-policy; truncated
importance sampling (TIS) reweights each token by how much more likely the trainer finds it than
the engine did, capped so that one rare token cannot dominate.
"""

from __future__ import annotations

import torch
from torch import Tensor


def truncated_is_weights(
    logp_trainer: Tensor, logp_engine: Tensor, mask: Tensor, *, cap: float = 2.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token truncated importance weights ``(B, T)`` of the trainer over the rollout engine.

    Paper: Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
    (2025, the TIS of verl and TRL). Equation: w_t = min(π_θ_old(y_t | ·) / π_engine(y_t | ·), C)
    with C = ``cap``; the policy-gradient loss of token t is multiplied by w_t.
    ``logp_trainer``: log π_θ_old of the sampled tokens, recomputed by the trainer (the old
    log-probs); ``logp_engine``: the same tokens' log-probs as the engine reported them. Both at the
    sampling temperature.
    Departures: the weights are detached (they scale the gradient, as in the paper, but are not
    differentiated); padded positions get weight 0. The log-ratio is clamped at ±20 before exp.
    Metrics: ``rollout_is/weight_mean`` (mean weight before the cap), ``rollout_is/capped_frac``
    (share of tokens whose weight was capped), ``rollout_is/log_ratio_abs`` (mean |log w|).
    """
    if logp_trainer.shape != logp_engine.shape or logp_trainer.shape != mask.shape:
        raise ValueError(
            f"logp_trainer {tuple(logp_trainer.shape)}, logp_engine {tuple(logp_engine.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape (B, T)"
        )
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    valid = mask.bool()
    zero = torch.zeros((), dtype=logp_trainer.dtype, device=logp_trainer.device)
    log_ratio = torch.where(valid, logp_trainer.detach() - logp_engine.detach().to(logp_trainer.dtype), zero)
    raw = torch.exp(log_ratio.clamp(-20.0, 20.0))
    weights = torch.where(valid, raw.clamp(max=cap), zero)
    count = valid.sum().clamp(min=1).to(raw.dtype)
    metrics = {
        "rollout_is/weight_mean": torch.where(valid, raw, zero).sum() / count,
        "rollout_is/capped_frac": (valid & (raw > cap)).sum().to(raw.dtype) / count,
        "rollout_is/log_ratio_abs": log_ratio.abs().sum() / count,
    }
    return weights, metrics


__all__ = ["truncated_is_weights"]
