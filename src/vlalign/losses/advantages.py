"""Advantage estimators for RL fine-tuning: GAE, GRPO, Dr.GRPO, RLOO, REINFORCE++, whitening, and
DAPO's overlong shaping and group filter.

Two families:

* outcome (group) estimators, ``fn(rewards, *, group_size=None, **hp) -> advantages``: one
  scalar reward per completion, shaped ``(num_groups, G)`` (G completions per prompt) or flat
  ``(num_groups·G,)`` with ``group_size=G``; the result has the input's shape and is broadcast
  over the completion's tokens by the caller (``ppo_clip_loss`` accepts ``(B,)`` advantages).
* token estimators: :func:`gae` and :func:`reinforce_pp_advantages` take per-token rewards
  ``(B, T)`` (see :func:`kl_penalized_token_rewards`) and a ``(B, T)`` mask and return
  ``(advantages, returns)``.

Masked positions are skipped, not treated as zero-reward steps: a padded position between two
tokens changes nothing, and outputs are exactly 0 there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .policy import masked_fill_zero, masked_mean


def _as_groups(rewards: Tensor, group_size: int | None) -> Tensor:
    """View rewards as ``(num_groups, G)``."""
    if rewards.ndim == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"rewards has groups of {rewards.shape[1]} but group_size={group_size}")
        grouped = rewards
    elif rewards.ndim == 1:
        if group_size is None or group_size <= 0 or rewards.shape[0] % group_size:
            raise ValueError(
                f"flat rewards of length {rewards.shape[0]} need group_size=G dividing it (got {group_size}); "
                "or pass rewards shaped (num_groups, G)"
            )
        grouped = rewards.view(-1, group_size)
    else:
        raise ValueError(f"rewards must be (num_groups, G) or flat (num_groups*G,), got {tuple(rewards.shape)}")
    return grouped


def _need_two(grouped: Tensor, name: str) -> None:
    if grouped.shape[1] < 2:
        raise ValueError(f"{name} compares completions within a group: it needs G >= 2 completions per prompt")


def grpo_advantages(
    rewards: Tensor, *, group_size: int | None = None, eps: float = 1e-6, unbiased: bool = True
) -> Tensor:
    """GRPO's group-normalised outcome advantage.

    Paper: Shao et al., DeepSeekMath, arXiv 2402.03300, section 4.1.2:
    Â_i = (r_i − mean(r_group)) / (std(r_group) + ε), the same for every token of completion i.
    Departures: the std is the Bessel-corrected one (``unbiased=True``, as torch/TRL/verl);
    ε = 1e-6 (verl; TRL uses 1e-4).
    """
    grouped = _as_groups(rewards, group_size)
    _need_two(grouped, "grpo")
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True, unbiased=unbiased)
    return ((grouped - mean) / (std + eps)).reshape(rewards.shape)


def dr_grpo_advantages(rewards: Tensor, *, group_size: int | None = None) -> Tensor:
    """Dr.GRPO's advantage: the group-centred reward, without the std division.

    Paper: Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783:
    Â_i = r_i − mean(r_group). Also the group baseline of REINFORCE++-baseline.
    """
    grouped = _as_groups(rewards, group_size)
    _need_two(grouped, "dr_grpo")
    return (grouped - grouped.mean(-1, keepdim=True)).reshape(rewards.shape)


def rloo_advantages(rewards: Tensor, *, group_size: int | None = None) -> Tensor:
    """RLOO: each completion's reward minus the mean reward of the other G − 1 in its group.

    Paper: Ahmadian et al., "Back to Basics", arXiv 2402.14740 (after Kool et al., 2019):
    A_i = r_i − (1/(G−1))·Σ_{j≠i} r_j  (= G/(G−1)·(r_i − mean(r_group))).
    """
    grouped = _as_groups(rewards, group_size)
    _need_two(grouped, "rloo")
    size = grouped.shape[1]
    others = (grouped.sum(-1, keepdim=True) - grouped) / (size - 1)
    return (grouped - others).reshape(rewards.shape)


def dapo_group_filter(rewards: Tensor, *, group_size: int | None = None) -> Tensor:
    """DAPO's dynamic-sampling filter: True for groups whose rewards are not all equal.

    Paper: Yu et al., "DAPO", arXiv 2503.14476 (keep 0 < #correct < G). Groups with equal
    rewards have zero group-relative advantage and carry no gradient. Returns ``(num_groups,)``
    bool; the loop keeps sampling until enough groups pass.
    """
    grouped = _as_groups(rewards, group_size)
    return grouped.amax(-1) > grouped.amin(-1)


def overlong_reward_penalty(
    lengths: Tensor, *, max_length: int, cache_length: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment, added to the outcome reward.

    Paper: Yu et al., "DAPO", arXiv 2503.14476:
    R_len = 0 if |y| ≤ L_max − L_cache; ((L_max − L_cache) − |y|)/L_cache inside the buffer;
    −1 beyond L_max. Scaled by ``penalty_factor`` (1 in the paper). ``lengths``: ``(B,)``.
    """
    if cache_length <= 0 or cache_length > max_length:
        raise ValueError(f"cache_length must be in (0, max_length={max_length}], got {cache_length}")
    free = max_length - cache_length
    length = lengths.to(torch.get_default_dtype()) if not lengths.is_floating_point() else lengths
    penalty = ((free - length) / cache_length).clamp(min=-1.0, max=0.0)
    return penalty_factor * penalty


def masked_var(values: Tensor, mask: Tensor, *, unbiased: bool = False) -> Tensor:
    """Variance of the masked entries (two-pass, so large means lose no precision)."""
    valid = mask.bool()
    centred = masked_fill_zero(values - masked_mean(values, valid), valid)
    count = valid.sum().to(values.dtype)
    denominator = count - 1 if unbiased else count
    return (centred**2).sum() / denominator.clamp(min=1)


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    mean: Tensor | None = None,
    var: Tensor | None = None,
) -> Tensor:
    """(x − μ)/√(σ² + ε) over the masked entries, 0 on padding.

    μ and σ² (population variance) default to the local batch; under data parallelism pass the
    global ones (all-reduce Σm·x and Σm for μ, then Σm·(x − μ)² for σ²). ``shift_mean=False``
    keeps the mean (only rescales), as TRL's ``masked_whiten`` option.
    """
    valid = mask.bool()
    mu = masked_mean(values, valid) if mean is None else mean
    sigma2 = masked_var(values, valid) if var is None else var
    whitened = (values - mu) * torch.rsqrt(sigma2 + eps)
    if not shift_mean:
        whitened = whitened + mu
    return masked_fill_zero(whitened, valid)


