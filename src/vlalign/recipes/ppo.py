"""``vlalign ppo``: actor-critic PPO with a vision-language critic (InstructGPT-style RLHF).

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
5. **update**: ``update.epochs`` passes of ``update.minibatches`` optimiser steps of the clipped
   surrogate plus ``critic.vf_coef`` times the clipped value loss
   (:func:`~vlalign.losses.value_loss`, token mean over the step's global token count), the value
   loss computed from the same forward's hidden states (shared critic) or from the critic's own
   forward (separate critic);
6. **KL control**: with ``ppo.kl_target > 0`` the adaptive controller of Ziegler et al.
   (:class:`~vlalign.losses.AdaptiveKLController`) moves β towards the target sequence KL; β is part
   of every checkpoint, so a resumed run continues with the β it had.

The critic (``critic.shared``): a value head on the policy's own backbone (one forward for policy
and value; the backbone learns from both losses), or a separate backbone with its own head,
initialised from ``critic.name_or_path`` (''= the policy's starting model; a ``vlalign rm``
folder gives its backbone and its reward head, as InstructGPT initialises the value function
from the reward model). Which is better depends on scale: sharing halves the compute, a
separate critic keeps the value loss from pulling on the policy's features.

Prompts per step: ``train.batch_size`` prompts per micro-batch times ``train.grad_accum`` times
processes; the learning-rate schedule counts optimiser steps (steps x epochs x minibatches).

Examples::

    vlalign rm --model.name_or_path=runs/sft/model ... --train.output_dir=runs/rm
    vlalign ppo --model.name_or_path=runs/sft/model --reward_model=runs/rm/model \\
                --ppo.tasks='[describe]' --train.output_dir=runs/ppo
    vlalign ppo --config examples/ppo_shapes.yaml
    vlalign ppo --critic.shared=false --critic.name_or_path=runs/rm/model ...  # separate critic from the RM
    vlalign ppo --train.output_dir=runs/ppo --resume   # continue exactly where it stopped
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlalign.data.collate import pad_token_id_of
from vlalign.data.schema import PromptSample
from vlalign.eval.suite import EvalResult, Suite, SuiteConfig, build_suite, evaluate
from vlalign.eval.tasks import filter_tasks, task_of
from vlalign.losses import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    gae,
    kl_penalized_token_rewards,
    masked_whiten,
    value_loss,
)
from vlalign.models.generate import GenerationSettings
from vlalign.models.heads import INFO_FILE, CriticModel, load_reward_model, new_head, save_head, token_scores
from vlalign.models.load import LoraSpec, load_model_and_processor, save_model_and_processor
from vlalign.models.logprobs import CompletionLogprobs
from vlalign.models.reference import AdapterDisabledReference, FrozenCopyReference, ReferencePolicy, make_reference
from vlalign.recipes.common import DataConfig, ModelConfig, load_policy, load_split, trained_weights_dtype
from vlalign.recipes.grpo import CompletionLog
from vlalign.recipes.rl_common import (
    PolicyUpdateConfig,
    Rollouts,
    build_rl_reward,
    global_masked_moments,
    mean_over_processes,
    policy_logprobs,
    reference_logprobs,
    require_reward_model,
    rollout,
    rollout_metrics,
    rollout_seed,
    score,
    token_kl,
)
from vlalign.recipes.rl_update import UpdateContext, update
from vlalign.rewards import RewardsConfig
from vlalign.training import BatchPlan, Run, TrainConfig, build_optimizer, build_scheduler, check_finite, total_steps


def _train_defaults() -> TrainConfig:
    return TrainConfig(
        output_dir="runs/ppo",
        lr=1e-5,
        batch_size=8,
        max_steps=100,
        warmup_ratio=0.0,
        schedule="constant",
        log_every=5,
        save_every=50,
    )


def _data_defaults() -> DataConfig:
    return DataConfig(train="shapes:train_prompts.jsonl", eval="")


def _rollout_defaults() -> GenerationSettings:
    return GenerationSettings(n=1, temperature=1.0, max_new_tokens=48, batch_size=32)


def _update_defaults() -> PolicyUpdateConfig:
    return PolicyUpdateConfig(epochs=2, kl_coef=0.05, kl_in="reward", kl_estimator="k1")


def _rewards_defaults() -> RewardsConfig:
    return RewardsConfig(weights={"reward_model": 1.0})


def _eval_defaults() -> SuiteConfig:
    return SuiteConfig(parts=("heldout",), describe=100, questions_per_task=0, kl_prompts=48, max_new_tokens=48)


@dataclass
class CriticConfig:
    """The value function."""

    shared: bool = True
    """A value head on the policy's backbone (one forward for both), or a separate critic model."""
    name_or_path: str = ""
    """Separate critic: its starting model ('' = the policy's); a `vlalign rm` folder gives its backbone and head."""
    use_lora: bool = False
    """Separate critic: train LoRA adapters (model.lora's settings) instead of every weight."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_clip: float = 0.2
    """Clip range of the value loss around the rollout's values (0: unclipped)."""
    lr: float = 0.0
    """Learning rate of the critic (value head, or separate critic); 0 uses train.lr."""
    head_dropout: float = 0.0
    """Dropout on the value head's input."""


