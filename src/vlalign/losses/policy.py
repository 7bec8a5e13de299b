"""Policy-gradient losses (PPO clip, dual clip), value loss, entropy, KL estimators and controllers,
and the reduction of per-token values to one loss (:func:`aggregate`).

Per-token functions take ``(B, T)`` tensors and a ``(B, T)`` mask (True/1 on completion tokens)
and return ``(B, T)`` values that are exactly 0 on padded positions; whatever padded positions
hold (even inf or nan) never reaches a result or a gradient. Reduction is separate: one
:func:`aggregate` call with a mode name. Metrics are detached token means over the local batch.

Data parallelism and gradient accumulation: every mode is Σ(local numerator) / normaliser. Passing
the *global* normaliser (``num_tokens`` for token-mean, ``num_sequences`` for the seq-* modes)
makes the per-shard results add up to the whole-batch value. With each shard's own normaliser,
averaging the shard results reproduces the whole-batch value for the seq-* modes when the shards
hold equally many (non-empty) sequences, and never in general for token-mean (shards differ in
token counts). DDP averages gradients over ranks, so with global normalisers multiply the local
loss by the world size (and by the number of accumulation steps if the loop divides by it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .preference import LossOutput


def _check_mask(values: Tensor, mask: Tensor, name: str = "values") -> Tensor:
    if values.shape != mask.shape:
        raise ValueError(f"{name} {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape (B, T)")
    return mask.bool()


def masked_fill_zero(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` where ``mask`` is set, exact zeros elsewhere (no nan/inf leaks, no gradient leaks)."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of the masked entries (over all entries, or along ``dim``)."""
    filled = masked_fill_zero(values, mask)
    return filled.sum() if dim is None else filled.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of the masked entries; 0 where nothing is masked in (never nan)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1).to(values.dtype)


def token_mean(values: Tensor, mask: Tensor, *, num_tokens: Tensor | float | None = None, **_: object) -> Tensor:
    """Σ_{i,t} m_it·v_it / N_tokens; N_tokens defaults to the local count (pass the global one for DP)."""
    valid = _check_mask(values, mask)
    total = masked_sum(values, valid)
    if num_tokens is None:
        count = valid.sum().to(values.dtype)
    else:
        count = torch.as_tensor(num_tokens, dtype=values.dtype, device=values.device)
    return total / count.clamp(min=1)


def _sequence_count(valid: Tensor, num_sequences: Tensor | float | None, like: Tensor) -> Tensor:
    if num_sequences is not None:
        return torch.as_tensor(num_sequences, dtype=like.dtype, device=like.device)
    return valid.any(-1).sum().to(like.dtype).clamp(min=1)


def seq_mean_token_mean(
    values: Tensor, mask: Tensor, *, num_sequences: Tensor | float | None = None, **_: object
) -> Tensor:
    """(1/N_seq)·Σ_i [Σ_t m_it·v_it / Σ_t m_it]; sequences without tokens contribute 0 and are not counted."""
    valid = _check_mask(values, mask)
    per_seq = masked_mean(values, valid, dim=-1)  # (B,)
    return per_seq.sum() / _sequence_count(valid, num_sequences, values)


def seq_mean_token_sum(
    values: Tensor, mask: Tensor, *, num_sequences: Tensor | float | None = None, **_: object
) -> Tensor:
    """(1/N_seq)·Σ_i Σ_t m_it·v_it."""
    valid = _check_mask(values, mask)
    return masked_sum(values, valid) / _sequence_count(valid, num_sequences, values)


def seq_mean_token_sum_norm(
    values: Tensor,
    mask: Tensor,
    *,
    max_length: int | None = None,
    num_sequences: Tensor | float | None = None,
    **_: object,
) -> Tensor:
    """(1/N_seq)·Σ_i Σ_t m_it·v_it / L_max with a constant L_max (Dr.GRPO, arXiv 2503.20783).

    ``max_length`` is required: the padded width of a batch is not constant across steps or
    shards, which would break both the paper's unbiasedness and the data-parallel decomposition.
    (verl falls back to the padded width; TRL's ``dr_grpo`` uses ``max_completion_length``.)
    """
    if max_length is None or max_length <= 0:
        raise ValueError("seq-mean-token-sum-norm needs max_length=<the constant maximum completion length>")
    return seq_mean_token_sum(values, mask, num_sequences=num_sequences) / max_length


