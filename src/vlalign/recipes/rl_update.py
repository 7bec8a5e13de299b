"""Phase 5 of the on-policy RL step (:mod:`vlalign.recipes.rl_common`): the clipped-surrogate update.

:func:`update` is the GRPO family's update: ``update.epochs`` passes of ``update.minibatches``
optimiser steps over a step's :class:`~vlalign.recipes.rollouts.Rollouts`, one forward per
micro-batch (shared prefix). Its pieces are shared with PPO's update (``vlalign.recipes.ppo``,
which adds the value loss in its own loop):

* :func:`optimiser_steps` deals the batch's groups into micro-batches (reshuffled each epoch when
  samples are reused) and yields those of each optimiser step;
* :func:`global_normalisers` sums an optimiser step's token and sequence counts over processes
  before its first backward pass, so gradients equal those of one process with the global batch;
* :func:`surrogate_loss` turns a forward's log-probs into the aggregated clipped surrogate
  (+ KL to the reference when it is in the loss, - entropy bonus);
* :class:`UpdateStats` keeps the token-weighted metrics, losses and gradient norms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlalign.losses import aggregate, entropy_bonus, masked_mean, ppo_clip_loss, truncated_is_weights
from vlalign.models.generate import GenerationSettings
from vlalign.models.logprobs import CompletionLogprobs
from vlalign.models.moe import add_router_aux_loss
from vlalign.models.packing import useful_token_counts
from vlalign.recipes.rl_common import PolicyUpdateConfig, policy_logprobs, token_kl
from vlalign.recipes.rollouts import Rollouts
from vlalign.training import Run, TrainConfig, micro_step_context, union_of_keys, zero_loss
from vlalign.training.distributed import backward


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
    out = ppo_clip_loss(
        logps,
        old_logps,
        advantages_,
        mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip or None,
    )
    per_token = out.losses
    metrics = dict(out.metrics)
    if ref_logps is not None:
        kl = token_kl(logps, ref_logps, mask, estimator=cfg.kl_estimator)
        metrics["kl/ref"] = masked_mean(kl.detach(), mask)
        if cfg.kl_coef > 0 and cfg.kl_in == "loss":
            per_token = per_token + cfg.kl_coef * kl
    if entropy is not None:
        bonus = entropy_bonus(entropy, mask, coef=cfg.entropy_coef)
        metrics.update(bonus.metrics)
        if cfg.entropy_coef > 0:
            per_token = per_token + bonus.losses
    return per_token, metrics


def micro_batch_groups(
    num_groups: int, num_micro: int, *, seed: int, step: int, epoch: int, shuffle: bool
) -> list[list[int]]:
    """The groups of each of ``num_micro`` micro-batches (as even as possible; some may be empty),
    in an order shuffled by ``(seed, step, epoch)`` when ``shuffle``."""
    order = np.arange(num_groups)
    if shuffle:
        order = np.random.default_rng([seed, step, epoch]).permutation(num_groups)
    return [chunk.tolist() for chunk in np.array_split(order, num_micro)]


@dataclass
class UpdateContext:
    """What an update needs besides the config (plain values, built by the recipe)."""

    temperature: float
    """Sampling temperature (log-probs are of the same tempered distribution)."""
    pad_token_id: int
    micro_batches: int
    """Micro-batches per rollout batch on this process (train.grad_accum)."""
    norm_length: int
    """L of seq-mean-token-sum-norm."""
    seed: int
    step: int
    pack_length: int = 0
    """Pack the policy forwards' prompts into rows of at most this many tokens (0: one per row)."""


def update_context(
    rollout: GenerationSettings, train: TrainConfig, cfg: PolicyUpdateConfig, *, step: int, pad_token_id: int
) -> UpdateContext:
    """The :class:`UpdateContext` of optimiser-step ``step`` from a recipe's config sections."""
    return UpdateContext(
        temperature=rollout.temperature,
        pad_token_id=pad_token_id,
        micro_batches=train.grad_accum,
        norm_length=cfg.norm_length or rollout.max_new_tokens,
        seed=train.seed,
        step=step,
        pack_length=cfg.logprob_pack_length,
    )


