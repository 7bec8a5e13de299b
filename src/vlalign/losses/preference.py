"""Offline preference losses of the DPO family, as pure functions of per-sequence log-probs.

Every paired loss has the same signature ``fn(logps, *, beta, **hp) -> LossOutput``: ``logps`` is
a :class:`PreferenceLogps` record (per-sequence summed log-probs of the chosen and rejected
completions under the policy and, where the loss needs them, the reference), hyperparameters are
keyword-only, and the result is the per-example loss ``(B,)`` plus a dict of detached scalar
metrics (``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``,
``logps/chosen``, ``logps/rejected``). The caller reduces the per-example losses (usually a mean).

Notation (``docs/algorithms.md``): r(y) = log π_θ(y|x) − log π_ref(y|x), h = r(y_w) − r(y_l).

Weighted sums of losses (MPO, RPO, HA-DPO) are configuration, not code:
``combine_losses(logps, weights={"sigmoid": 0.8, "bco_pair": 0.2, "nll": 1.0})``.
KTO is unpaired and has its own record, :class:`UnpairedLogps`, and signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LossOutput(NamedTuple):
    """Per-example (or per-token) losses and detached scalar metrics keyed by namespaced names."""

    losses: Tensor
    metrics: dict[str, Tensor]


@dataclass(frozen=True)
class PreferenceLogps:
    """Per-sequence log-probs of a batch of preference pairs (sums over completion tokens).

    ``rejected_*`` may be ``(B,)`` (one rejected completion per chosen one) or ``(B, K)``
    (several, as in POVID). Lengths are completion token counts, needed by the losses that
    normalise by length (IPO, SimPO, ORPO, NLL). ``corrupted_*`` are the chosen completion's
    log-probs under a corrupted image (mDPO); ``ref_*`` come from the frozen reference policy.
    """

    chosen_logps: Tensor  # (B,)
    rejected_logps: Tensor  # (B,) or (B, K)
    ref_chosen_logps: Tensor | None = None  # (B,)
    ref_rejected_logps: Tensor | None = None  # like rejected_logps
    chosen_lengths: Tensor | None = None  # (B,) token counts
    rejected_lengths: Tensor | None = None  # like rejected_logps
    corrupted_chosen_logps: Tensor | None = None  # (B,) chosen under a corrupted image
    ref_corrupted_chosen_logps: Tensor | None = None  # (B,)

    def __post_init__(self) -> None:
        if self.chosen_logps.ndim != 1:
            raise ValueError(
                f"PreferenceLogps.chosen_logps must have shape (B,), got {tuple(self.chosen_logps.shape)}; "
                "sum the per-token log-probs over the completion first"
            )
        batch = self.chosen_logps.shape[0]
        rejected_shape = tuple(self.rejected_logps.shape)
        if self.rejected_logps.ndim not in (1, 2) or rejected_shape[0] != batch:
            raise ValueError(
                f"PreferenceLogps.rejected_logps must have shape (B,) or (B, K) with B={batch}, got {rejected_shape}"
            )
        expected = {
            "ref_chosen_logps": (batch,),
            "ref_rejected_logps": rejected_shape,
            "chosen_lengths": (batch,),
            "rejected_lengths": rejected_shape,
            "corrupted_chosen_logps": (batch,),
            "ref_corrupted_chosen_logps": (batch,),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"PreferenceLogps.{name} must have shape {shape} to match chosen/rejected_logps, "
                    f"got {tuple(value.shape)}"
                )

    @property
    def has_reference(self) -> bool:
        """Whether both reference log-probs are present."""
        return self.ref_chosen_logps is not None and self.ref_rejected_logps is not None


def require_reference(logps: PreferenceLogps, loss_name: str) -> tuple[Tensor, Tensor]:
    """Return ``(r_w, r_l)``, the policy-minus-reference log-ratios, or fail with a clear error."""
    if not logps.has_reference:
        raise ValueError(
            f"the {loss_name!r} loss needs ref_chosen_logps and ref_rejected_logps; compute reference "
            "log-probs (or load the precomputed cache), or use a reference-free loss (simpo, orpo)"
        )
    assert logps.ref_chosen_logps is not None and logps.ref_rejected_logps is not None
    return logps.chosen_logps - logps.ref_chosen_logps, logps.rejected_logps - logps.ref_rejected_logps


def require_lengths(logps: PreferenceLogps, loss_name: str) -> tuple[Tensor, Tensor]:
    """Return ``(|y_w|, |y_l|)`` as floating tensors, or fail with a clear error."""
    if logps.chosen_lengths is None or logps.rejected_lengths is None:
        raise ValueError(
            f"the {loss_name!r} loss normalises by completion length: set chosen_lengths and "
            "rejected_lengths (completion token counts) in PreferenceLogps"
        )
    dtype = logps.chosen_logps.dtype
    return logps.chosen_lengths.to(dtype), logps.rejected_lengths.to(dtype)


def implicit_reward_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, logps: PreferenceLogps | None = None
) -> dict[str, Tensor]:
    """Batch means of the implicit rewards, their margin and the share of pairs ranked right.

    ``rewards/accuracy`` is the share of pairs with reward(y_w) > reward(y_l) (ties count as
    wrong). ``rejected_rewards`` may be ``(B, K)``; every (chosen, rejected_k) pair then counts.
    """
    chosen = chosen_rewards.detach()
    rejected = rejected_rewards.detach()
    if rejected.ndim == 2:
        chosen = chosen.unsqueeze(-1).expand_as(rejected)
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "rewards/accuracy": (chosen > rejected).to(chosen.dtype).mean(),
    }
    if logps is not None:
        metrics["logps/chosen"] = logps.chosen_logps.detach().mean()
        metrics["logps/rejected"] = logps.rejected_logps.detach().mean()
    return metrics


def _reference_rewards(logps: PreferenceLogps, beta: float, loss_name: str) -> dict[str, Tensor]:
    chosen_ratio, rejected_ratio = require_reference(logps, loss_name)
    return implicit_reward_metrics(beta * chosen_ratio, beta * rejected_ratio, logps)


def dpo_loss(logps: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (sigmoid) loss, with the conservative label smoothing of cDPO.

    Paper: Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290, eq. 7;
    cDPO: Mitchell, "A note on DPO with noisy preferences" (2023).
    Equation: L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h), h = r(y_w) − r(y_l). ε = 0 is plain DPO.
    Departures: none from the papers. TRL: with ε = 0 this is the ``sigmoid`` loss type of TRL's
    DPO trainer, which takes no label smoothing (TRL 1.16); the smoothed form is cDPO's, which is
    what TRL's CPO trainer computes for its ``sigmoid`` loss with ``label_smoothing``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio, rejected_ratio = require_reference(logps, "sigmoid")
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, _reference_rewards(logps, beta, "sigmoid"))


def robust_dpo_loss(logps: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO: an unbiased loss under preference labels flipped with probability ε.

    Paper: Chowdhury et al., "Provably Robust DPO", arXiv 2403.00409.
    Equation: L = [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε).
    Departures: none (matches TRL's ``robust`` loss type); ε = 0 is plain DPO.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing (flip rate) must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio, rejected_ratio = require_reference(logps, "robust")
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1.0 - 2.0 * label_smoothing
    )
    return LossOutput(losses, _reference_rewards(logps, beta, "robust"))


def hinge_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Hinge loss on the DPO log-ratio margin (SLiC-style).

    Paper: Zhao et al., "SLiC-HF", arXiv 2305.10425; as the ``hinge`` loss of the DPO paper's code.
    Equation: L = max(0, 1 − β·h).
    Departures: SLiC uses policy log-probs only; like TRL we use the reference-normalised h.
    """
    chosen_ratio, rejected_ratio = require_reference(logps, "hinge")
    losses = torch.relu(1.0 - beta * (chosen_ratio - rejected_ratio))
    return LossOutput(losses, _reference_rewards(logps, beta, "hinge"))


