"""``vlalign ppo``: actor-critic PPO with a vision-language critic (InstructGPT-style RLHF).

Where the defaults depart from PPO (Schulman et al., arXiv 1707.06347) and from TRL's
``PPOTrainer`` (``trl.experimental.ppo``, ``PPOConfig`` defaults as read in TRL 1.10's source)::

    setting        vlalign default                     Schulman et al. PPO           TRL PPOConfig
    aggregation    token-mean over the optimiser       mean over the minibatch's     masked mean over each
                   step's tokens, all processes        timesteps                     micro-batch (local)
                   (policy and value loss alike)
    KL             in the reward, per token, k1,       none (the clipped objective;  in the reward, per token,
                   beta=update.kl_coef=0.05, fixed     a KL-penalty variant with     k1, kl_coef=0.05, fixed
                   (adaptive with ppo.kl_target)       adaptive beta is compared)
    eps            advantages whitened over the        no advantage whitening        whitened per process, Bessel
                   global batch: population var, 1e-8                                variance, 1e-8
    clipping       ratio 1 +- 0.2; value clipped       ratio 1 +- 0.2; value loss    cliprange=0.2,
                   +- 0.2, vf_coef=0.1; no entropy     unclipped, c1=1, entropy      cliprange_value=0.2,
                                                       bonus c2=0.01                 vf_coef=0.1
    epochs, GAE    2 epochs; gamma=1, lambda=0.95      3-10 epochs; gamma=0.99,      num_ppo_epochs=4;
                                                       lambda=0.95                   gamma=1, lam=0.95
    sampling       temperature 1.0                     (not a language model)        temperature=0.7

Each step, in the phases of :mod:`vlalign.recipes.rl_common`:

1. **rollout**: sample ``rollout.n`` completions for each of the step's prompts (each prompt and
   image processed once, for generation and for every later forward);
2. **score**: the configured rewards (a reward model from ``vlalign rm`` named ``reward_model``
   in ``rewards.weights``, verifiable functions, or both, weighted), minus
   ``ppo.missing_eos_penalty`` for completions cut by ``max_new_tokens``;
3. **evaluate the rollout** (no gradient): old log-probs and values V(s_t) (one forward when the
   critic shares the policy's backbone: the value head reads the same hidden states), reference
   log-probs;
4. **advantages**: per-token rewards r_t = −β·KL_t plus the score on the last token (KL_t by
   ``update.kl_estimator``, k1 = log π/π_ref by default, when ``update.kl_in = reward``), GAE
   (γ, λ) giving advantages and returns, advantages whitened over the global batch
   (:func:`vlalign.losses.gae`, :func:`~vlalign.losses.kl_penalized_token_rewards`,
   :func:`~vlalign.losses.masked_whiten`);
5. **update** (:func:`ppo_update`): ``update.epochs`` passes of ``update.minibatches`` optimiser
   steps of the clipped surrogate plus ``critic.vf_coef`` times the clipped value loss
   (:func:`~vlalign.losses.value_loss`, token mean over the step's global token count), the value
   loss computed from the same forward's hidden states (shared critic) or from the critic's own
   forward (separate critic); the pieces of the loop are those of GRPO's update
   (:mod:`vlalign.recipes.rl_update`);
6. **KL control**: with ``ppo.kl_target > 0`` the adaptive controller of Ziegler et al.
   (``KL_CONTROLLERS["adaptive"]``, :class:`~vlalign.losses.AdaptiveKLController`) moves β towards
   the target sequence KL; β is part of every checkpoint, so a resumed run continues with the β it had.

The critic (``critic.shared``, :mod:`vlalign.recipes.critic`): a value head on the policy's own
backbone (one forward for policy and value; the backbone learns from both losses), or a separate
backbone with its own head, initialised from ``critic.name_or_path`` (''= the policy's starting
model; a ``vlalign rm`` folder gives its backbone and its reward head, as InstructGPT initialises
the value function from the reward model). Which is better depends on scale: sharing halves the
compute, a separate critic keeps the value loss from pulling on the policy's features.

Prompts per step: ``train.batch_size`` prompts per micro-batch times ``train.grad_accum`` times
processes; the learning-rate schedule counts optimiser steps (steps x epochs x minibatches). The
options are in :mod:`vlalign.recipes.ppo_config`.

Examples::

    vlalign rm --model.name_or_path=runs/sft/model ... --train.output_dir=runs/rm
    vlalign ppo --model.name_or_path=runs/sft/model --reward_model=runs/rm/model \\
                --ppo.tasks='[describe]' --train.output_dir=runs/ppo
    vlalign ppo --config examples/ppo_shapes.yaml
    vlalign ppo --critic.shared=false --critic.name_or_path=runs/rm/model ...  # separate critic from the RM
    vlalign ppo --train.output_dir=runs/ppo --resume   # continue exactly where it stopped
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlalign.data.collate import pad_token_id_of
from vlalign.data.schema import PromptSample
from vlalign.eval.suite import EvalResult
from vlalign.eval.tasks import filter_tasks
from vlalign.losses import (
    KL_CONTROLLERS,
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    gae,
    kl_penalized_token_rewards,
    masked_whiten,
    value_loss,
)
from vlalign.models.heads import token_scores
from vlalign.models.logprobs import CompletionLogprobs
from vlalign.models.packing import TokenSlots
from vlalign.recipes.common import (
    guard_distributed,
    load_policy,
    load_split,
    save_final_model,
)
from vlalign.recipes.critic import build_critic, save_critic
from vlalign.recipes.ppo_config import Config, check_config
from vlalign.recipes.result import RunResult, run_result
from vlalign.recipes.rl_common import (
    PolicyUpdateConfig,
    completion_records,
    global_masked_moments,
    policy_logprobs,
    reference_logprobs,
    rollout_metrics,
    run_eval,
    score,
    token_kl,
)
from vlalign.recipes.rl_defaults import checked_reward, suite_and_reference
from vlalign.recipes.rl_update import (
    UpdateContext,
    optimise,
    surrogate_loss,
    update_context,
    update_token_fraction,
)
from vlalign.recipes.rollouts import (
    RolloutEngine,
    Rollouts,
    close_rollout_engines,
    pad_width,
    rollout,
    rollout_engine,
    rollout_seed,
)
from vlalign.training import (
    BatchPlan,
    Run,
    StepRecords,
    build_optimizer,
    build_scheduler,
    check_finite,
    mean_over_processes,
    total_steps,
)
from vlalign.training.distributed import whole_weights

# ----------------------------------------------------------------------------- set-up


def load_prompts(cfg: Config) -> list[PromptSample]:
    """The training prompts, filtered to ``ppo.tasks``."""
    samples = load_split(cfg.data.train, "prompt", cfg.data)
    return filter_tasks(samples, cfg.ppo.tasks, source=cfg.data.train, option="ppo.tasks")


def kl_controller(cfg: Config, value: float) -> AdaptiveKLController | FixedKLController:
    """β's controller from :data:`~vlalign.losses.KL_CONTROLLERS`: "adaptive" towards ``ppo.kl_target`` when it
    is set, else "fixed" at ``value``."""
    if cfg.ppo.kl_target > 0:
        return KL_CONTROLLERS["adaptive"](value, target=cfg.ppo.kl_target, horizon=cfg.ppo.kl_horizon)
    return KL_CONTROLLERS["fixed"](value)


def _resumed_kl_coef(run: Run, default: float) -> float:
    """β as the checkpoint being resumed saved it (``default`` on a fresh start)."""
    if run.resume_from is None or run.start_step == 0:
        return default
    state = json.loads((Path(run.resume_from) / "state.json").read_text())
    return float(state.get("kl_coef", default))


def build_optimizer_for(policy: nn.Module, critic: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the policy (train.lr) and the critic (critic.lr, or train.lr)."""
    optimizer = build_optimizer(policy, cfg.train)
    critic_lr = cfg.critic.lr or cfg.train.lr
    for group in build_optimizer(critic, replace(cfg.train, lr=critic_lr)).param_groups:
        if group["params"]:
            optimizer.add_param_group(
                {"params": group["params"], "weight_decay": group["weight_decay"], "lr": critic_lr}
            )
    return optimizer


