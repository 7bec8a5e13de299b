"""Phase 5 of the on-policy RL step (:mod:`vlalign.recipes.rl_common`): the clipped-surrogate update.

:func:`update` runs the configured epochs and minibatches over a step's :class:`Rollouts`,
one forward per micro-batch (shared prefix), with the aggregation normalisers of each optimiser
step summed over processes first, so that gradients equal those of one process holding the
global batch; ``extra_loss`` lets PPO add its value loss from the same forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlalign.losses import aggregate, masked_mean, ppo_clip_loss
from vlalign.models.logprobs import CompletionLogprobs
from vlalign.recipes.rl_common import PolicyUpdateConfig, Rollouts, policy_logprobs, token_kl
from vlalign.training import Run


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
    run: Run,
    model: nn.Module,
    part: Rollouts,
    cfg: PolicyUpdateConfig,
    ctx: UpdateContext,
    norms: dict[str, Tensor],
    extra_loss: ExtraLoss | None,
    return_hidden: bool,
) -> tuple[Tensor, dict[str, Tensor], int]:
    """Loss of one micro-batch (scaled for DDP's gradient averaging), its metrics and token count."""
    out = policy_logprobs(
        model,
        part,
        temperature=ctx.temperature,
        pad_token_id=ctx.pad_token_id,
        return_entropy=True,
        return_hidden=return_hidden,
    )
    device = out.logps.device
    mask = out.mask
    old = part.old_logps.to(device) if part.old_logps is not None else out.logps.detach()
    ref = part.ref_logps.to(device) if part.ref_logps is not None else None
    adv = part.advantages.to(device, out.logps.dtype)  # type: ignore[union-attr]
    per_token, metrics = policy_loss_terms(out.logps, old, adv, mask, cfg=cfg, ref_logps=ref, entropy=out.entropy)
    loss = aggregate(
        per_token,
        mask,
        mode=cfg.aggregation,
        max_length=ctx.norm_length,
        num_tokens=norms["num_tokens"],
        num_sequences=norms["num_sequences"],
    )
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
        chunks = micro_batch_groups(
            len(rollouts), ctx.micro_batches, seed=ctx.seed, step=ctx.step, epoch=epoch, shuffle=not cfg.on_policy
        )
        for m in range(cfg.minibatches):
            parts = [rollouts.select_groups(c) for c in chunks[m * per_step : (m + 1) * per_step]]
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
    local = torch.tensor(
        [float(sum(p.num_tokens for p in parts)), float(sum(p.num_rows for p in parts))], device=run.device
    )
    total = run.accelerator.reduce(local, "sum").clamp(min=1.0)
    return {"num_tokens": total[0], "num_sequences": total[1]}


__all__ = ["ExtraLoss", "UpdateContext", "micro_batch_groups", "policy_loss_terms", "update"]