def ipo_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """IPO: squared regression of the log-ratio margin onto 1/(2β).

    Paper: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv 2310.12036, eq. 17 (β is the paper's τ).
    Equation: L = (h̄ − 1/(2β))², h̄ = [lp_w − ref_w]/|y_w| − [lp_l − ref_l]/|y_l|.
    Departures: each log-prob is divided by its completion length, as TRL does (agreed with the
    IPO authors); the paper uses summed log-probs. Rewards are reported on the same averages.
    """
    chosen_ratio, rejected_ratio = require_reference(logps, "ipo")
    chosen_len, rejected_len = require_lengths(logps, "ipo")
    chosen_avg, rejected_avg = chosen_ratio / chosen_len, rejected_ratio / rejected_len
    losses = (chosen_avg - rejected_avg - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses, implicit_reward_metrics(beta * chosen_avg, beta * rejected_avg, logps))


def bco_pair_loss(logps: PreferenceLogps, *, beta: float = 0.1, delta: float | Tensor = 0.0) -> LossOutput:
    """Paired binary-classifier loss: chosen classified as good, rejected as bad, separately.

    Paper: Jung et al., "Binary Classifier Optimization", arXiv 2404.04656; MPO's quality loss
    (InternVL, arXiv 2411.10442).
    Equation: L = −log σ(β·r_w − δ) − log σ(−(β·r_l − δ)).
    Departures: the shift δ is an argument (default 0; a loop may pass, e.g., a running mean of the
    rewards). TRL's ``bco_pair`` loss type (TRL 1.16) has no δ: it is this loss with δ = 0.
    """
    chosen_ratio, rejected_ratio = require_reference(logps, "bco_pair")
    losses = -F.logsigmoid(beta * chosen_ratio - delta) - F.logsigmoid(-(beta * rejected_ratio - delta))
    return LossOutput(losses, _reference_rewards(logps, beta, "bco_pair"))