# ----------------------------------------------------------------------------- phases of a step


def collect(
    run: Run,
    policy: nn.Module,
    critic: nn.Module,
    processor: Any,
    reward: Any,
    reference: Any,
    samples: list[PromptSample],
    step: int,
    cfg: Config,
    *,
    pad: int,
    vllm: RolloutEngine | None = None,
) -> tuple[Rollouts, dict[str, Any]]:
    """Rollout, score, old log-probs, values and reference log-probs of the step's prompts (``vllm``: the
    rollout engine with rollout.engine = vllm, else the policy generates)."""
    seed = rollout_seed(cfg.train.seed, step)
    ro = rollout(policy, processor, samples, settings=cfg.rollout, seed=seed, engine=vllm)
    t0 = time.perf_counter()
    scores = score(ro, reward, step=step + 1)
    ro.rewards = scores.total.to(torch.float32)
    if cfg.ppo.missing_eos_penalty:
        ro.rewards = ro.rewards - cfg.ppo.missing_eos_penalty * (~ro.flat_stopped()).float()
    metrics: dict[str, Any] = {
        **rollout_metrics(ro, scores),
        "perf/rollout_s": ro.seconds,
        "perf/score_s": time.perf_counter() - t0,
    }
    slots, layout = TokenSlots(), {"micro_batch": cfg.train.batch_size, "pack_length": cfg.update.logprob_pack_length}
    ro.old_logps, ro.extras["values"] = rollout_values(
        policy,
        critic,
        ro,
        shared=cfg.critic.shared,
        temperature=cfg.rollout.temperature,
        pad_token_id=pad,
        slots=slots,
        **layout,
    )
    if reference is not None and cfg.update.needs_reference:
        ro.ref_logps = reference_logprobs(reference, ro, temperature=cfg.rollout.temperature, slots=slots, **layout)
    if slots.slots:  # the rollout scoring (old log-probs, values) and reference passes, packed like the update's
        metrics["perf/useful_token_fraction_scoring"] = slots.fraction()
    return ro, metrics