def aggregate(
    values: Tensor,
    mask: Tensor,
    *,
    mode: str = "token-mean",
    max_length: int | None = None,
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
) -> Tensor:
    """Reduce per-token ``values`` ``(B, T)`` to a scalar loss with one of :data:`AGGREGATIONS`.

    ``num_tokens``/``num_sequences`` override the local normalisers (give the global counts
    under data parallelism or gradient accumulation, see the module docstring).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[mode](values, mask, max_length=max_length, num_tokens=num_tokens, num_sequences=num_sequences)


def _per_token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.shape == like.shape:
        return advantages
    if advantages.ndim == 1 and advantages.shape[0] == like.shape[0]:
        return advantages.unsqueeze(-1).expand_as(like)
    raise ValueError(f"advantages must have shape (B,) or (B, T) = {tuple(like.shape)}, got {tuple(advantages.shape)}")


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
) -> LossOutput:
    """Per-token PPO clipped surrogate, with asymmetric clip range and optional dual clip.

    Papers: Schulman et al., "PPO", arXiv 1707.06347, eq. 7; asymmetric range (clip-higher):
    DAPO, arXiv 2503.14476; dual clip: Ye et al., arXiv 1912.09729.
    Equation: ρ = exp(log π_θ − log π_old);
    ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)); dual clip for A < 0: ℓ = min(ℓ, −c·A).
    ``advantages`` are ``(B, T)`` or per-sequence ``(B,)`` (broadcast over tokens).
    Departures: the log-ratio is clamped to ±``log_ratio_clamp`` before exp (as verl does) so a
    stale sample cannot overflow. ``clip_high`` defaults to ``clip_low``.
    Metrics: ``policy/clip_frac`` (share of tokens whose clipped branch is active),
    ``policy/dual_clip_frac``, ``policy/approx_kl`` (mean ½(log ρ)²), ``policy/ratio_mean``.
    """
    valid = _check_mask(logprobs, mask, "logprobs")
    clip_high = clip_low if clip_high is None else clip_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. use 3), got {dual_clip}")
    adv = masked_fill_zero(_per_token_advantages(advantages, logprobs), valid)
    log_ratio = masked_fill_zero(logprobs, valid) - masked_fill_zero(old_logprobs, valid)
    ratio = torch.exp(log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp))  # (B, T)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        dual_active = (adv < 0) & (losses > dual_bound)
        losses = torch.where(adv < 0, torch.minimum(losses, dual_bound), losses)
    losses = masked_fill_zero(losses, valid)
    dtype = logprobs.dtype
    metrics = {
        "policy/clip_frac": masked_mean(clip_active.to(dtype), valid).detach(),
        "policy/dual_clip_frac": masked_mean(dual_active.to(dtype), valid).detach(),
        "policy/approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, valid),
        "policy/ratio_mean": masked_mean(ratio.detach(), valid),
    }
    return LossOutput(losses, metrics)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range: float | None = 0.2
) -> LossOutput:
    """Per-token clipped value loss of PPO.

    Paper: as in OpenAI baselines' PPO2 and InstructGPT-style RLHF (Ziegler et al., arXiv
    1909.08593). Equation: ½·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²);
    ``clip_range=None`` gives the unclipped ½(V − R)².
    Metrics: ``value/clip_frac`` (share of tokens whose V is outside V_old ± ε and whose clipped error
    is the larger),
    ``value/mean``, ``value/error`` (mean (V − R)²).
    """
    valid = _check_mask(values, mask, "values")
    v = masked_fill_zero(values, valid)
    r = masked_fill_zero(returns, valid)
    error = (v - r) ** 2
    if clip_range is None:
        per_token = 0.5 * error
        clipped_larger = torch.zeros_like(valid)
    else:
        v_old = masked_fill_zero(old_values, valid)
        # clamp(V, V_old − ε, V_old + ε), not V_old + clamp(V − V_old): inside the range it is V itself,
        # so the clipped error equals the unclipped one exactly and ``value/clip_frac`` counts clipping,
        # not the rounding of V_old + (V − V_old).
        v_clipped = torch.clamp(v, v_old - clip_range, v_old + clip_range)
        clipped_error = (v_clipped - r) ** 2
        per_token = 0.5 * torch.maximum(error, clipped_error)
        clipped_larger = clipped_error > error
    dtype = values.dtype
    metrics = {
        "value/clip_frac": masked_mean(clipped_larger.to(dtype), valid).detach(),
        "value/mean": masked_mean(v.detach(), valid),
        "value/error": masked_mean(error.detach(), valid),
    }
    return LossOutput(masked_fill_zero(per_token, valid), metrics)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last axis: H = logsumexp(z) − Σ softmax(z)·z. ``(B, T, V) -> (B, T)``.

    Entries of −inf (banned tokens) have probability 0 and contribute 0.
    """
    log_z = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    safe_logits = torch.where(probs > 0, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    return log_z - (probs * safe_logits).sum(-1)


def entropy_loss(logits: Tensor, mask: Tensor, *, coef: float = 0.01) -> LossOutput:
    """Per-token entropy bonus as a loss term: −c·H(π(·|s_t)), 0 on padding.

    Paper: Mnih et al., A3C, arXiv 1602.01783 (entropy regularisation); PPO eq. 9.
    Metric: ``policy/entropy`` (mean token entropy). From per-token entropies already computed
    (e.g. by the log-prob forward), use :func:`entropy_bonus`.
    """
    valid = mask.bool()
    if logits.shape[:-1] != valid.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, T, V) with (B, T) = mask {tuple(valid.shape)}")
    safe_logits = masked_fill_zero(logits, valid.unsqueeze(-1).expand_as(logits))
    return entropy_bonus(entropy_from_logits(safe_logits), valid, coef=coef)