def apo_zero_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-zero: push the chosen likelihood up and the rejected one down, each on its own.

    Paper: D'Oosterlinck et al., "Anchored Preference Optimization", arXiv 2408.06266, eq. 7.
    Equation: L = (1 − σ(β·r_w)) + σ(β·r_l).
    Departures: none (matches TRL's ``apo_zero``).
    """
    chosen_ratio, rejected_ratio = require_reference(logps, "apo_zero")
    losses = (1.0 - torch.sigmoid(beta * chosen_ratio)) + torch.sigmoid(beta * rejected_ratio)
    return LossOutput(losses, _reference_rewards(logps, beta, "apo_zero"))


def apo_down_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-down: lower the chosen likelihood, and the rejected one more (for chosen responses that
    are worse than the model's own).

    Paper: D'Oosterlinck et al., "Anchored Preference Optimization", arXiv 2408.06266, eq. 8.
    Equation: L = σ(β·r_w) + (1 − σ(β·(r_w − r_l))) = σ(β·r_w) + 1 − σ(β·h).
    The first term pushes r_w down; the second raises the margin h, so r_l goes down faster.
    At r_w = r_l = 0 the two pulls on r_w cancel (∂L/∂r_w = β·σ'(0) − β·σ'(0) = 0) and only r_l
    moves; once h > |r_w|, ∂L/∂r_w = β·(σ'(β·r_w) − σ'(β·h)) > 0 and the chosen likelihood falls.
    Use it when the chosen responses are worse than the model's default output; ``apo_zero``
    when they are better.
    Departures: none (matches TRL's ``apo_down`` loss type).
    """
    chosen_ratio, rejected_ratio = require_reference(logps, "apo_down")
    losses = torch.sigmoid(beta * chosen_ratio) + (1.0 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio)))
    return LossOutput(losses, _reference_rewards(logps, beta, "apo_down"))


def simpo_loss(logps: PreferenceLogps, *, beta: float = 2.5, gamma: float = 1.375) -> LossOutput:
    """SimPO: reference-free, length-normalised margin with a target reward gap γ.

    Paper: Meng et al., "SimPO", arXiv 2405.14734.
    Equation: L = −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ).
    Departures: none. Rewards are β times the mean token log-prob (as TRL's CPO trainer reports).
    """
    chosen_len, rejected_len = require_lengths(logps, "simpo")
    chosen_rewards = beta * logps.chosen_logps / chosen_len
    rejected_rewards = beta * logps.rejected_logps / rejected_len
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput(losses, implicit_reward_metrics(chosen_rewards, rejected_rewards, logps))