@dataclass
class PPOSettings:
    """GAE, KL control and reward shaping."""

    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    whiten_advantages: bool = True
    """Whiten the advantages over the step's global batch (mean 0, variance 1)."""
    kl_target: float = 0.0
    """Adaptive KL controller: target sequence KL (nats); 0 keeps β = update.kl_coef fixed."""
    kl_horizon: int = 10000
    """Adaptive KL controller: horizon in samples (Ziegler et al.)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a completion cut by rollout.max_new_tokens (0: off)."""
    tasks: list[str] = field(default_factory=list)
    """Train only on prompts whose meta task is one of these (e.g. [describe]); [] keeps every prompt."""


@dataclass
class Config:
    """Actor-critic PPO with a vision-language critic."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (usually a supervised fine-tuned model)."""
    data: DataConfig = field(default_factory=_data_defaults)
    """Prompts (with the ground truth that verifiable rewards or a fact-augmented reward model read)."""
    train: TrainConfig = field(default_factory=_train_defaults)
    """The training loop (batch_size counts prompts; each brings rollout.n completions)."""
    rollout: GenerationSettings = field(default_factory=_rollout_defaults)
    """Sampling (temperature must be > 0)."""
    rewards: RewardsConfig = field(default_factory=_rewards_defaults)
    """Rewards and weights; 'reward_model' names the reward model of reward_model."""
    reward_model: str = ""
    """Folder of a reward model trained by `vlalign rm` (needed when rewards.weights names reward_model)."""
    reward_batch_size: int = 16
    """Prompts per reward-model forward."""
    update: PolicyUpdateConfig = field(default_factory=_update_defaults)
    """Clipped surrogate: epochs, minibatches, clip range, aggregation; kl_coef is β (initial β when adaptive)."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """The value function."""
    ppo: PPOSettings = field(default_factory=PPOSettings)
    """GAE, KL control, reward shaping, task filter."""
    eval: SuiteConfig = field(default_factory=_eval_defaults)
    """Held-out evaluation at the end (and every train.eval_every steps): CHAIR, task accuracy, KL from the
    start and the reward model's win rate over the starting model."""
    eval_tasks: list[str] = field(default_factory=lambda: ["describe"])
    """Held-out tasks evaluated ([] for no evaluation)."""
    log_completions: bool = True
    """Write every sampled completion with its score to <output_dir>/completions.jsonl (cut back to the
    checkpoint on resume)."""
    save: Literal["auto", "adapter", "merged", "full"] = "auto"
    """How the final policy is saved in <output_dir>/model (the value head beside it)."""


# ----------------------------------------------------------------------------- set-up


def check_config(cfg: Config) -> None:
    """Errors a run would otherwise meet late, named by their config keys."""
    if cfg.rollout.temperature <= 0:
        raise ValueError("rollout.temperature must be > 0 for PPO (the policy must be sampled)")
    if cfg.train.grad_accum % cfg.update.minibatches:
        raise ValueError(
            f"update.minibatches ({cfg.update.minibatches}) must divide train.grad_accum ({cfg.train.grad_accum})"
        )
    require_reward_model(cfg.rewards, cfg.reward_model)
    if cfg.ppo.kl_target < 0 or cfg.ppo.kl_horizon <= 0 or not 0 <= cfg.ppo.lam <= 1 or not 0 <= cfg.ppo.gamma <= 1:
        raise ValueError("ppo: need kl_target >= 0, kl_horizon > 0 and gamma, lam in [0, 1]")
    if cfg.ppo.kl_target > 0 and cfg.update.kl_coef <= 0:
        raise ValueError("ppo.kl_target > 0 adapts update.kl_coef: give it a positive starting value")
    if cfg.critic.vf_coef < 0 or cfg.critic.value_clip < 0:
        raise ValueError("critic.vf_coef and critic.value_clip must be >= 0")