def optimiser_steps(rollouts: Rollouts, cfg: PolicyUpdateConfig, ctx: UpdateContext) -> Iterator[list[Rollouts]]:
    """The micro-batches of each optimiser step of the update, in order: ``cfg.epochs`` passes, each
    dealing the batch's groups into ``ctx.micro_batches`` micro-batches (reshuffled by ``(seed, step,
    epoch)`` unless the update is on-policy), consecutive runs of ``micro_batches / minibatches`` of
    them making one optimiser step."""
    if ctx.micro_batches % cfg.minibatches:
        raise ValueError(f"update.minibatches ({cfg.minibatches}) must divide train.grad_accum ({ctx.micro_batches})")
    if rollouts.advantages is None:
        raise ValueError("update: compute rollouts.advantages first")
    per_step = ctx.micro_batches // cfg.minibatches
    for epoch in range(cfg.epochs):
        chunks = micro_batch_groups(
            len(rollouts), ctx.micro_batches, seed=ctx.seed, step=ctx.step, epoch=epoch, shuffle=not cfg.on_policy
        )
        for m in range(cfg.minibatches):
            yield [rollouts.select_groups(c) for c in chunks[m * per_step : (m + 1) * per_step]]


def update_token_fraction(rollouts: Rollouts, cfg: PolicyUpdateConfig, ctx: UpdateContext) -> float:
    """The useful-token fraction (tokens / slots) of the update's forwards: the micro-batches of
    :func:`optimiser_steps`, each laid out as ``ctx.pack_length`` packs it (``perf/useful_token_fraction``)."""
    parts = [p for step in optimiser_steps(rollouts, cfg, ctx) for p in step]
    counts = [useful_token_counts(p.prompts.lengths, p.token_ids, ctx.pack_length or None) for p in parts]
    return sum(c[0] for c in counts) / max(sum(c[1] for c in counts), 1)


def global_normalisers(run: Run, parts: Sequence[Rollouts]) -> dict[str, Tensor]:
    """Tokens and sequences of one optimiser step, summed over its micro-batches and every process."""
    local = torch.tensor(
        [float(sum(p.num_tokens for p in parts)), float(sum(p.num_rows for p in parts))], device=run.device
    )
    total = run.accelerator.reduce(local, "sum").clamp(min=1.0)
    return {"num_tokens": total[0], "num_sequences": total[1]}


def surrogate_loss(
    out: CompletionLogprobs,
    part: Rollouts,
    cfg: PolicyUpdateConfig,
    ctx: UpdateContext,
    norms: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped-surrogate loss of a micro-batch from its policy forward ``out`` (entropy included),
    aggregated by ``cfg.aggregation`` with the optimiser step's global normalisers, and its metrics.
    The old log-probs are the forward's own (detached) when the rollouts carry none (on-policy)."""
    device = out.logps.device
    mask = out.mask
    old = part.old_logps.to(device) if part.old_logps is not None else out.logps.detach()
    ref = part.ref_logps.to(device) if part.ref_logps is not None else None
    adv = part.advantages.to(device, out.logps.dtype)  # type: ignore[union-attr]
    per_token, metrics = policy_loss_terms(out.logps, old, adv, mask, cfg=cfg, ref_logps=ref, entropy=out.entropy)
    if cfg.rollout_is_cap > 0 and part.engine_logps is not None:  # engine / trainer mismatch (TIS)
        weights, is_metrics = truncated_is_weights(old, part.engine_logps.to(device), mask, cap=cfg.rollout_is_cap)
        per_token = per_token * weights
        metrics.update(is_metrics)
    loss = aggregate(
        per_token,
        mask,
        mode=cfg.aggregation,
        max_length=ctx.norm_length,
        num_tokens=norms["num_tokens"],
        num_sequences=norms["num_sequences"],
    )
    loss = add_router_aux_loss(loss, out, metrics, weight=len(out) / norms["num_sequences"])  # MoE: this share
    return loss, metrics


class UpdateStats:
    """What an update reports: token-weighted means of the micro-batch metrics, the mean loss of its
    optimiser steps and the mean gradient norm (over every process)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.sums: dict[str, float] = {}
        self.weight = 0.0
        self.losses: list[Tensor] = []
        self.norms: list[float] = []
        self.step_loss = torch.zeros((), device=run.device)

    def add(self, loss: Tensor, metrics: dict[str, Tensor], tokens: int) -> None:
        """A micro-batch's loss (as passed to backward) and metrics, weighted by its ``tokens``."""
        self.step_loss = self.step_loss + loss.detach() / self.run.num_processes
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * tokens
        self.weight += tokens

    def end_step(self) -> None:
        """The optimiser step's loss, summed over processes (call before stepping)."""
        self.losses.append(self.run.accelerator.reduce(self.step_loss, "sum"))
        self.step_loss = torch.zeros((), device=self.run.device)

    def add_grad_norm(self, norm: Tensor | None) -> None:
        if norm is not None:
            self.norms.append(float(norm))

    def means(self) -> dict[str, float]:
        """Token-weighted means over every process (those of one process with the global batch; a
        process that trained on nothing contributes zeros under every other process's keys), the mean
        loss (``train/loss``) and gradient norm (``train/grad_norm``, when clipping measured one)."""
        run = self.run
        keys = union_of_keys(run, list(self.sums))
        local = torch.tensor(
            [self.sums.get(k, 0.0) for k in keys] + [self.weight], dtype=torch.float64, device=run.device
        )
        total = run.accelerator.reduce(local, "sum").tolist() if run.num_processes > 1 else local.tolist()
        out = {k: v / max(total[-1], 1.0) for k, v in zip(keys, total[:-1])}
        out["train/loss"] = float(torch.stack(self.losses).mean())
        if self.norms:
            out["train/grad_norm"] = sum(self.norms) / len(self.norms)
        return out


def policy_loss(
    run: Run, model: nn.Module, part: Rollouts, cfg: PolicyUpdateConfig, ctx: UpdateContext, norms: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor], int]:
    """One micro-batch of the GRPO family: forward, clipped surrogate; returns the loss scaled for DDP's
    gradient averaging (the normalisers are global, hence the factor), its metrics and token count."""
    out = policy_logprobs(
        model,
        part,
        temperature=ctx.temperature,
        pad_token_id=ctx.pad_token_id,
        return_entropy=True,
        pack_length=ctx.pack_length,
    )
    loss, metrics = surrogate_loss(out, part, cfg, ctx, norms)
    return loss * run.num_processes, metrics, int(out.mask.sum())


