"""``vlalign grpo``: group-relative policy optimisation and its relatives on verifiable (or learned) rewards.

Where the defaults depart from DeepSeekMath's GRPO (Shao et al., arXiv 2402.03300) and from TRL's
``GRPOTrainer`` (``GRPOConfig`` defaults as read in TRL 1.10's source)::

    setting        vlalign default                    DeepSeekMath GRPO             TRL GRPOConfig
    aggregation    token-mean over the optimiser      seq-mean-token-mean           loss_type="dapo" (the same
                   step's tokens, all processes       (1/G sum_i 1/|o_i| sum_t)     global token mean)
    KL             none: update.kl_coef=0 (k3 to      in the loss, k3, beta=0.04    beta=0.0 (none)
                   the reference logged when the
                   evaluation keeps one)
    advantage eps  std + 1e-6 (Bessel std)            std, no eps written           std + 1e-4 (Bessel std)
    clipping       ratio in [1-0.2, 1+0.2]; one       one update per exploration    epsilon=0.2, epsilon_high
                   update per batch (ratio = 1)       stage (ratio = 1)             = epsilon, num_iterations=1
    group size     rollout.n=8                        G=64                          num_generations=8

One recipe, one ``advantage`` setting:

=========================  ===========================================================================
advantage                  estimator (the math is in :mod:`vlalign.losses.advantages`)
=========================  ===========================================================================
``grpo``                   (r_i - mean(r_group)) / (std(r_group) + eps)  (DeepSeekMath)
``dr_grpo``                r_i - mean(r_group); pair with ``update.aggregation=seq-mean-token-sum-norm``
``rloo``                   r_i - mean of the other G - 1 rewards of the group (Ahmadian et al.)
``reinforce_pp``           discounted per-token returns, KL folded in per token, whitened over the batch
``reinforce_pp_baseline``  the same after subtracting each group's mean outcome
=========================  ===========================================================================

Each step (the phases of :mod:`vlalign.recipes.rl_common`): take the step's prompts; sample G
completions per prompt (each prompt and image processed once, for generation and for log-probs);
score them with the configured rewards; optionally drop groups whose rewards are all equal
(DAPO's dynamic sampling, refilling the batch from fresh prompts for ``grpo.resample_rounds``
rounds) and add DAPO's overlong shaping; compute old log-probs once (skipped when the update is
on-policy: one epoch, one minibatch), reference log-probs when a KL is used or logged; compute
advantages; then ``update.epochs`` passes of ``update.minibatches`` clipped-surrogate optimiser
steps with the chosen aggregation, clip range (DAPO's clip-higher: ``update.clip_high=0.28``)
and KL placement.

Prompts per step: ``train.batch_size`` prompts per micro-batch (each with its G completions) times
``train.grad_accum`` micro-batches times processes; the learning-rate schedule counts optimiser
steps (steps x epochs x minibatches).

Examples::

    vlalign grpo --model.name_or_path=runs/sft/model --rewards.weights='{count_match: 1.0}' \\
                 --grpo.tasks='[counting]' --train.output_dir=runs/grpo
    vlalign grpo --config examples/grpo_counting.yaml
    vlalign grpo --advantage=rloo --update.kl_coef=0.02 --update.kl_in=reward ...
    vlalign grpo --reward_model=runs/rm/model --rewards.weights='{reward_model: 1.0}' --grpo.tasks='[describe]' ...
    vlalign grpo --train.output_dir=runs/grpo --resume    # continue exactly where it stopped
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from vlalign.config import ConfigError, StrictFields
from vlalign.data.collate import pad_token_id_of
from vlalign.data.schema import PromptSample
from vlalign.eval.suite import SuiteConfig
from vlalign.eval.tasks import filter_tasks
from vlalign.losses import dapo_group_filter
from vlalign.models.generate import GenerationSettings
from vlalign.models.packing import TokenSlots
from vlalign.models.reference import ReferencePolicy
from vlalign.recipes.common import (
    DataConfig,
    ModelConfig,
    guard_distributed,
    load_policy,
    load_split,
    save_final_model,
)
from vlalign.recipes.result import RunResult, run_result
from vlalign.recipes.rl_common import (
    AdvantageName,
    PolicyUpdateConfig,
    advantages,
    completion_records,
    global_masked_moments,
    old_logprobs,
    overlong_shaping,
    reference_logprobs,
    require_reward_model,
    rollout_metrics,
    run_eval,
    score,
    token_kl,
)
from vlalign.recipes.rl_defaults import checked_reward, suite_and_reference
from vlalign.recipes.rl_update import update, update_context, update_token_fraction
from vlalign.recipes.rollouts import (
    RolloutEngine,
    Rollouts,
    check_rollout_engine,
    close_rollout_engines,
    rollout,
    rollout_engine,
    rollout_seed,
)
from vlalign.rewards import RewardsConfig, RewardScores
from vlalign.training import (
    BatchPlan,
    Run,
    StepRecords,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    check_finite,
    mean_over_processes,
    total_steps,
)
from vlalign.training.distributed import whole_weights
from vlalign.training.options import check_options, validate_config


def _train_defaults() -> TrainConfig:
    return TrainConfig(
        output_dir="runs/grpo",
        lr=1e-5,
        batch_size=8,
        grad_accum=1,
        max_steps=100,
        warmup_ratio=0.0,
        schedule="constant",
        log_every=5,
        save_every=50,
    )


def _rollout_defaults() -> GenerationSettings:
    return GenerationSettings(n=8, temperature=1.0, max_new_tokens=32, batch_size=32)


def _data_defaults() -> DataConfig:
    return DataConfig(train="shapes:train_prompts.jsonl", eval="auto")


def _eval_defaults() -> SuiteConfig:
    return SuiteConfig(parts=("heldout",), questions_per_task=0, kl_prompts=64, max_new_tokens=16)


@dataclass
class GRPOSettings(StrictFields):
    """Options of the GRPO family beyond the policy update."""

    tasks: list[str] = field(default_factory=list)
    """Train only on prompts whose meta task is one of these (e.g. [counting]); [] keeps every prompt."""
    eps: float = 1e-6
    """grpo: added to the group's reward std before dividing."""
    gamma: float = 1.0
    """reinforce_pp: discount of the per-token returns."""
    filter_groups: bool = False
    """DAPO's dynamic sampling: drop groups whose G rewards are all equal (they carry no gradient)."""
    resample_rounds: int = 0
    """With filter_groups: up to this many extra rollout rounds on fresh (seeded) prompts to refill the batch."""
    overlong_buffer: int = 0
    """DAPO's overlong shaping: the last this-many tokens before rollout.max_new_tokens are penalised
    linearly down to -overlong_factor (0: off)."""
    overlong_factor: float = 1.0
    """Largest overlong penalty."""

    def validate(self, prefix: str = "grpo") -> None:
        """Refuse unusable values (called by :class:`~vlalign.training.Run` before the model loads)."""
        check_options(
            prefix,
            [
                ("eps", self.eps >= 0, "must be >= 0"),
                ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
                ("resample_rounds", self.resample_rounds >= 0, "must be >= 0"),
                ("overlong_buffer", self.overlong_buffer >= 0, "must be >= 0 (0: off)"),
                ("overlong_factor", self.overlong_factor >= 0, "must be >= 0"),
            ],
            values=self,
        )