def entropy_bonus(entropy: Tensor, mask: Tensor, *, coef: float = 0.01) -> LossOutput:
    """:func:`entropy_loss` from per-token entropies H_t ``(B, T)``: −c·H_t, 0 on padding.

    Metric: ``policy/entropy`` (mean token entropy over the mask).
    """
    valid = _check_mask(entropy, mask, "entropy")
    entropy = masked_fill_zero(entropy, valid)
    return LossOutput(-coef * entropy, {"policy/entropy": masked_mean(entropy.detach(), valid)})


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k1 = log π − log π_ref = −d (Schulman, "Approximating KL divergence", 2020). Unbiased, high variance."""
    valid = _check_mask(logprobs, mask, "logprobs")
    return masked_fill_zero(logprobs, valid) - masked_fill_zero(ref_logprobs, valid)


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k2 = ½·d², d = log π_ref − log π. Biased, low variance; its gradient is that of the reverse KL."""
    return 0.5 * kl_k1(logprobs, ref_logprobs, mask) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, clamp: float = 10.0) -> Tensor:
    """k3 = e^d − d − 1, d = log π_ref − log π clamped to ±``clamp`` before exp. Unbiased, ≥ 0.

    Departure: the clamp (verl also clamps the result to ±10); the gradient is 0 where d is clamped.
    """
    d = (-kl_k1(logprobs, ref_logprobs, mask)).clamp(-clamp, clamp)
    return masked_fill_zero(torch.expm1(d) - d, mask)


KL_ESTIMATORS: dict[str, Callable[..., Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""Per-token KL estimators by name; ``fn(logprobs, ref_logprobs, mask) -> (B, T)``."""


@dataclass
class FixedKLController:
    """A constant KL coefficient β (the loop calls ``update`` all the same)."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        """Return the unchanged coefficient."""
        return self.value


@dataclass
class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards a target.

    Paper: Ziegler et al., arXiv 1909.08593, section 2.2:
    e = clip(KL/target − 1, −0.2, 0.2); β ← β·(1 + e·n_steps/horizon).
    The loop passes the measured KL as a Python float (its own ``.item()``).
    """

    value: float
    target: float
    horizon: int

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController needs target > 0 and horizon > 0, got {self.target}, {self.horizon}"
            )

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update β from the KL measured over the last ``n_steps`` samples and return it."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


KL_CONTROLLERS = {"fixed": FixedKLController, "adaptive": AdaptiveKLController}
"""KL coefficient controllers by name."""

Aggregation = Callable[..., Tensor]

AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}
"""Aggregation modes by name; every function is ``fn(values, mask, **normalisers) -> scalar``."""
