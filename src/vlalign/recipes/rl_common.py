"""The phases every on-policy RL recipe shares: rollout -> score -> advantages -> update.

``vlalign grpo`` (GRPO, Dr.GRPO, RLOO, REINFORCE++) and ``vlalign ppo`` are written out as loops
over these phases; each phase is a function of tens of lines, and the math stays in
:mod:`vlalign.losses` (this module only feeds it tensors and reduces them with global normalisers).

A step, in order::

    ro = rollout(policy, processor, samples, settings=gen, seed=rollout_seed(seed, step))  # rollouts.py
    scores = score(ro, reward, step=step)             # RewardScores: total + per function
    ro.rewards = scores.total                         # (+ overlong_shaping(...), - KL if in the reward)
    ro.old_logps = old_logprobs(policy, ro, ...)      # None when the update is fully on-policy
    ro.ref_logps = reference_logprobs(reference, ro, ...)
    ro.advantages = advantages(...)                   # (R,) outcome or (R, L) token advantages
    metrics = update(run, model, optimizer, scheduler, ro, cfg.update, ...)   # vlalign.recipes.rl_update

The batch, :class:`~vlalign.recipes.rollouts.Rollouts`, and the rollout phase live in
:mod:`vlalign.recipes.rollouts`; the clipped-surrogate update in :mod:`vlalign.recipes.rl_update`.

Exact resume. Sampling is seeded by :func:`~vlalign.recipes.rollouts.rollout_seed` ``(seed, step,
round)`` and the minibatch shuffles by ``(seed, step, epoch)``, so a resumed run samples the same
completions and visits them in the same order as an uninterrupted one; nothing random is drawn
from global RNGs.

Data parallelism. Each process rolls out and scores its own prompts. Normalisers (token and
sequence counts of each optimiser step) and whitening statistics are summed over processes
before any backward pass, so gradients equal those of one process holding the global batch.
A process with nothing left to train on (every group filtered out) still runs a zero-loss
backward for each micro-batch, keeping DDP's collective calls in step.

``vlalign ppo`` reuses :class:`~vlalign.recipes.rollouts.Rollouts` (``extras`` carries old values
and returns), these phases and the shared pieces of the update (its own loop adds the value loss).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlalign.config import ConfigError, StrictFields
from vlalign.data.schema import PromptSample
from vlalign.eval.suite import EvalResult, Suite, evaluate
from vlalign.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    dr_grpo_advantages,
    kl_penalized_token_rewards,
    overlong_reward_penalty,
    reinforce_pp_advantages,
)
from vlalign.models.logprobs import CompletionLogprobs, completion_logprobs
from vlalign.models.packing import TokenSlots
from vlalign.models.reference import (
    AdapterDisabledReference,
    FrozenCopyReference,
    ReferencePolicy,
    make_reference,
)
from vlalign.recipes.rollouts import Rollouts, pad_width
from vlalign.rewards import CombinedReward, RewardError, RewardsConfig, RewardScores, build_reward_from_config
from vlalign.rewards.model import load_reward_scorer
from vlalign.training import Run
from vlalign.training.options import check_options
from vlalign.training.trackers import log_samples, samples_from_records

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AdvantageName = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
ADVANTAGES: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
"""Advantage estimators a recipe can name: the outcome estimators of :data:`vlalign.losses.ADVANTAGE_ESTIMATORS`
and REINFORCE++ (plain, or "baseline": group mean subtracted from the outcome first)."""


# ----------------------------------------------------------------------------- config


@dataclass
class PolicyUpdateConfig(StrictFields):
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
    rollout_is_cap: float = 0.0
    """Truncated importance sampling for the rollout engine / trainer mismatch (verl's and TRL's TIS):
    with rollout.engine = vllm, each token's loss is multiplied by min(pi_old / pi_engine, cap), pi_engine
    the engine's reported log-prob (:func:`vlalign.losses.truncated_is_weights`); 0 = off (2 is usual)."""
    reference: Literal["auto", "copy", "adapter", "none"] = "auto"
    """Reference policy, the starting model: auto (the adapter-disabled model with LoRA, else a frozen copy),
    copy, adapter, or none (then kl_coef must be 0 and no KL is logged). A frozen copy also gives the
    held-out KL from the start in evaluations."""
    log_kl: Literal["auto", "true", "false"] = "auto"
    """Log the KL to the reference every step when kl_coef is 0: auto (when the run has a reference anyway,
    because the held-out evaluation measures the KL from the start), true (always; keeps a reference and
    runs one reference forward per step) or false."""
    logprob_pack_length: int = 0
    """Every log-prob forward of a step (the update's, and the old-policy, reference and PPO's critic
    passes) packs consecutive prompts, each with its group of completions, into rows of at most this many
    tokens (block-diagonal attention, positions restarted per prompt; a group longer than this gets a row
    of its own): less padding, the same numbers; 0 = one prompt per row (off). perf/useful_token_fraction
    reports the update's layout, perf/useful_token_fraction_scoring that of the other passes."""

    def __post_init__(self) -> None:
        self.validate("update")

    def validate(self, prefix: str = "update") -> None:
        """Refuse unusable values (:class:`~vlalign.config.ConfigError` naming the option); called when
        the section is made and by :class:`~vlalign.training.Run` before the model loads."""
        check_options(
            prefix,
            [
                ("epochs", self.epochs >= 1, "must be >= 1"),
                ("minibatches", self.minibatches >= 1, "must be >= 1"),
                ("clip_low", self.clip_low >= 0, "must be >= 0"),
                ("clip_high", self.clip_high >= 0, "must be >= 0"),
                ("dual_clip", self.dual_clip == 0 or self.dual_clip > 1, "must be 0 (off) or > 1"),
                ("norm_length", self.norm_length >= 0, "must be >= 0 (0: the rollout's max_new_tokens)"),
                ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
                ("entropy_coef", self.entropy_coef >= 0, "must be >= 0"),
                ("rollout_is_cap", self.rollout_is_cap >= 0, "must be >= 0 (0: off)"),
                ("logprob_pack_length", self.logprob_pack_length >= 0, "must be >= 0 (0: off)"),
            ],
            values=self,
        )
        if self.kl_coef > 0 and self.reference == "none":
            raise ConfigError(
                f"{prefix}.kl_coef > 0 needs a reference policy; set {prefix}.reference to auto, copy or adapter"
            )

    @property
    def on_policy(self) -> bool:
        """One optimiser step per rollout batch: the rollout policy is the policy of every forward."""
        return self.epochs == 1 and self.minibatches == 1

    @property
    def needs_reference(self) -> bool:
        return self.reference != "none" and (self.kl_coef > 0 or str(self.log_kl).lower() != "false")


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
    return overlong_reward_penalty(
        rollouts.lengths.to(torch.float32), max_length=max_length, cache_length=buffer, penalty_factor=factor
    )


