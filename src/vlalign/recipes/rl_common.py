"""The phases every on-policy RL recipe shares: rollout -> score -> advantages -> update.

``vlalign grpo`` (GRPO, Dr.GRPO, RLOO, REINFORCE++) and ``vlalign ppo`` are written out as loops
over these phases; each phase is a function of tens of lines, and the math stays in
:mod:`vlalign.losses` (this module only feeds it tensors and reduces them with global normalisers).

A step, in order::

    ro = rollout(policy, processor, samples, settings=gen, seed=rollout_seed(seed, step))
    scores = score(ro, reward, step=step)             # RewardScores: total + per function
    ro.rewards = scores.total                         # (+ overlong_shaping(...), - KL if in the reward)
    ro.old_logps = old_logprobs(policy, ro, ...)      # None when the update is fully on-policy
    ro.ref_logps = reference_logprobs(reference, ro, ...)
    ro.advantages = advantages(...)                   # (R,) outcome or (R, L) token advantages
    metrics = update(run, model, optimizer, scheduler, ro, cfg.update, ...)

Layout of :class:`Rollouts`: B prompts ("groups") of G completions each; per-completion
("row") tensors are flat and prompt-major, row ``r`` is completion ``r % G`` of prompt
``r // G``; per-token tensors are ``(R, L)``, right-padded to the longest completion ``L``, with
:attr:`Rollouts.mask` marking real tokens. Each prompt (and its image) is processed once, by
the processor call of the rollout, and that encoding is reused for every log-prob forward
(shared prefix: :func:`vlalign.models.logprobs.completion_logprobs`).

Exact resume. Sampling is seeded by :func:`rollout_seed` ``(seed, step, round)`` and the
minibatch shuffles by ``(seed, step, epoch)``, so a resumed run samples the same completions and
visits them in the same order as an uninterrupted one; nothing random is drawn from global RNGs.

Data parallelism. Each process rolls out and scores its own prompts. Normalisers (token and
sequence counts of each optimiser step) and whitening statistics are summed over processes
before any backward pass, so gradients equal those of one process holding the global batch.
A process with nothing left to train on (every group filtered out) still runs a zero-loss
backward for each micro-batch, keeping DDP's collective calls in step.

``vlalign ppo`` reuses :class:`Rollouts` (``extras`` carries old values and returns), the phases
and :func:`update`'s ``extra_loss`` hook (a value loss from the same forward, ``return_hidden=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import reduce
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from vlalign.data.collate import EncodedPrompts
from vlalign.data.schema import PromptSample
from vlalign.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    aggregate,
    discounted_returns,
    dr_grpo_advantages,
    kl_penalized_token_rewards,
    masked_mean,
    masked_whiten,
    overlong_reward_penalty,
    ppo_clip_loss,
)
from vlalign.models.logprobs import CompletionLogprobs, completion_logprobs
from vlalign.models.packing import concat_prompts
from vlalign.models.reference import ReferencePolicy
from vlalign.rewards import RewardError, RewardScores
from vlalign.rollout import GenerationSettings, generate
from vlalign.train import Run

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AdvantageName = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
ADVANTAGES: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
"""Advantage estimators a recipe can name: the outcome estimators of :data:`vlalign.losses.ADVANTAGE_ESTIMATORS`
and REINFORCE++ (plain, or "baseline": group mean subtracted from the outcome first)."""


# ----------------------------------------------------------------------------- config


@dataclass
class PolicyUpdateConfig:
    """How each rollout batch updates the policy (clipped surrogate, KL, aggregation)."""

    epochs: int = 1
    """Inner epochs over each rollout batch (PPO epochs; GRPO's mu). More than 1 reuses samples off-policy."""
    minibatches: int = 1
    """Optimiser steps per inner epoch: the step's train.grad_accum micro-batches are split evenly among
    them (must divide train.grad_accum). With epochs = minibatches = 1 the update is on-policy and the
    old log-probs are the current ones (no extra forward)."""
    clip_low: float = 0.2
    """PPO clip range below 1: the ratio is clipped at 1 - clip_low."""
    clip_high: float = 0.2
    """PPO clip range above 1 (DAPO's clip-higher: 0.28)."""
    dual_clip: float = 0.0
    """Dual-clip constant c > 1 for negative advantages (Ye et al. use 3); 0 disables it."""
    aggregation: Aggregation = "token-mean"
    """How per-token losses become one loss (DAPO: token-mean; GRPO paper: seq-mean-token-mean;
    Dr.GRPO: seq-mean-token-sum-norm)."""
    norm_length: int = 0
    """The constant length of seq-mean-token-sum-norm (0: the rollout's max_new_tokens)."""
    kl_coef: float = 0.0
    """Weight beta of the KL to the reference policy (0: no KL term)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (Schulman): k1 = log(pi/ref), k2 = half its square, k3 = ref/pi - 1 - log(ref/pi)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL goes: a term of the loss (GRPO), or subtracted from the reward before the advantages
    (the sequence sum for outcome estimators; per token for REINFORCE++)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus in the loss (0: entropy is only logged)."""
    reference: Literal["auto", "copy", "adapter", "none"] = "auto"
    """Reference policy, the starting model: auto (the adapter-disabled model with LoRA, else a frozen copy),
    copy, adapter, or none (then kl_coef must be 0 and no KL is logged). A frozen copy also gives the
    held-out KL from the start in evaluations."""
    log_kl: bool = True
    """Log the KL to the reference every step even when kl_coef is 0 (costs one reference forward per step)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError(f"update.epochs ({self.epochs}) and update.minibatches ({self.minibatches}) must be >= 1")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"update.clip_low / clip_high must be >= 0, got {self.clip_low}, {self.clip_high}")
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"update.dual_clip must be 0 (off) or > 1, got {self.dual_clip}")
        if self.kl_coef < 0:
            raise ValueError(f"update.kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_coef > 0 and self.reference == "none":
            raise ValueError("update.kl_coef > 0 needs a reference policy; set update.reference to auto, copy or "
                             "adapter")

    @property
    def on_policy(self) -> bool:
        """One optimiser step per rollout batch: the rollout policy is the policy of every forward."""
        return self.epochs == 1 and self.minibatches == 1

    @property
    def needs_reference(self) -> bool:
        return self.reference != "none" and (self.kl_coef > 0 or self.log_kl)


# ----------------------------------------------------------------------------- the batch


@dataclass
class Rollouts:
    """B prompts with G sampled completions each, and what the later phases attach to them.

    Per-row tensors have R = B * G rows (prompt-major); per-token tensors are ``(R, L, ...)``.
    """

    samples: list[PromptSample]
    """The B prompts (ground truth in ``meta`` for the rewards)."""
    prompts: EncodedPrompts
    """The prompts after their one processor call (shared by generation and every log-prob forward)."""
    token_ids: list[list[list[int]]]
    """Sampled token ids, ``token_ids[i][k]`` = completion k of prompt i (stop token included when it stopped)."""
    texts: list[list[str]]
    """Decoded completions, like ``token_ids``."""
    stopped: list[list[bool]]
    """True when a completion ended with a stop token, False when max_new_tokens cut it."""
    group_size: int
    """G, completions per prompt."""
    seconds: float = 0.0
    """Wall time of the generation."""
    rewards: Tensor | None = None  # (R,) float32: the rewards the advantages are computed from
    old_logps: Tensor | None = None  # (R, L): log-probs under the rollout policy (None: on-policy update)
    ref_logps: Tensor | None = None  # (R, L): log-probs under the reference policy
    advantages: Tensor | None = None  # (R,) outcome or (R, L) per-token advantages
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Other per-row tensors a recipe attaches (PPO: old values, returns). Tensors of one dimension are
    ``(R,)``; those of two or more are per-token ``(R, L, ...)`` (cut and padded along L with the rest)."""

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_rows(self) -> int:
        return len(self.samples) * self.group_size

    @property
    def lengths(self) -> Tensor:  # (R,) long
        return torch.tensor([len(c) for group in self.token_ids for c in group], dtype=torch.long)

    @property
    def width(self) -> int:
        """L, the longest completion."""
        return max((len(c) for group in self.token_ids for c in group), default=0)

    @property
    def mask(self) -> Tensor:  # (R, L) bool
        return torch.arange(self.width)[None, :] < self.lengths[:, None]

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for group in self.token_ids for c in group)

    def flat_samples(self) -> list[PromptSample]:
        """Each prompt repeated G times (one per row)."""
        return [s for s in self.samples for _ in range(self.group_size)]

    def flat_texts(self) -> list[str]:
        return [t for group in self.texts for t in group]

    def flat_stopped(self) -> Tensor:  # (R,) bool
        return torch.tensor([s for group in self.stopped for s in group], dtype=torch.bool)

    def row_tensors(self) -> dict[str, Tensor]:
        """Every per-row tensor attached so far, by field name (extras as ``extras.<key>``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        out.update({f"extras.{k}": v for k, v in self.extras.items()})
        return out

    def select_groups(self, groups: Sequence[int]) -> Rollouts:
        """The prompts ``groups`` (in that order) with their G completions; per-token tensors are cut to
        the new longest completion, so they line up with a forward over the selection."""
        groups = list(groups)
        rows = torch.tensor([g * self.group_size + k for g in groups for k in range(self.group_size)], dtype=torch.long)
        width = max((len(c) for g in groups for c in self.token_ids[g]), default=0)

        def cut(t: Tensor) -> Tensor:
            picked = t[rows.to(t.device)]
            return picked[:, :width] if picked.ndim >= 2 else picked

        changes: dict[str, Any] = {name: cut(t) for name, t in self.row_tensors().items() if "." not in name}
        return replace(
            self, samples=[self.samples[g] for g in groups], prompts=self.prompts.select(groups),
            token_ids=[self.token_ids[g] for g in groups], texts=[self.texts[g] for g in groups],
            stopped=[self.stopped[g] for g in groups], extras={k: cut(v) for k, v in self.extras.items()}, **changes,
        )  # fmt: skip

    @staticmethod
    def concat(parts: Sequence[Rollouts]) -> Rollouts:
        """The groups of ``parts`` one after the other (per-token tensors padded with zeros to the longest)."""
        if not parts:
            raise ValueError("Rollouts.concat needs at least one part")
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"Rollouts.concat: parts have different group sizes {sorted(sizes)}")
        nonempty = [p for p in parts if len(p)]
        if len(nonempty) <= 1:
            return nonempty[0] if nonempty else parts[0]
        parts = nonempty
        width = max(p.width for p in parts)
        tensors: dict[str, Tensor | None] = {}
        for name in parts[0].row_tensors():
            values = [p.row_tensors().get(name) for p in parts]
            if any(v is None for v in values):
                raise ValueError(f"Rollouts.concat: {name} is set in some parts and not in others")
            tensors[name] = torch.cat([_pad_width(v, width) for v in values])  # type: ignore[arg-type]
        return Rollouts(
            samples=[s for p in parts for s in p.samples], prompts=reduce(concat_prompts, [p.prompts for p in parts]),
            token_ids=[g for p in parts for g in p.token_ids], texts=[g for p in parts for g in p.texts],
            stopped=[g for p in parts for g in p.stopped], group_size=parts[0].group_size,
            seconds=sum(p.seconds for p in parts),
            **{k: v for k, v in tensors.items() if "." not in k},
            extras={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("extras.")},  # type: ignore[misc]
        )  # fmt: skip


def _pad_width(t: Tensor, width: int) -> Tensor:
    if t.ndim < 2 or t.shape[1] == width:
        return t
    pad = t.new_zeros((t.shape[0], width - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


# ----------------------------------------------------------------------------- phase 1: rollout


def rollout_seed(seed: int, step: int, round_: int = 0) -> int:
    """The sampling seed of round ``round_`` of step ``step`` (a pure function: exact resume)."""
    digest = hashlib.sha256(f"vlalign-rl/{seed}/{step}/{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


@torch.no_grad()
def rollout(
    model: nn.Module, processor: Any, samples: Sequence[PromptSample], *, settings: GenerationSettings, seed: int
) -> Rollouts:
    """Sample ``settings.n`` completions per prompt (G); each prompt is processed and prefilled once.

    ``model`` should be the unwrapped policy (no DDP wrapper: generation needs no gradient sync).
    """
    if settings.n < 1:
        raise ValueError(f"rollout.n (completions per prompt) must be >= 1, got {settings.n}")
    if not samples:
        raise ValueError("rollout: no prompts given")
    gens = generate(model, processor, list(samples), n=settings.n, temperature=settings.temperature,
                    top_p=settings.top_p, top_k=settings.top_k, max_new_tokens=settings.max_new_tokens, seed=seed,
                    batch_size=settings.batch_size, keep_prompts=True)  # fmt: skip
    return Rollouts(samples=list(samples), prompts=reduce(concat_prompts, gens.encoded), token_ids=gens.token_ids,
                    texts=gens.texts, stopped=gens.stopped, group_size=settings.n, seconds=gens.seconds)  # fmt: skip


# ----------------------------------------------------------------------------- phase 2: score


RewardFn = Callable[[Sequence[PromptSample], Sequence[str]], RewardScores]
"""``(samples, completions) -> RewardScores``: a :class:`vlalign.rewards.CombinedReward`."""


def score(rollouts: Rollouts, reward: RewardFn, *, step: int | None = None) -> RewardScores:
    """Score every completion against its prompt. A reward that raises, returns NaN / a non-number or
    times out stops the step with a :class:`~vlalign.rewards.RewardError` naming the function, the
    sample (and the step), never a silent zero."""
    try:
        return reward(rollouts.flat_samples(), rollouts.flat_texts())
    except RewardError as exc:
        where = f"step {step}: " if step is not None else ""
        raise RewardError(f"{where}{exc}", function=exc.function, sample_id=exc.sample_id) from exc


def overlong_shaping(rollouts: Rollouts, *, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment of each completion, ``(R,)`` (0 while ``len <= max_length - buffer``)."""
    return overlong_reward_penalty(rollouts.lengths.to(torch.float32), max_length=max_length,
                                   cache_length=buffer, penalty_factor=factor)  # fmt: skip