@torch.no_grad()
def rollout_values(
    policy: nn.Module,
    critic: nn.Module,
    ro: Rollouts,
    *,
    shared: bool,
    temperature: float,
    pad_token_id: int,
    micro_batch: int,
    pack_length: int = 0,
    slots: TokenSlots | None = None,
) -> tuple[Tensor, Tensor]:
    """Old log-probs and values V(s_t) of the rollout, ``(R, L)`` each (CPU), in micro-batches of prompts.

    ``shared``: ``critic`` is a value head on the policy's hidden states, and one forward per
    micro-batch gives both; otherwise ``critic`` is a :class:`CriticModel` with its own forward.
    ``pack_length``: both forwards pack prompts as the update does (0: one prompt per row); ``slots``
    counts the policy forwards' tokens and slots (a separate critic's rows are the same).
    """
    logps, values = [], []
    for lo in range(0, len(ro), max(micro_batch, 1)):
        part = ro.select_groups(range(lo, min(lo + micro_batch, len(ro))))
        out = policy_logprobs(
            policy,
            part,
            temperature=temperature,
            pad_token_id=pad_token_id,
            return_hidden=shared,
            pack_length=pack_length,
        )
        if slots is not None:
            slots.add(out.num_tokens, out.num_slots)
        v = token_scores(critic, out) if shared else critic_values(critic, part, pad_token_id, pack_length)
        logps.append(pad_width(out.logps.float().cpu(), ro.width))
        values.append(pad_width(v.float().cpu(), ro.width))
    return torch.cat(logps), torch.cat(values)


def critic_values(critic: nn.Module, part: Rollouts, pad_token_id: int, pack_length: int = 0) -> Tensor:
    """V(s_t) ``(R, L)`` of a separate critic (a :class:`~vlalign.models.heads.CriticModel`) on ``part``'s
    completions, its forward packed by ``pack_length`` (0: one prompt per row)."""
    return critic(part.prompts, part.token_ids, pad_token_id=pad_token_id, pack_length=pack_length or None)