@dataclass
class Config(StrictFields):
    """GRPO, Dr.GRPO, RLOO and REINFORCE++ on prompts with verifiable rewards and / or a reward model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (usually a supervised fine-tuned model)."""
    data: DataConfig = field(default_factory=_data_defaults)
    """Prompts: rows with a prompt, images and the ground truth the rewards read (e.g. answer, task).
    data.eval picks the held-out evaluation: auto (the eval suite when data.train is a shapes world,
    else none), '' (none), or a prompts file / shapes: to evaluate on."""
    train: TrainConfig = field(default_factory=_train_defaults)
    """The training loop (batch_size counts prompts; each brings rollout.n completions)."""
    rollout: GenerationSettings = field(default_factory=_rollout_defaults)
    """Sampling: n is G (completions per prompt); temperature must be > 0."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """Reward functions and weights; 'reward_model' names the reward model of reward_model."""
    reward_model: str = ""
    """Folder of a reward model trained by `vlalign rm` (needed when rewards.weights names reward_model)."""
    reward_batch_size: int = 16
    """Prompts per reward-model forward."""
    advantage: AdvantageName = "grpo"
    """Advantage estimator: grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline."""
    update: PolicyUpdateConfig = field(default_factory=PolicyUpdateConfig)
    """Clipped-surrogate update: epochs, minibatches, clip range, aggregation, KL."""
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    """Task filter, group filtering, overlong shaping, estimator options."""
    eval: SuiteConfig = field(default_factory=_eval_defaults)
    """Held-out evaluation (every train.eval_every steps and at the end): task accuracy and KL from the start."""
    eval_tasks: list[str] = field(default_factory=lambda: ["counting", "colour", "existence"])
    """Held-out tasks to evaluate (descriptions are left out unless 'describe' is listed)."""
    eval_before: bool = False
    """Also evaluate the starting model before the first step (logged at step 0)."""
    log_completions: bool = True
    """Write the main process's sampled completions, rewards and advantages of every step to
    <output_dir>/completions.jsonl (cut back to the checkpoint on resume)."""
    save: Literal["auto", "adapter", "merged", "full"] = "auto"
    """How the final model is saved in <output_dir>/model: auto (adapter with LoRA, else full), adapter, merged,
    full."""


# ----------------------------------------------------------------------------- set-up


def check_config(cfg: Config) -> None:
    """Errors a run would otherwise meet late, named by their config keys (no model or data is read): each
    section's own rules (its ``validate``; a reward model may load before :class:`Run` checks them), then
    the rules that span sections."""
    validate_config(cfg, cfg.train)
    if cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0 for RL (greedy decoding gives G equal completions)")
    if cfg.rollout.n < 1:
        raise ConfigError(f"rollout.n (completions per prompt) must be >= 1, got {cfg.rollout.n}")
    if cfg.rollout.n < 2 and cfg.advantage in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        raise ConfigError(f"advantage {cfg.advantage!r} compares completions of a group: set rollout.n >= 2")
    if cfg.train.grad_accum % cfg.update.minibatches:
        raise ConfigError(
            f"update.minibatches ({cfg.update.minibatches}) must divide train.grad_accum ({cfg.train.grad_accum})"
        )
    if cfg.grpo.overlong_buffer > cfg.rollout.max_new_tokens:
        raise ConfigError(f"grpo.overlong_buffer must be in [0, rollout.max_new_tokens={cfg.rollout.max_new_tokens}]")
    try:
        require_reward_model(cfg.rewards, cfg.reward_model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_prompts(cfg: Config) -> list[PromptSample]:
    """The training prompts, filtered to ``grpo.tasks``."""
    samples = load_split(cfg.data.train, "prompt", cfg.data)
    return filter_tasks(samples, cfg.grpo.tasks, source=cfg.data.train, option="grpo.tasks")


# ----------------------------------------------------------------------------- phases of a step


def step_prompts(
    train_set: list[PromptSample], plan: BatchPlan, step: int, round_: int, *, seed: int, process_index: int
) -> list[PromptSample]:
    """Round 0: this process's prompts of the step (the batch plan); later rounds: as many fresh prompts
    drawn by ``(seed, step, round, process)`` (a pure function, so a resumed run draws the same)."""
    if round_ == 0:
        return [train_set[i] for mb in plan.micro_batches(step, process_index) for i in mb]
    count = plan.batch_size * plan.grad_accum
    rng = np.random.default_rng([seed, step, round_, process_index])
    return [train_set[i] for i in rng.choice(len(train_set), size=count, replace=len(train_set) < count)]


def collect(
    run: Run,
    policy: nn.Module,
    processor: Any,
    reward: Any,
    train_set: list[PromptSample],
    plan: BatchPlan,
    step: int,
    cfg: Config,
    engine: RolloutEngine | None = None,
) -> tuple[Rollouts, dict[str, Any]]:
    """Rollout and score the step's prompts (refilling filtered groups if configured); returns the
    rollouts to train on and the metrics of the step's own prompts (round 0). ``engine``: the vLLM
    rollout engine (rollout.engine = vllm), else the policy generates."""
    target = plan.batch_size * plan.grad_accum
    rounds = 1 + (cfg.grpo.resample_rounds if cfg.grpo.filter_groups else 0)
    kept: list[Rollouts] = []
    metrics: dict[str, Any] = {}
    for round_ in range(rounds):
        samples = step_prompts(train_set, plan, step, round_, seed=cfg.train.seed, process_index=run.process_index)
        seed = rollout_seed(cfg.train.seed, step, round_)
        ro = rollout(policy, processor, samples, settings=cfg.rollout, seed=seed, engine=engine)
        t0 = time.perf_counter()
        scores = score(ro, reward, step=step + 1)
        ro.rewards = scores.total.to(torch.float32)
        if cfg.grpo.overlong_buffer > 0:
            ro.rewards = ro.rewards + overlong_shaping(
                ro,
                max_length=cfg.rollout.max_new_tokens,
                buffer=cfg.grpo.overlong_buffer,
                factor=cfg.grpo.overlong_factor,
            )
        if round_ == 0:
            metrics.update(_first_round_metrics(ro, scores, time.perf_counter() - t0))
        if cfg.grpo.filter_groups:
            keep = dapo_group_filter(ro.rewards, group_size=ro.group_size).nonzero().squeeze(-1).tolist()
            ro = ro.select_groups(keep)
            metrics[f"groups/kept_round{round_}"] = len(keep) / len(samples)
        kept.append(ro)
        if sum(len(k) for k in kept) >= target:
            break
    batch = Rollouts.concat(kept)
    if len(batch) > target:
        batch = batch.select_groups(range(target))
    metrics["groups/trained_frac"] = len(batch) / target
    metrics["perf/rollout_rounds"] = len(kept)
    return batch, metrics


def _first_round_metrics(ro: Rollouts, scores: RewardScores, score_s: float) -> dict[str, Any]:
    out: dict[str, Any] = dict(rollout_metrics(ro, scores))
    out["perf/rollout_s"] = ro.seconds
    out["perf/score_s"] = score_s
    out["perf/gen_tokens_per_s"] = ro.num_tokens / max(ro.seconds, 1e-9)
    return out


def prepare_update(
    policy: nn.Module,
    reference: ReferencePolicy | None,
    ro: Rollouts,
    cfg: Config,
    *,
    pad_token_id: int,
    reduce_sum: Any,
) -> dict[str, Any]:
    """Old and reference log-probs, the KL penalty if it goes in the reward, and the advantages."""
    up, temp = cfg.update, cfg.rollout.temperature
    metrics: dict[str, Any] = {}
    if len(ro) == 0:  # every group filtered out on this process: nothing to train on
        ro.advantages = torch.zeros(0)
        if cfg.advantage.startswith("reinforce_pp"):  # still take part in the global whitening's all-reduces
            global_masked_moments(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool), reduce_sum=reduce_sum)
        return metrics
    kl_in_reward = up.kl_coef > 0 and up.kl_in == "reward"
    slots, layout = TokenSlots(), {"micro_batch": cfg.train.batch_size, "pack_length": up.logprob_pack_length}
    if not up.on_policy or kl_in_reward:
        ro.old_logps = old_logprobs(policy, ro, temperature=temp, pad_token_id=pad_token_id, slots=slots, **layout)
    if reference is not None and up.needs_reference:
        ro.ref_logps = reference_logprobs(reference, ro, temperature=temp, slots=slots, **layout)
    if slots.slots:  # the scoring forwards (old and reference log-probs), packed like the update's
        metrics["perf/useful_token_fraction_scoring"] = slots.fraction()
    rewards, kl = ro.rewards, None
    if kl_in_reward:
        kl = token_kl(ro.old_logps, ro.ref_logps, ro.mask, estimator=up.kl_estimator)  # type: ignore[arg-type]
        seq_kl = kl.sum(-1)  # (R,)
        metrics["kl/ref_seq_in_reward"] = seq_kl.mean()
        if cfg.advantage not in ("reinforce_pp", "reinforce_pp_baseline"):
            rewards = rewards - up.kl_coef * seq_kl  # type: ignore[operator]
    ro.advantages = advantages(
        cfg.advantage,
        rewards,
        group_size=ro.group_size,
        mask=ro.mask,  # type: ignore[arg-type]
        kl=kl,
        kl_coef=up.kl_coef,
        gamma=cfg.grpo.gamma,
        eps=cfg.grpo.eps,
        reduce_sum=reduce_sum,
    )
    adv = ro.advantages if ro.advantages.ndim == 2 else ro.advantages[:, None].expand(-1, ro.width)
    metrics["advantages/abs_mean"] = adv.abs()[ro.mask].mean()  # over completion tokens
    return metrics


# ----------------------------------------------------------------------------- the loop


def run(cfg: Config) -> RunResult:
    """Train with the configured estimator, evaluate, save the model; returns the run's folder, model and
    numbers. The prompts are read and every reward is called once on them before the policy loads."""
    check_config(cfg)
    check_rollout_engine(cfg.rollout, cfg.model)
    train_set = load_prompts(cfg)
    reward = checked_reward(cfg, train_set)
    run = Run(cfg.train, config=cfg, desc=f"grpo[{cfg.advantage}]")
    per_step = cfg.train.grad_accum // cfg.update.minibatches  # micro-batches per optimiser step
    model, processor = load_policy(
        guard_distributed(run, cfg.model, micro_batches_per_step=per_step, hint="train.grad_accum = update.minibatches")
    )
    pad = pad_token_id_of(processor)
    plan = BatchPlan(len(train_set), cfg.train.batch_size, cfg.train.grad_accum, run.num_processes, cfg.train.seed)
    steps = total_steps(cfg.train, plan)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps * cfg.update.epochs * cfg.update.minibatches)
    suite, reference = suite_and_reference(cfg, model, pad)  # from the starting weights, before a checkpoint
    modules, optimizer = run.prepare({"model": model}, optimizer, scheduler, total=steps, processor=processor)
    model = modules["model"]
    policy = run.accelerator.unwrap_model(model)
    engine = rollout_engine(cfg.rollout, cfg.model, processor, policy)
    model.train()
    run.print(
        f"grpo[{cfg.advantage}]: {len(train_set)} prompts, {steps} steps of {plan.global_batch} prompts x "
        f"{cfg.rollout.n} completions"
    )
    if cfg.eval_before and run.start_step == 0:  # no KL: the policy is the reference here
        run.log(0, run_eval(run, policy, processor, suite, None, step=0)[0])
    log = StepRecords(
        run.run_dir / "completions.jsonl",
        start_step=run.start_step,
        enabled=cfg.log_completions and run.accelerator.is_main_process,
    )
    reduce_sum = lambda t: run.accelerator.reduce(t.to(run.device), "sum").cpu()

    for step in range(run.start_step, steps):
        t_start = time.perf_counter()
        # autocast: the precision the update computes its log-probs in; whole_weights: a sharded
        # policy decodes with local forwards (processes stop after different numbers of tokens)
        with run.accelerator.autocast(), whole_weights(policy):
            ro, metrics = collect(run, policy, processor, reward, train_set, plan, step, cfg, engine)
            t_update = time.perf_counter()
            metrics.update(prepare_update(policy, reference, ro, cfg, pad_token_id=pad, reduce_sum=reduce_sum))
        ctx = update_context(cfg.rollout, cfg.train, cfg.update, step=step, pad_token_id=pad)
        metrics["perf/useful_token_fraction"] = update_token_fraction(ro, cfg.update, ctx)  # the update's forwards
        metrics.update(update(run, model, optimizer, scheduler, ro, cfg.update, ctx))
        log.write(completion_records(step + 1, ro))
        check_finite(
            torch.tensor(metrics["train/loss"]),
            step=step + 1,
            sample_ids=[s.id for s in ro.samples],
            run_dir=run.run_dir,
        )
        metrics["perf/update_s"] = time.perf_counter() - t_update
        metrics["perf/step_s"] = time.perf_counter() - t_start
        metrics = mean_over_processes(run, metrics)
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != steps:
            metrics.update(run_eval(run, policy, processor, suite, reference, step=done)[0])
        prompt_tokens = sum(len(p) for p in ro.prompts.input_ids)
        run.end_step(done, metrics, samples=ro.num_rows, tokens=prompt_tokens + ro.num_tokens)

    close_rollout_engines()  # before run.finish() ends the process group vLLM uses
    final, _ = run_eval(run, policy, processor, suite, reference, step=steps)
    if final:
        run.log(steps, final)
        shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("eval/task", "eval/kl"))}
        run.print(f"held-out: {shown}")
    model_path = save_final_model(run, model, processor, cfg.save)
    run.finish()
    return run_result(run.run_dir, final, model_path)