def load_prompts(cfg: Config) -> list[PromptSample]:
    """The training prompts, filtered to ``ppo.tasks``."""
    samples = load_split(cfg.data.train, "prompt", cfg.data)
    return filter_tasks(samples, cfg.ppo.tasks, source=cfg.data.train, option="ppo.tasks")


def build_critic(cfg: Config, policy: nn.Module, processor: Any) -> nn.Module:
    """The value head (shared critic) or a :class:`CriticModel` (separate critic)."""
    if cfg.critic.shared:
        return new_head(policy, dropout=cfg.critic.head_dropout, seed=cfg.train.seed)
    source = cfg.critic.name_or_path
    lora = cfg.model.lora if cfg.critic.use_lora else None
    if source and (Path(source) / INFO_FILE).is_file():
        rm, critic_processor, _ = load_reward_model(
            source,
            device=cfg.model.device,
            trainable=True,
            dtype=trained_weights_dtype(cfg.model.dtype, lora=lora is not None),
        )
        backbone, head = rm.backbone, rm.head
        if lora is not None:
            from vlalign.models.load import apply_lora

            backbone = apply_lora(backbone, lora)
        head.requires_grad_(True)
    else:
        backbone, critic_processor = (
            load_policy(cfg.model, lora=cfg.critic.use_lora) if not source else _load_critic_backbone(source, cfg, lora)
        )
        head = new_head(backbone, dropout=cfg.critic.head_dropout, seed=cfg.train.seed)
    from vlalign.commands.eval import same_tokenizer

    if not same_tokenizer(processor, critic_processor):
        raise ValueError(
            f"critic.name_or_path {source!r} has another tokenizer than the policy; the critic reads the "
            "policy's tokens, so it must share the policy's tokenizer"
        )
    return CriticModel(backbone, head)


def _load_critic_backbone(source: str, cfg: Config, lora: LoraSpec | None) -> tuple[nn.Module, Any]:
    from vlalign.shapes.embedded import resolve_model

    return load_model_and_processor(
        resolve_model(source),
        device=cfg.model.device,
        dtype=trained_weights_dtype(cfg.model.dtype, lora=lora is not None),
        attn_implementation=cfg.model.attn_implementation or None,
        lora=lora,
    )


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


def build_reference(cfg: Config, model: nn.Module, pad_token_id: int) -> ReferencePolicy | None:
    """The reference policy, from the starting weights (build it before a checkpoint is loaded)."""
    if cfg.update.reference == "none":
        return None
    name = cfg.update.reference
    if name == "auto":
        name = "adapter" if hasattr(model, "disable_adapter") else "copy"
    return make_reference(name, model, pad_token_id=pad_token_id)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- phases of a step


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
) -> tuple[Tensor, Tensor]:
    """Old log-probs and values V(s_t) of the rollout, ``(R, L)`` each (CPU), in micro-batches of prompts.

    ``shared``: ``critic`` is a value head on the policy's hidden states, and one forward per
    micro-batch gives both; otherwise ``critic`` is a :class:`CriticModel` with its own forward.
    """
    logps, values = [], []
    for lo in range(0, len(ro), max(micro_batch, 1)):
        part = ro.select_groups(range(lo, min(lo + micro_batch, len(ro))))
        out = policy_logprobs(policy, part, temperature=temperature, pad_token_id=pad_token_id, return_hidden=shared)
        v = token_scores(critic, out) if shared else critic(part.prompts, part.token_ids, pad_token_id=pad_token_id)
        logps.append(_pad(out.logps.float().cpu(), ro.width))
        values.append(_pad(v.float().cpu(), ro.width))
    return torch.cat(logps), torch.cat(values)


def _pad(t: Tensor, width: int) -> Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], dim=1) if t.shape[1] < width else t


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