def log1mexp(x: Tensor) -> Tensor:
    """Stable log(1 − exp(x)) for x < 0 (Mächler's split at −log 2)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """ORPO: NLL of the chosen response plus a log-odds-ratio preference term, no reference.

    Paper: Hong et al., "ORPO", arXiv 2403.07691 (β is the paper's λ).
    Equation: with P(y) = exp(mean token log-prob) and odds(y) = P/(1 − P),
    L = −mean_t log π(y_w,t) − β·log σ(log odds(y_w) − log odds(y_l)).
    Departures: the NLL term is per example (the chosen completion's mean token NLL). TRL's ORPO
    takes its NLL as a token mean over the whole batch, and that NLL also covers the prompt
    tokens, not only the chosen completion's. log(1 − P) is computed stably with :func:`log1mexp`.
    """
    chosen_len, rejected_len = require_lengths(logps, "orpo")
    chosen_avg = logps.chosen_logps / chosen_len  # (B,) mean token log-prob, < 0
    rejected_avg = logps.rejected_logps / rejected_len
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    ratio_term = F.logsigmoid(log_odds)
    losses = -chosen_avg - beta * ratio_term
    metrics = implicit_reward_metrics(beta * chosen_avg, beta * rejected_avg, logps)
    metrics["orpo/log_odds_ratio"] = log_odds.detach().mean()
    metrics["orpo/nll"] = (-chosen_avg).detach().mean()
    return LossOutput(losses, metrics)


def nll_loss(logps: PreferenceLogps, *, beta: float = 0.0) -> LossOutput:
    """Negative log-likelihood of the chosen response per token: the SFT term of RPO/HA-DPO/MPO.

    Papers: RPO, Pang et al., arXiv 2404.19733 (α·NLL/|y_w|); HA-DPO, arXiv 2311.16839 (γ·LM loss);
    MPO, arXiv 2411.10442 (generation loss).
    Equation: L = −log π(y_w)/|y_w|. ``beta`` is accepted for the shared signature and unused.
    Departures: per-example mean token NLL; TRL averages over all chosen tokens of the batch
    (identical when the chosen completions have equal lengths).
    """
    chosen_len, _ = require_lengths(logps, "nll")
    losses = -logps.chosen_logps / chosen_len
    return LossOutput(losses, {"nll/chosen": losses.detach().mean()})


PreferenceLoss = Callable[..., LossOutput]


def combine_losses(
    logps: PreferenceLogps,
    *,
    weights: Mapping[str, float],
    beta: float | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    registry: Mapping[str, PreferenceLoss] | None = None,
) -> LossOutput:
    """Weighted sum of named preference losses: L = Σ_k w_k·L_k (per example).

    MPO (arXiv 2411.10442) is ``{"sigmoid": 0.8, "bco_pair": 0.2, "nll": 1.0}``; RPO is
    ``{"sigmoid": 1.0, "nll": α}``; HA-DPO is ``{"sigmoid": 1.0, "nll": γ}`` (see
    :data:`LOSS_PRESETS`). ``beta`` (if given) goes to every loss; ``options[name]`` holds that
    loss's other keyword arguments and may override beta. ``registry`` defaults to
    :data:`PREFERENCE_LOSSES` (pass ``vlalign.losses.ALL_PREFERENCE_LOSSES`` for LVLM terms).
    Metrics: ``loss/<name>`` per term, plus the reward metrics of the first term that has them.
    """
    table = PREFERENCE_LOSSES if registry is None else registry
    if not weights:
        raise ValueError("combine_losses needs at least one {loss_name: weight} entry")
    unknown = [name for name in weights if name not in table]
    if unknown:
        raise ValueError(f"unknown preference loss(es) {unknown}; known: {sorted(table)}")
    total: Tensor | None = None
    metrics: dict[str, Tensor] = {}
    for name, weight in weights.items():
        kwargs = dict((options or {}).get(name, {}))
        if beta is not None:
            kwargs.setdefault("beta", beta)
        out = table[name](logps, **kwargs)
        total = weight * out.losses if total is None else total + weight * out.losses
        metrics[f"loss/{name}"] = out.losses.detach().mean()
        for key, value in out.metrics.items():
            metrics.setdefault(key, value)
    assert total is not None
    return LossOutput(total, metrics)


@dataclass(frozen=True)
class UnpairedLogps:
    """Per-sequence log-probs for KTO: single completions, each marked desirable or not.

    ``kl_logps``/``ref_kl_logps`` are log-probs of mismatched (prompt, completion) pairs used to
    estimate the reference point z₀ (TRL shifts completions by one within the batch).
    """

    logps: Tensor  # (B,)
    ref_logps: Tensor  # (B,)
    desirable: Tensor  # (B,) bool
    kl_logps: Tensor | None = None  # (M,)
    ref_kl_logps: Tensor | None = None  # (M,)

    def __post_init__(self) -> None:
        shape = tuple(self.logps.shape)
        if len(shape) != 1:
            raise ValueError(f"UnpairedLogps.logps must have shape (B,), got {shape}")
        for name in ("ref_logps", "desirable"):
            if tuple(getattr(self, name).shape) != shape:
                got = tuple(getattr(self, name).shape)
                raise ValueError(f"UnpairedLogps.{name} must have shape {shape}, got {got}")
        if self.desirable.dtype != torch.bool:
            raise ValueError("UnpairedLogps.desirable must be a bool tensor (True for desirable completions)")
        if (self.kl_logps is None) != (self.ref_kl_logps is None):
            raise ValueError("UnpairedLogps: give both kl_logps and ref_kl_logps, or neither")
        if self.kl_logps is not None and self.ref_kl_logps is not None:
            if self.kl_logps.shape != self.ref_kl_logps.shape:
                raise ValueError("UnpairedLogps.kl_logps and ref_kl_logps must have the same shape")


def kto_reference_point(logps: UnpairedLogps) -> Tensor:
    """z₀ = max(0, mean(kl_logps − ref_kl_logps)), detached (a scalar tensor)."""
    if logps.kl_logps is None or logps.ref_kl_logps is None:
        raise ValueError(
            "KTO needs a reference point: set kl_logps and ref_kl_logps in UnpairedLogps "
            "(mismatched prompt/completion pairs), or pass reference_point= explicitly (e.g. 0.0)"
        )
    return (logps.kl_logps - logps.ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    logps: UnpairedLogps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: float | Tensor | None = None,
) -> LossOutput:
    """KTO: prospect-theoretic loss on unpaired desirable/undesirable completions.

    Paper: Ethayarajh et al., "KTO", arXiv 2402.01306.
    Equation: r = log π(y|x) − log π_ref(y|x); desirable: λ_D·(1 − σ(β(r − z₀)));
    undesirable: λ_U·(1 − σ(β(z₀ − r))), z₀ = max(0, mean KL estimate), detached.
    Departures: like TRL, z₀ is estimated on mismatched pairs of this batch; with data
    parallelism pass the all-reduced value as ``reference_point`` (it must be global).
    """
    ratio = logps.logps - logps.ref_logps  # (B,)
    if reference_point is None:
        z0 = kto_reference_point(logps)
    else:
        z0 = torch.as_tensor(reference_point, dtype=ratio.dtype, device=ratio.device).detach()
    desirable = logps.desirable
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (ratio - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - ratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = (beta * ratio).detach()
    n_desirable = desirable.sum()
    n_undesirable = (~desirable).sum()
    metrics = {
        "rewards/chosen": torch.where(desirable, rewards, 0.0).sum() / n_desirable.clamp(min=1),
        "rewards/rejected": torch.where(desirable, 0.0, rewards).sum() / n_undesirable.clamp(min=1),
        "kl/reference_point": z0.detach(),
        "count/desirable": n_desirable.to(rewards.dtype),
        "count/undesirable": n_undesirable.to(rewards.dtype),
    }
    metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return LossOutput(losses, metrics)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": dpo_loss,
    "robust": robust_dpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "bco_pair": bco_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "nll": nll_loss,
}
"""Paired preference losses by name; all share ``fn(logps: PreferenceLogps, *, beta, **hp)``.
cDPO is ``"sigmoid"`` with ``label_smoothing=ε``."""

LOSS_PRESETS: dict[str, dict[str, float]] = {
    "mpo": {"sigmoid": 0.8, "bco_pair": 0.2, "nll": 1.0},
    "rpo": {"sigmoid": 1.0, "nll": 1.0},
}
"""Named weightings for :func:`combine_losses` (MPO from InternVL; RPO with α = 1)."""