def ppo_advantages(ro: Rollouts, *, kl_coef: float, cfg: Config, reduce_sum: Any) -> dict[str, Tensor]:
    """Per-token rewards (KL penalty + score on the last token), GAE, whitening; fills ``ro.advantages``
    and ``ro.extras['returns']``. Needs ``ro.rewards``, ``ro.old_logps``, ``ro.extras['values']`` and,
    with a KL, ``ro.ref_logps``. Returns the step's metrics."""
    mask = ro.mask
    values = ro.extras["values"]
    kl = None
    if ro.ref_logps is not None:
        kl = token_kl(ro.old_logps, ro.ref_logps, mask, estimator=cfg.update.kl_estimator)  # (R, L)
    in_reward = kl is not None and cfg.update.kl_in == "reward"
    penalty = kl if in_reward else torch.zeros_like(values)
    token_rewards = kl_penalized_token_rewards(ro.rewards, penalty, mask, kl_coef=kl_coef if in_reward else 0.0)
    adv, returns = gae(token_rewards, values, mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam)
    metrics: dict[str, Tensor] = {
        "returns/mean": returns[mask].mean(),
        "values/mean": values[mask].mean(),
        "values/explained_variance": explained_variance(values, returns, mask),
    }
    if cfg.ppo.whiten_advantages:
        mean, var = global_masked_moments(adv, mask, reduce_sum=reduce_sum)
        adv = masked_whiten(adv, mask, mean=mean, var=var)
    metrics["advantages/abs_mean"] = adv[mask].abs().mean()
    if kl is not None:
        metrics["kl/seq"] = kl.sum(-1).mean()
    metrics["kl/coef"] = torch.tensor(kl_coef)
    ro.advantages = adv
    ro.extras["returns"] = returns
    return metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var(R − V) / Var(R) over the masked tokens (1: perfect critic, 0: no better than a constant)."""
    r, v = returns[mask].double(), values[mask].double()
    var = r.var(correction=0)
    return (1.0 - (r - v).var(correction=0) / var).float() if var > 0 else torch.tensor(0.0)


def value_term(
    critic: nn.Module,
    part: Rollouts,
    out: CompletionLogprobs,
    cfg: Config,
    norms: dict[str, Tensor],
    *,
    pad_token_id: int,
    pack_length: int = 0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``critic.vf_coef`` times the clipped value loss of a micro-batch (token mean over the optimiser step's
    global token count) and its metrics. A shared critic (a value head) reads the hidden states of the
    policy forward ``out``; a separate critic runs its own forward (packed by ``pack_length``)."""
    if cfg.critic.shared:
        values = token_scores(critic, out)
    else:
        values = critic_values(critic, part, pad_token_id, pack_length)
    device = values.device
    res = value_loss(
        values,
        part.extras["values"].to(device),
        part.extras["returns"].to(device),
        out.mask,
        clip_range=cfg.critic.value_clip or None,
    )
    loss = aggregate(res.losses, out.mask, mode="token-mean", num_tokens=norms["num_tokens"])
    return cfg.critic.vf_coef * loss, {**res.metrics, "value/loss": loss.detach()}


def ppo_loss(
    run: Run,
    model: nn.Module,
    critic: nn.Module,
    part: Rollouts,
    cfg: Config,
    loss_cfg: PolicyUpdateConfig,
    ctx: UpdateContext,
    norms: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor], int]:
    """One micro-batch: the policy forward (with its hidden states for a shared critic), the clipped
    surrogate, then the value loss; returns the loss scaled for DDP's gradient averaging (the normalisers
    are global, hence the factor), its metrics and its token count."""
    out = policy_logprobs(
        model,
        part,
        temperature=ctx.temperature,
        pad_token_id=ctx.pad_token_id,
        return_entropy=True,
        return_hidden=cfg.critic.shared,
        pack_length=ctx.pack_length,
    )
    loss, metrics = surrogate_loss(out, part, loss_cfg, ctx, norms)
    value, value_metrics = value_term(
        critic, part, out, cfg, norms, pad_token_id=ctx.pad_token_id, pack_length=ctx.pack_length
    )
    metrics.update(value_metrics)
    return (loss + value) * run.num_processes, metrics, int(out.mask.sum())


def ppo_update(
    run: Run,
    model: nn.Module,
    critic: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ro: Rollouts,
    cfg: Config,
    ctx: UpdateContext,
    *,
    beta: float,
) -> dict[str, float]:
    """``update.epochs`` passes of ``update.minibatches`` optimiser steps of :func:`ppo_loss` over the rollout
    batch (β times the KL in the loss when ``update.kl_in`` is "loss"); policy and critic are clipped together.
    Returns token-weighted means of the metrics, the mean loss and gradient norm, and the useful-token
    fraction of its forwards."""
    loss_cfg = replace(cfg.update, kl_coef=beta if cfg.update.kl_in == "loss" else 0.0)

    def loss_of(part: Rollouts, norms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], int]:
        return ppo_loss(run, model, critic, part, cfg, loss_cfg, ctx, norms)

    parameters = [*model.parameters(), *critic.parameters()]
    metrics = optimise(run, model, optimizer, scheduler, ro, loss_cfg, ctx, loss_of, parameters)
    return {**metrics, "perf/useful_token_fraction": update_token_fraction(ro, cfg.update, ctx)}


# ----------------------------------------------------------------------------- the loop