# ----------------------------------------------------------------------------- phase 3: log-probs


def policy_logprobs(
    model: nn.Module,
    rollouts: Rollouts,
    *,
    temperature: float,
    pad_token_id: int,
    return_entropy: bool = False,
    return_hidden: bool = False,
    pack_length: int | None = None,
) -> CompletionLogprobs:
    """Per-token log-probs of the sampled completions under ``model`` at the sampling temperature
    (gradients flow; wrap in ``torch.no_grad()`` for old log-probs). Rows are in rollout order.
    ``pack_length``: several prompts with their completions per row of at most that many tokens
    (``completion_logprobs``'s packing; ``None`` or 0: one prompt per row)."""
    return completion_logprobs(
        model,
        rollouts.prompts,
        rollouts.token_ids,
        temperature=temperature,
        pad_token_id=pad_token_id,
        return_entropy=return_entropy,
        return_hidden=return_hidden,
        pack_length=pack_length or None,
    )


def _by_micro_batch(
    rollouts: Rollouts,
    micro_batch: int,
    forward: Callable[[Rollouts], CompletionLogprobs],
    slots: TokenSlots | None = None,
) -> Tensor:
    """``(R, L)`` float32 CPU log-probs of the rollouts, ``forward`` called on ``micro_batch`` prompts at a time
    (each forward counted in ``slots`` when given)."""
    parts = []
    for lo in range(0, len(rollouts), max(micro_batch, 1)):
        part = rollouts.select_groups(range(lo, min(lo + micro_batch, len(rollouts))))
        out = forward(part)
        if slots is not None:
            slots.add(out.num_tokens, out.num_slots)
        parts.append(pad_width(out.logps.detach().float().cpu(), rollouts.width))
    return torch.cat(parts) if parts else torch.zeros(0, rollouts.width)


@torch.no_grad()
def old_logprobs(
    model: nn.Module,
    rollouts: Rollouts,
    *,
    temperature: float,
    pad_token_id: int,
    micro_batch: int,
    pack_length: int = 0,
    slots: TokenSlots | None = None,
) -> Tensor:
    """``(R, L)`` log-probs under the rollout policy (the policy before any update of this step), computed
    once per rollout batch in micro-batches of ``micro_batch`` prompts, packed as the update packs its
    forwards (``pack_length``, 0: one prompt per row); ``slots`` counts the forwards' tokens and slots."""
    return _by_micro_batch(
        rollouts,
        micro_batch,
        lambda part: policy_logprobs(
            model, part, temperature=temperature, pad_token_id=pad_token_id, pack_length=pack_length
        ),
        slots,
    )