MicroLoss = Callable[[Rollouts, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor], int]]
"""``(micro-batch, step normalisers) -> (loss to backward, metrics, tokens)``: one recipe's loss."""


def optimise(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rollouts: Rollouts,
    cfg: PolicyUpdateConfig,
    ctx: UpdateContext,
    loss_of: MicroLoss,
    parameters: Sequence[Tensor],
) -> dict[str, float]:
    """The optimiser steps of an update (:func:`optimiser_steps`): per step, the global normalisers,
    ``loss_of`` and a backward per micro-batch (a zero loss where a process has nothing, to keep
    processes in step), then clipping of ``parameters`` and the step. Returns :meth:`UpdateStats.means`."""
    stats = UpdateStats(run)
    for parts in optimiser_steps(rollouts, cfg, ctx):
        norms = global_normalisers(run, parts)
        for i, part in enumerate(parts):
            with micro_step_context(run, model, i == len(parts) - 1), run.accelerator.autocast():
                if len(part) == 0:  # nothing to train on here: keep processes in step
                    loss, metrics, tokens = zero_loss(model), {}, 0
                else:
                    loss, metrics, tokens = loss_of(part, norms)
                backward(run, model, loss)
            stats.add(loss, metrics, tokens)
        stats.end_step()
        stats.add_grad_norm(run.clip_and_step(parameters, optimizer, scheduler))
    return stats.means()


def update(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rollouts: Rollouts,
    cfg: PolicyUpdateConfig,
    ctx: UpdateContext,
) -> dict[str, float]:
    """GRPO's update: ``cfg.epochs`` passes of ``cfg.minibatches`` optimiser steps of the clipped
    surrogate (:func:`policy_loss`) over the rollout batch. Returns token-weighted means of the
    metrics and the mean loss and gradient norm (:class:`UpdateStats`)."""

    def loss_of(part: Rollouts, norms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], int]:
        return policy_loss(run, model, part, cfg, ctx, norms)

    return optimise(run, model, optimizer, scheduler, rollouts, cfg, ctx, loss_of, list(model.parameters()))


__all__ = [
    "UpdateContext",
    "UpdateStats",
    "global_normalisers",
    "micro_batch_groups",
    "optimise",
    "optimiser_steps",
    "policy_loss",
    "policy_loss_terms",
    "surrogate_loss",
    "update",
    "update_context",
    "update_token_fraction",
]