def run(cfg: Config) -> RunResult:
    """Train with PPO, evaluate, save the policy and the critic; returns the run's folder, model and numbers.
    The prompts are read and every reward is called once on them before the policy loads."""
    check_config(cfg)
    train_set = load_prompts(cfg)
    reward = checked_reward(cfg, train_set)
    run = Run(cfg.train, config=cfg, desc="ppo")
    per_step = cfg.train.grad_accum // cfg.update.minibatches  # micro-batches per optimiser step
    model_cfg = guard_distributed(
        run, cfg.model, micro_batches_per_step=per_step, hint="train.grad_accum = update.minibatches"
    )
    model, processor = load_policy(model_cfg)
    pad = pad_token_id_of(processor)
    critic = build_critic(cfg.critic, model_cfg, model, processor, seed=cfg.train.seed)
    plan = BatchPlan(len(train_set), cfg.train.batch_size, cfg.train.grad_accum, run.num_processes, cfg.train.seed)
    steps = total_steps(cfg.train, plan)
    optimizer = build_optimizer_for(model, critic, cfg)
    scheduler = build_scheduler(optimizer, cfg.train, steps * cfg.update.epochs * cfg.update.minibatches)
    suite, reference = suite_and_reference(cfg, model, pad)  # from the starting weights, before a checkpoint
    modules, optimizer = run.prepare(
        {"model": model, "critic": critic}, optimizer, scheduler, total=steps, processor=processor
    )
    model, critic = modules["model"], modules["critic"]
    policy = run.accelerator.unwrap_model(model)
    gather = partial(collect, pad=pad, vllm=rollout_engine(cfg.rollout, cfg.model, processor, policy))
    controller = kl_controller(cfg, _resumed_kl_coef(run, cfg.update.kl_coef))
    model.train()
    critic.train()
    scorer = reward.scorers.get("reward_model")
    baseline: EvalResult | None = None
    run.print(
        f"ppo: {len(train_set)} prompts, {steps} steps of {plan.global_batch} prompts x {cfg.rollout.n}; "
        f"critic {'shared' if cfg.critic.shared else 'separate'}"
    )
    log = StepRecords(
        run.run_dir / "completions.jsonl",
        start_step=run.start_step,
        enabled=cfg.log_completions and run.accelerator.is_main_process,
    )
    reduce_sum = lambda t: run.accelerator.reduce(t.to(run.device), "sum").cpu()

    for step in range(run.start_step, steps):
        t_start = time.perf_counter()
        samples = [train_set[i] for mb in plan.micro_batches(step, run.process_index) for i in mb]
        value_fn = run.accelerator.unwrap_model(critic)  # autocast: the update's precision; whole_weights: local decode
        with run.accelerator.autocast(), whole_weights(policy), whole_weights(value_fn):
            ro, metrics = gather(run, policy, value_fn, processor, reward, reference, samples, step, cfg)
        t_update = time.perf_counter()
        beta = controller.value
        metrics.update(ppo_advantages(ro, kl_coef=beta, cfg=cfg, reduce_sum=reduce_sum))
        log.write(completion_records(step + 1, ro))
        ctx = update_context(cfg.rollout, cfg.train, cfg.update, step=step, pad_token_id=pad)
        metrics.update(ppo_update(run, model, critic, optimizer, scheduler, ro, cfg, ctx, beta=beta))
        ids = [s.id for s in ro.samples]
        check_finite(torch.tensor(metrics["train/loss"]), step=step + 1, sample_ids=ids, run_dir=run.run_dir)
        metrics["perf/update_s"] = time.perf_counter() - t_update
        metrics["perf/step_s"] = time.perf_counter() - t_start
        metrics = mean_over_processes(run, metrics)
        if "kl/seq" in metrics:
            controller.update(metrics["kl/seq"], ro.num_rows * run.num_processes)
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != steps:
            found, baseline = run_eval(
                run, policy, processor, suite, reference, step=done, scorer=scorer, baseline=baseline
            )
            metrics.update(found)
        tokens = sum(len(p) for p in ro.prompts.input_ids) + ro.num_tokens
        run.end_step(done, metrics, samples=ro.num_rows, tokens=tokens, extra_state={"kl_coef": controller.value})
    close_rollout_engines()  # before run.finish() ends the process group vLLM uses
    final, _ = run_eval(run, policy, processor, suite, reference, step=steps, scorer=scorer, baseline=baseline)
    if final:
        run.log(steps, final)
        shown = ("eval/chair", "eval/win_rate", "eval/kl", "eval/start/chair")
        run.print(f"held-out: { {k: round(v, 4) for k, v in final.items() if k.startswith(shown)} }")
    model_path = save_final_model(run, model, processor, cfg.save)
    save_critic(run, critic, processor, model_path)
    run.finish()
    return run_result(run.run_dir, final, model_path)