def reference_logprobs(
    reference: ReferencePolicy,
    rollouts: Rollouts,
    *,
    temperature: float,
    micro_batch: int,
    pack_length: int = 0,
    slots: TokenSlots | None = None,
) -> Tensor:
    """``(R, L)`` log-probs under the reference policy (no gradient), in micro-batches of prompts, packed by
    ``pack_length`` as :func:`old_logprobs`; ``slots`` counts the forwards' tokens and slots."""
    return _by_micro_batch(
        rollouts,
        micro_batch,
        lambda part: reference.logprobs(
            part.prompts, part.token_ids, temperature=temperature, pack_length=pack_length or None
        ),
        slots,
    )


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
    adv, _ = reinforce_pp_advantages(  # the returns are whitened with the statistics of the global batch
        token_rewards,
        mask,
        gamma=gamma,
        moments=lambda returns, valid: global_masked_moments(returns, valid, reduce_sum=reduce_sum),
    )
    return adv


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


def completion_records(step: int, rollouts: Rollouts) -> Iterator[dict[str, Any]]:
    """One record per prompt of a step for ``completions.jsonl`` (:class:`vlalign.training.StepRecords`):
    the sampled completions, their rewards and (outcome estimators) their advantages."""
    g = rollouts.group_size
    rewards = rollouts.rewards.tolist() if rollouts.rewards is not None else [None] * rollouts.num_rows
    adv = rollouts.advantages if rollouts.advantages is not None and rollouts.advantages.ndim == 1 else None
    for i, sample in enumerate(rollouts.samples):
        record = {
            "step": step,
            "id": sample.id,
            "completions": rollouts.texts[i],
            "rewards": rewards[i * g : (i + 1) * g],
        }
        if adv is not None:
            record["advantages"] = [round(a, 6) for a in adv[i * g : (i + 1) * g].tolist()]
        yield record


# ----------------------------------------------------------------------------- rewards


def require_reward_model(rewards: RewardsConfig, reward_model: str) -> None:
    """The config error of a reward named ``reward_model`` without a reward model folder."""
    if "reward_model" in rewards.weights and not reward_model:
        raise ValueError("rewards.weights names reward_model but --reward_model (a `vlalign rm` folder) is not set")


def build_rl_reward(
    rewards: RewardsConfig, reward_model: str, *, device: str, dtype: str, batch_size: int
) -> CombinedReward:
    """The reward of an RL recipe: the functions of ``rewards`` and, when ``reward_model`` names a folder
    saved by ``vlalign rm``, that model as the reward called ``reward_model`` (on the CPU when the policy
    is, else on the first accelerator)."""
    require_reward_model(rewards, reward_model)
    scorers = {}
    if reward_model:
        scorers["reward_model"] = load_reward_scorer(
            reward_model, device="cpu" if device == "cpu" else "auto", dtype=dtype, batch_size=batch_size
        )
    return build_reward_from_config(rewards, scorers=scorers)


def rl_reference(name: str, model: nn.Module, pad_token_id: int) -> ReferencePolicy | None:
    """The reference policy of ``update.reference`` (None for "none"; "auto": the adapter-disabled model
    with LoRA, else a frozen copy), built from the starting weights before any checkpoint is loaded."""
    if name == "none":
        return None
    if name == "auto":
        name = "adapter" if hasattr(model, "disable_adapter") else "copy"
    return make_reference(name, model, pad_token_id=pad_token_id)  # type: ignore[arg-type]


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


def run_eval(
    run: Run,
    policy: nn.Module,
    processor: Any,
    suite: Suite | None,
    reference: ReferencePolicy | None,
    *,
    step: int,
    scorer: Any = None,
    baseline: EvalResult | None = None,
) -> tuple[dict[str, float], EvalResult | None]:
    """Held-out metrics (main process; the others wait): the suite's, the KL from the start when the
    reference is a frozen copy and, with ``scorer``, the win rate over the starting model (whose
    result ``baseline`` is computed on first use, ``eval/start/...``). Returns them and the baseline.
    The first held-out descriptions go to the run's trackers at ``step`` (``eval/samples``, :func:`log_samples`)."""
    if suite is None:
        return {}, baseline
    out: dict[str, float] = {}
    if run.accelerator.is_main_process:
        if baseline is None and scorer is not None:
            with starting_policy(reference, policy) as start:
                baseline = evaluate(start, processor, suite) if start is not None else None
        ref_model = reference.model if isinstance(reference, FrozenCopyReference) else None
        result = evaluate(policy, processor, suite, reference=ref_model, baseline=baseline, scorer=scorer)
        out = {f"eval/{k}": v for k, v in result.metrics.items() if not k.endswith("_n")}
        log_samples(run.accelerator, step, samples_from_records(result.records), name="eval/samples")
        if baseline is not None:
            out.update({f"eval/start/{k}": v for k, v in baseline.metrics.items() if k.startswith(("chair/", "task/"))})
    run.accelerator.wait_for_everyone()
    return out, baseline


__all__ = [
    "ADVANTAGES",
    "PolicyUpdateConfig",
    "advantages",
    "build_rl_reward",
    "completion_records",
    "global_masked_moments",
    "old_logprobs",
    "overlong_shaping",
    "policy_logprobs",
    "reference_logprobs",
    "require_reward_model",
    "rl_reference",
    "rollout_metrics",
    "run_eval",
    "score",
    "starting_policy",
    "token_kl",
]