def kl_penalized_token_rewards(
    sequence_rewards: Tensor, kl: Tensor, mask: Tensor, *, kl_coef: float | Tensor
) -> Tensor:
    """Per-token RLHF rewards: r_t = −β·KL_t, plus the sequence reward on the last completion token.

    Paper: Ziegler et al., arXiv 1909.08593; Ouyang et al., arXiv 2203.02155 (eq. 2).
    ``sequence_rewards`` ``(B,)``, ``kl`` ``(B, T)`` per-token estimates (e.g. ``kl_k1``).
    A sequence without completion tokens gets no reward (all zeros).
    """
    valid = mask.bool()
    if kl.shape != valid.shape or sequence_rewards.shape != valid.shape[:1]:
        raise ValueError(
            f"need sequence_rewards (B,), kl (B, T) and mask (B, T); got {tuple(sequence_rewards.shape)}, "
            f"{tuple(kl.shape)}, {tuple(valid.shape)}"
        )
    rewards = -kl_coef * masked_fill_zero(kl, valid)  # (B, T)
    positions = torch.arange(valid.shape[1], device=valid.device)
    last = torch.where(valid, positions, -1).amax(-1)  # (B,) index of the last valid token, -1 if none
    is_last = (positions.unsqueeze(0) == last.unsqueeze(-1)) & valid  # (B, T)
    return rewards + torch.where(is_last, sequence_rewards.unsqueeze(-1).to(rewards.dtype), 0.0)