def value_term(critic: nn.Module, cfg: Config, pad_token_id: int):
    """The ``extra_loss`` hook of :func:`~vlalign.recipes.rl_update.update`: vf_coef times the clipped value
    loss, token mean over the optimiser step's global token count."""
    shared = cfg.critic.shared

    def extra(part: Rollouts, out: CompletionLogprobs, norms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if shared:
            values = token_scores(critic, out)
        else:
            values = critic(part.prompts, part.token_ids, pad_token_id=pad_token_id)
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

    return extra


def kl_controller(cfg: Config, value: float) -> AdaptiveKLController | FixedKLController:
    if cfg.ppo.kl_target > 0:
        return AdaptiveKLController(value, target=cfg.ppo.kl_target, horizon=cfg.ppo.kl_horizon)
    return FixedKLController(value)


# ----------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def starting_policy(reference: ReferencePolicy | None, policy: nn.Module) -> Iterator[nn.Module | None]:
    """The starting model: the frozen copy, or the policy with its adapter disabled (None without a reference)."""
    if isinstance(reference, FrozenCopyReference):
        yield reference.model
    elif isinstance(reference, AdapterDisabledReference):
        with policy.disable_adapter():
            yield policy
    else:
        yield None


def build_eval_suite(cfg: Config) -> Suite | None:
    if not cfg.eval.parts or not cfg.eval_tasks:
        return None
    suite = build_suite(cfg.eval)
    suite.heldout = [s for s in suite.heldout if task_of(s) in set(cfg.eval_tasks)]
    suite.compositional = [s for s in suite.compositional if task_of(s) in set(cfg.eval_tasks)]
    return suite if len(suite) else None


def run_eval(
    run: Run,
    policy: nn.Module,
    processor: Any,
    suite: Suite | None,
    reference: ReferencePolicy | None,
    scorer: Any,
    baseline: EvalResult | None,
) -> tuple[dict[str, float], EvalResult | None]:
    """Held-out metrics (main process): CHAIR, tasks, KL from the start (frozen-copy reference) and the
    win rate over the starting model under ``scorer``; returns them and the starting model's result."""
    out: dict[str, float] = {}
    if suite is not None and run.accelerator.is_main_process:
        if baseline is None and scorer is not None:
            with starting_policy(reference, policy) as start:
                baseline = evaluate(start, processor, suite) if start is not None else None
        ref_model = reference.model if isinstance(reference, FrozenCopyReference) else None
        result = evaluate(policy, processor, suite, reference=ref_model, baseline=baseline, scorer=scorer)
        out = {f"eval/{k}": v for k, v in result.metrics.items() if not k.endswith("_n")}
        if baseline is not None:
            out.update({f"eval/start/{k}": v for k, v in baseline.metrics.items() if k.startswith(("chair/", "task/"))})
    run.accelerator.wait_for_everyone()
    return out, baseline


# ----------------------------------------------------------------------------- the loop


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
) -> tuple[Rollouts, dict[str, Any]]:
    """Rollout, score, old log-probs, values and reference log-probs of the step's prompts."""
    ro = rollout(policy, processor, samples, settings=cfg.rollout, seed=rollout_seed(cfg.train.seed, step))
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
    ro.old_logps, ro.extras["values"] = rollout_values(
        policy,
        critic,
        ro,
        shared=cfg.critic.shared,
        temperature=cfg.rollout.temperature,
        pad_token_id=pad,
        micro_batch=cfg.train.batch_size,
    )
    if reference is not None and cfg.update.needs_reference:
        ro.ref_logps = reference_logprobs(
            reference, ro, temperature=cfg.rollout.temperature, micro_batch=cfg.train.batch_size
        )
    return ro, metrics


def _resumed_kl_coef(run: Run, default: float) -> float:
    if run.resume_from is None or run.start_step == 0:
        return default
    state = json.loads((Path(run.resume_from) / "state.json").read_text())
    return float(state.get("kl_coef", default))


def save_outputs(run: Run, policy: nn.Module, critic: nn.Module, processor: Any, cfg: Config) -> None:
    """The policy in <output_dir>/model with value_head.safetensors beside it (separate critic: <output_dir>/critic)."""
    if not run.accelerator.is_main_process:
        return
    out = save_model_and_processor(policy, processor, run.run_dir / "model", mode=cfg.save)
    critic = run.accelerator.unwrap_model(critic)
    if isinstance(critic, CriticModel):
        folder = save_model_and_processor(critic.backbone, processor, run.run_dir / "critic")
        save_head(critic.head, folder / "value_head.safetensors")
    else:
        save_head(critic, out / "value_head.safetensors")
    run.print(f"saved the policy to {out}")