# ----------------------------------------------------------------------------- phase 3: log-probs


def policy_logprobs(
    model: nn.Module, rollouts: Rollouts, *, temperature: float, pad_token_id: int, return_entropy: bool = False,
    return_hidden: bool = False,
) -> CompletionLogprobs:
    """Per-token log-probs of the sampled completions under ``model`` at the sampling temperature
    (gradients flow; wrap in ``torch.no_grad()`` for old log-probs). Rows are in rollout order."""
    return completion_logprobs(model, rollouts.prompts, rollouts.token_ids, temperature=temperature,
                               pad_token_id=pad_token_id, return_entropy=return_entropy,
                               return_hidden=return_hidden)  # fmt: skip


def _by_micro_batch(rollouts: Rollouts, micro_batch: int, logps_of: Callable[[Rollouts], Tensor]) -> Tensor:
    """``(R, L)`` float32 CPU log-probs of the rollouts, ``logps_of`` called on ``micro_batch`` prompts at a time."""
    parts = []
    for lo in range(0, len(rollouts), max(micro_batch, 1)):
        part = rollouts.select_groups(range(lo, min(lo + micro_batch, len(rollouts))))
        parts.append(_pad_width(logps_of(part).detach().float().cpu(), rollouts.width))
    return torch.cat(parts) if parts else torch.zeros(0, rollouts.width)