def _reverse_scan(rewards: Tensor, values: Tensor, valid: Tensor, *, gamma: float, lam: float) -> Tensor:
    """A_t = δ_t + γλ·A_next, δ_t = r_t + γ·V_next − V_t over valid positions only (``(B, T)``)."""
    batch, length = rewards.shape
    next_value = rewards.new_zeros(batch)
    next_adv = rewards.new_zeros(batch)
    steps: list[Tensor] = []
    for t in range(length - 1, -1, -1):
        here = valid[:, t]
        adv_t = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        steps.append(torch.where(here, adv_t, 0.0))
        next_value = torch.where(here, values[:, t], next_value)
        next_adv = torch.where(here, adv_t, next_adv)
    return torch.stack(steps[::-1], dim=1)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the completion tokens, with returns.

    Paper: Schulman et al., "High-Dimensional Continuous Control Using GAE", arXiv 1506.02438:
    δ_t = r_t + γ·V_{t+1} − V_t; A_t = δ_t + γλ·A_{t+1}; R_t = A_t + V_t, with V and A = 0 after
    the last token (the completion ends the episode).
    ``rewards``, ``values``, ``mask``: ``(B, T)``. Returns ``(advantages, returns)``, both ``(B, T)``,
    0 on padding; whiten the advantages with :func:`masked_whiten` if wanted.
    Departures: masked positions are skipped (t+1 means the next valid token).
    """
    valid = mask.bool()
    if rewards.shape != valid.shape or values.shape != valid.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask must all be (B, T)")
    r = masked_fill_zero(rewards, valid)
    v = masked_fill_zero(values, valid)
    advantages = _reverse_scan(r, v, valid, gamma=gamma, lam=lam)
    returns = masked_fill_zero(advantages + v, valid)
    return advantages, returns


def discounted_returns(rewards: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """G_t = Σ_{s≥t} γ^{s−t}·r_s over valid positions (masked positions skipped), ``(B, T)``."""
    valid = mask.bool()
    if rewards.shape != valid.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(valid.shape)} must both be (B, T)")
    r = masked_fill_zero(rewards, valid)
    # GAE with V = 0 and λ = 1 is exactly the discounted return.
    return _reverse_scan(r, torch.zeros_like(r), valid, gamma=gamma, lam=1.0)


def reinforce_pp_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    whiten: bool = True,
    eps: float = 1e-8,
    mean: Tensor | None = None,
    var: Tensor | None = None,
    moments: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted token returns (KL folded into the rewards), whitened over the batch.

    Paper: Hu, "REINFORCE++", arXiv 2501.03262:
    G_t = Σ_{s≥t} γ^{s−t}·r_s with r_s = −β·KL_s (+ the outcome reward on the last token, see
    :func:`kl_penalized_token_rewards`); A = (G − μ)/σ over all valid tokens of the global batch.
    The "baseline" variant subtracts the group mean from the outcome rewards first
    (:func:`dr_grpo_advantages`) and is otherwise the same.
    ``mean``/``var`` give the global-batch statistics under data parallelism; or ``moments``, a
    function ``(returns, mask) -> (mean, var)`` that computes them from the returns (e.g. summed
    over processes), when they are not known before the returns are.
    Returns ``(advantages, returns)``, both ``(B, T)``.
    """
    returns = discounted_returns(token_rewards, mask, gamma=gamma)
    if not whiten:
        return returns, returns
    if moments is not None:
        if mean is not None or var is not None:
            raise ValueError("reinforce_pp_advantages: give moments or mean / var, not both")
        mean, var = moments(returns, mask)
    return masked_whiten(returns, mask, eps=eps, mean=mean, var=var), returns


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}
"""Outcome (group) estimators by name; ``fn(rewards, *, group_size=None, **hp) -> advantages``."""

TOKEN_ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "gae": gae,
    "reinforce_pp": reinforce_pp_advantages,
}
"""Token-level estimators by name; both return ``(advantages, returns)`` of shape ``(B, T)``
(``gae(rewards, values, mask, ...)``, ``reinforce_pp_advantages(rewards, mask, ...)``)."""