def run(cfg: Config) -> dict[str, Any]:
    """Train with PPO, evaluate, save the policy and the critic; returns the final metrics."""
    check_config(cfg)
    run = Run(cfg.train, config=cfg, desc="ppo")
    model, processor = load_policy(cfg.model)
    pad = pad_token_id_of(processor)
    train_set = load_prompts(cfg)
    reward = build_rl_reward(
        cfg.rewards, cfg.reward_model, device=cfg.model.device, dtype=cfg.model.dtype, batch_size=cfg.reward_batch_size
    )
    critic = build_critic(cfg, model, processor)
    plan = BatchPlan(len(train_set), cfg.train.batch_size, cfg.train.grad_accum, run.num_processes, cfg.train.seed)
    steps = total_steps(cfg.train, plan)
    optimizer = build_optimizer_for(model, critic, cfg)
    scheduler = build_scheduler(optimizer, cfg.train, steps * cfg.update.epochs * cfg.update.minibatches)
    reference = build_reference(cfg, model, pad)  # from the starting weights, before a checkpoint loads
    modules, optimizer = run.prepare({"model": model, "critic": critic}, optimizer, scheduler, total=steps)
    model, critic = modules["model"], modules["critic"]
    policy = run.accelerator.unwrap_model(model)
    controller = kl_controller(cfg, _resumed_kl_coef(run, cfg.update.kl_coef))
    model.train()
    critic.train()
    suite = build_eval_suite(cfg)
    scorer = reward.scorers.get("reward_model")
    baseline: EvalResult | None = None
    run.print(
        f"ppo: {len(train_set)} prompts, {steps} steps of {plan.global_batch} prompts x {cfg.rollout.n}; "
        f"critic {'shared' if cfg.critic.shared else 'separate'}"
    )
    log = CompletionLog(
        run.run_dir / "completions.jsonl",
        start_step=run.start_step,
        enabled=cfg.log_completions and run.accelerator.is_main_process,
    )
    reduce_sum = lambda t: run.accelerator.reduce(t.to(run.device), "sum").cpu()  # noqa: E731
    params = lambda: itertools.chain(model.parameters(), critic.parameters())  # noqa: E731

    for step in range(run.start_step, steps):
        t_start = time.perf_counter()
        samples = [train_set[i] for mb in plan.micro_batches(step, run.process_index) for i in mb]
        with run.accelerator.autocast():  # the precision the update computes its log-probs and values in
            ro, metrics = collect(
                run,
                policy,
                run.accelerator.unwrap_model(critic),
                processor,
                reward,
                reference,
                samples,
                step,
                cfg,
                pad=pad,
            )
        t_update = time.perf_counter()
        beta = controller.value
        metrics.update(ppo_advantages(ro, kl_coef=beta, cfg=cfg, reduce_sum=reduce_sum))
        log.write(step + 1, ro)
        loss_cfg = replace(cfg.update, kl_coef=beta if cfg.update.kl_in == "loss" else 0.0)
        ctx = UpdateContext(
            temperature=cfg.rollout.temperature,
            pad_token_id=pad,
            micro_batches=cfg.train.grad_accum,
            norm_length=cfg.update.norm_length or cfg.rollout.max_new_tokens,
            seed=cfg.train.seed,
            step=step,
        )
        metrics.update(
            update(
                run,
                model,
                optimizer,
                scheduler,
                ro,
                loss_cfg,
                ctx,
                return_hidden=cfg.critic.shared,
                extra_loss=value_term(critic, cfg, pad),
                parameters=params,
            )
        )
        check_finite(
            torch.tensor(metrics["train/loss"]),
            step=step + 1,
            sample_ids=[s.id for s in ro.samples],
            run_dir=run.run_dir,
        )
        metrics["perf/update_s"] = time.perf_counter() - t_update
        metrics["perf/step_s"] = time.perf_counter() - t_start
        metrics = mean_over_processes(run, metrics)
        if "kl/seq" in metrics:
            controller.update(metrics["kl/seq"], ro.num_rows * run.num_processes)
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != steps:
            found, baseline = run_eval(run, policy, processor, suite, reference, scorer, baseline)
            metrics.update(found)
        tokens = sum(len(p) for p in ro.prompts.input_ids) + ro.num_tokens
        run.end_step(done, metrics, samples=ro.num_rows, tokens=tokens, extra_state={"kl_coef": controller.value})

    final, _ = run_eval(run, policy, processor, suite, reference, scorer, baseline)
    if final:
        run.log(steps, final)
        shown = {
            k: round(v, 4)
            for k, v in final.items()
            if k.startswith(("eval/chair", "eval/win_rate", "eval/kl", "eval/start/chair"))
        }
        run.print(f"held-out: {shown}")
    save_outputs(run, policy, critic, processor, cfg)
    run.finish()
    return final