@torch.no_grad()
def old_logprobs(
    model: nn.Module, rollouts: Rollouts, *, temperature: float, pad_token_id: int, micro_batch: int
) -> Tensor:
    """``(R, L)`` log-probs under the rollout policy (the policy before any update of this step), computed
    once per rollout batch in micro-batches of ``micro_batch`` prompts."""
    return _by_micro_batch(rollouts, micro_batch, lambda part: policy_logprobs(
        model, part, temperature=temperature, pad_token_id=pad_token_id).logps)


def reference_logprobs(
    reference: ReferencePolicy, rollouts: Rollouts, *, temperature: float, micro_batch: int
) -> Tensor:
    """``(R, L)`` log-probs under the reference policy (no gradient), in micro-batches of prompts."""
    return _by_micro_batch(rollouts, micro_batch, lambda part: reference.logprobs(
        part.prompts, part.token_ids, temperature=temperature).logps)


def token_kl(logps: Tensor, ref_logps: Tensor, mask: Tensor, *, estimator: str) -> Tensor:
    """``(R, L)`` per-token KL estimate to the reference by name (k1, k2, k3), 0 on padding."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logps, ref_logps, mask)


# ----------------------------------------------------------------------------- phase 4: advantages


ReduceSum = Callable[[Tensor], Tensor]
"""Sum of a tensor over processes (``accelerator.reduce(t, "sum")``; the identity on one process)."""


def _identity(t: Tensor) -> Tensor:
    return t


def global_masked_moments(values: Tensor, mask: Tensor, *, reduce_sum: ReduceSum = _identity) -> tuple[Tensor, Tensor]:
    """Mean and population variance of the masked entries over every process (two passes, float64)."""
    valid = mask.bool()
    x = values.double()
    count = reduce_sum(valid.sum().double()).clamp(min=1)
    mean = reduce_sum(torch.where(valid, x, 0.0).sum()) / count
    var = reduce_sum(torch.where(valid, (x - mean) ** 2, 0.0).sum()) / count
    return mean.to(values.dtype), var.to(values.dtype)


def advantages(
    name: str,
    rewards: Tensor,
    *,
    group_size: int,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    eps: float = 1e-6,
    reduce_sum: ReduceSum = _identity,
) -> Tensor:
    """Advantages of R = B * G completions by estimator ``name`` (one of :data:`ADVANTAGES`).

    Outcome estimators (grpo, dr_grpo, rloo) return ``(R,)`` (the same for every token);
    ``rewards`` should already hold any sequence-level KL penalty. REINFORCE++ returns ``(R, L)``:
    per-token rewards ``-kl_coef * kl_t`` plus the outcome on the last token (``kl`` ``(R, L)``,
    None for none), discounted by ``gamma`` and whitened with the statistics of the global batch;
    the ``_baseline`` variant first subtracts each group's mean outcome.
    """
    if name in ADVANTAGE_ESTIMATORS:
        hp = {"eps": eps} if name == "grpo" else {}
        return ADVANTAGE_ESTIMATORS[name](rewards, group_size=group_size, **hp)
    if name not in ("reinforce_pp", "reinforce_pp_baseline"):
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {list(ADVANTAGES)}")
    outcome = dr_grpo_advantages(rewards, group_size=group_size) if name == "reinforce_pp_baseline" else rewards
    per_token_kl = kl.to(rewards.dtype) if kl is not None else torch.zeros(mask.shape, dtype=rewards.dtype)
    token_rewards = kl_penalized_token_rewards(outcome, per_token_kl, mask, kl_coef=kl_coef if kl is not None else 0.0)
    returns = discounted_returns(token_rewards, mask, gamma=gamma)  # REINFORCE++: whiten the returns globally
    mean, var = global_masked_moments(returns, mask, reduce_sum=reduce_sum)
    return masked_whiten(returns, mask, mean=mean, var=var)


def group_filter_mask(rewards: Tensor, *, group_size: int) -> Tensor:
    """``(B,)`` True for groups whose rewards are not all equal (DAPO's dynamic sampling keeps those)."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(-1) > grouped.amin(-1)


# ----------------------------------------------------------------------------- phase 5: update


def policy_loss_terms(
    logps: Tensor,
    old_logps: Tensor,
    advantages_: Tensor,
    mask: Tensor,
    *,
    cfg: PolicyUpdateConfig,
    ref_logps: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss ``(R, L)`` of a micro-batch: clipped surrogate (+ beta * KL when the KL is in the
    loss) (- entropy_coef * entropy), and its detached token-mean metrics."""
    out = ppo_clip_loss(logps, old_logps, advantages_, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        dual_clip=cfg.dual_clip or None)  # fmt: skip
    per_token = out.losses
    metrics = dict(out.metrics)
    if ref_logps is not None:
        kl = token_kl(logps, ref_logps, mask, estimator=cfg.kl_estimator)
        metrics["kl/ref"] = masked_mean(kl.detach(), mask)
        if cfg.kl_coef > 0 and cfg.kl_in == "loss":
            per_token = per_token + cfg.kl_coef * kl
    if entropy is not None:
        metrics["policy/entropy"] = masked_mean(entropy.detach(), mask)
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * entropy
    return per_token, metrics


def _zero_loss(model: nn.Module) -> Tensor:
    """A loss of exactly 0 that touches every trainable parameter (keeps DDP's collectives in step)."""
    return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)  # type: ignore[return-value]


def micro_batch_groups(
    num_groups: int, num_micro: int, *, seed: int, step: int, epoch: int, shuffle: bool
) -> list[list[int]]:
    """The groups of each of ``num_micro`` micro-batches (as even as possible; some may be empty),
    in an order shuffled by ``(seed, step, epoch)`` when ``shuffle``."""
    order = np.arange(num_groups)
    if shuffle:
        order = np.random.default_rng([seed, step, epoch]).permutation(num_groups)
    return [chunk.tolist() for chunk in np.array_split(order, num_micro)]


ExtraLoss = Callable[[Rollouts, CompletionLogprobs, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]
"""``(micro_rollouts, policy_out, normalisers) -> (loss, metrics)``: an extra loss term of a micro-batch
(PPO's value loss), already divided by the global normaliser it needs; ``normalisers`` holds
``num_tokens`` and ``num_sequences`` of the optimiser step over every process."""


@dataclass
class UpdateContext:
    """What :func:`update` needs besides the config (plain values, built by the recipe)."""

    temperature: float
    """Sampling temperature (log-probs are of the same tempered distribution)."""
    pad_token_id: int
    micro_batches: int
    """Micro-batches per rollout batch on this process (train.grad_accum)."""
    norm_length: int
    """L of seq-mean-token-sum-norm."""
    seed: int
    step: int


def _micro_loss(
    run: Run, model: nn.Module, part: Rollouts, cfg: PolicyUpdateConfig, ctx: UpdateContext,
    norms: dict[str, Tensor], extra_loss: ExtraLoss | None, return_hidden: bool,
) -> tuple[Tensor, dict[str, Tensor], int]:
    """Loss of one micro-batch (scaled for DDP's gradient averaging), its metrics and token count."""
    out = policy_logprobs(model, part, temperature=ctx.temperature, pad_token_id=ctx.pad_token_id,
                          return_entropy=True, return_hidden=return_hidden)  # fmt: skip
    device = out.logps.device
    mask = out.mask
    old = part.old_logps.to(device) if part.old_logps is not None else out.logps.detach()
    ref = part.ref_logps.to(device) if part.ref_logps is not None else None
    adv = part.advantages.to(device, out.logps.dtype)  # type: ignore[union-attr]
    per_token, metrics = policy_loss_terms(out.logps, old, adv, mask, cfg=cfg, ref_logps=ref, entropy=out.entropy)
    loss = aggregate(per_token, mask, mode=cfg.aggregation, max_length=ctx.norm_length,
                     num_tokens=norms["num_tokens"], num_sequences=norms["num_sequences"])  # fmt: skip
    if extra_loss is not None:
        extra, extra_metrics = extra_loss(part, out, norms)
        loss = loss + extra
        metrics.update(extra_metrics)
    # DDP averages gradients over processes; the normalisers are global, hence the factor.
    return loss * run.num_processes, metrics, int(mask.sum())


def update(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rollouts: Rollouts,
    cfg: PolicyUpdateConfig,
    ctx: UpdateContext,
    *,
    extra_loss: ExtraLoss | None = None,
    return_hidden: bool = False,
    parameters: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """``cfg.epochs`` passes of ``cfg.minibatches`` optimiser steps over the rollout batch.

    The batch's groups are dealt into ``ctx.micro_batches`` micro-batches (reshuffled each epoch when
    samples are reused); consecutive runs of ``micro_batches / minibatches`` of them make one optimiser
    step, whose token and sequence counts are summed over processes before its first backward pass.
    ``parameters()`` gives what to clip (default: the model's). Returns token-weighted means of the
    metrics and the mean loss and gradient norm.
    """
    if ctx.micro_batches % cfg.minibatches:
        raise ValueError(f"update.minibatches ({cfg.minibatches}) must divide train.grad_accum ({ctx.micro_batches})")
    if rollouts.advantages is None:
        raise ValueError("update: compute rollouts.advantages first")
    per_step = ctx.micro_batches // cfg.minibatches
    sums: dict[str, float] = {}
    weight = 0.0
    losses, norms_seen = [], []
    for epoch in range(cfg.epochs):
        chunks = micro_batch_groups(len(rollouts), ctx.micro_batches, seed=ctx.seed, step=ctx.step, epoch=epoch,
                                    shuffle=not cfg.on_policy)  # fmt: skip
        for m in range(cfg.minibatches):
            parts = [rollouts.select_groups(c) for c in chunks[m * per_step:(m + 1) * per_step]]
            norms = _global_normalisers(run, parts)
            step_loss = torch.zeros((), device=run.device)
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                sync = contextlib.nullcontext() if last else run.accelerator.no_sync(model)
                with sync, run.accelerator.autocast():
                    if len(part) == 0:
                        loss, metrics, n_tok = _zero_loss(model), {}, 0
                    else:
                        loss, metrics, n_tok = _micro_loss(run, model, part, cfg, ctx, norms, extra_loss, return_hidden)
                    run.accelerator.backward(loss)
                step_loss = step_loss + loss.detach() / run.num_processes
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * n_tok
                weight += n_tok
            losses.append(run.accelerator.reduce(step_loss, "sum"))
            norm = run.clip_and_step(parameters() if parameters else model.parameters(), optimizer, scheduler)
            if norm is not None:
                norms_seen.append(float(norm))
    out = _token_weighted_means(run, sums, weight)
    out["train/loss"] = float(torch.stack(losses).mean())
    if norms_seen:
        out["train/grad_norm"] = sum(norms_seen) / len(norms_seen)
    return out


def _token_weighted_means(run: Run, sums: dict[str, float], weight: float) -> dict[str, float]:
    """Token-weighted means over every process (so they equal those of one process with the global batch);
    a process that trained on nothing this step contributes zeros under every other process's keys."""
    keys = sorted(sums)
    if run.num_processes > 1:
        from accelerate.utils import gather_object

        keys = sorted({k for ks in gather_object([keys]) for k in ks})
    local = torch.tensor([sums.get(k, 0.0) for k in keys] + [weight], dtype=torch.float64, device=run.device)
    total = run.accelerator.reduce(local, "sum").tolist() if run.num_processes > 1 else local.tolist()
    return {k: v / max(total[-1], 1.0) for k, v in zip(keys, total[:-1])}


def _global_normalisers(run: Run, parts: Sequence[Rollouts]) -> dict[str, Tensor]:
    """Tokens and sequences of one optimiser step, summed over its micro-batches and every process."""
    local = torch.tensor([float(sum(p.num_tokens for p in parts)), float(sum(p.num_rows for p in parts))],
                         device=run.device)  # fmt: skip
    total = run.accelerator.reduce(local, "sum").clamp(min=1.0)
    return {"num_tokens": total[0], "num_sequences": total[1]}


# ----------------------------------------------------------------------------- metrics


def rollout_metrics(rollouts: Rollouts, scores: RewardScores | None = None) -> dict[str, Tensor]:
    """Completion lengths, the share cut by max_new_tokens, per-group reward spread, and (with
    ``scores``) every reward function's mean and std."""
    lengths = rollouts.lengths.to(torch.float32)
    out: dict[str, Tensor] = {
        "completions/mean_length": lengths.mean(),
        "completions/max_length": lengths.max(),
        "completions/min_length": lengths.min(),
        "completions/clipped_ratio": (~rollouts.flat_stopped()).float().mean(),
    }
    if rollouts.rewards is not None and rollouts.group_size > 1:
        grouped = rollouts.rewards.view(-1, rollouts.group_size).float()
        out["rewards/group_std"] = grouped.std(-1).mean()
        out["groups/all_equal"] = (grouped.amax(-1) == grouped.amin(-1)).float().mean()
    if scores is not None:
        out.update(scores.metrics())
    return out


def mean_over_processes(run: Run, metrics: dict[str, Any]) -> dict[str, float]:
    """Every metric averaged over the processes that have it (one all-reduce; processes may hold
    different keys, e.g. one whose groups were all filtered out)."""
    keys = sorted(metrics)
    if run.num_processes == 1:
        return {k: float(metrics[k]) for k in keys}
    from accelerate.utils import gather_object

    keys = sorted({k for ks in gather_object([keys]) for k in ks})
    local = torch.tensor([[float(metrics[k]), 1.0] if k in metrics else [0.0, 0.0] for k in keys],
                         dtype=torch.float64, device=run.device).reshape(-1, 2)  # fmt: skip
    total = run.accelerator.reduce(local, "sum")
    return {k: v / max(n, 1.0) for k, (v, n) in zip(keys, total.tolist())}


__all__ = [
    "ADVANTAGES", "ExtraLoss", "PolicyUpdateConfig", "Rollouts", "UpdateContext", "advantages",
    "global_masked_moments", "group_filter_mask", "mean_over_processes", "micro_batch_groups", "old_logprobs",
    "overlong_shaping", "policy_logprobs", "policy_loss_terms", "reference_logprobs", "rollout", "rollout_metrics",
    "rollout_seed", "score", "token_kl", "update",
]
