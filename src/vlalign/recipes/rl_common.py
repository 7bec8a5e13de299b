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
    metrics = update(run, model, optimizer, scheduler, ro, cfg.update, ...)   # vlalign.recipes.rl_update

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
and :func:`vlalign.recipes.rl_update.update`'s ``extra_loss`` hook (a value loss from the same
forward, ``return_hidden=True``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import reduce
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlalign.data.collate import EncodedPrompts
from vlalign.data.schema import PromptSample
from vlalign.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    discounted_returns,
    dr_grpo_advantages,
    kl_penalized_token_rewards,
    masked_whiten,
    overlong_reward_penalty,
)
from vlalign.models.generate import GenerationSettings, generate
from vlalign.models.logprobs import CompletionLogprobs, completion_logprobs
from vlalign.models.packing import concat_prompts
from vlalign.models.reference import ReferencePolicy
from vlalign.rewards import CombinedReward, RewardError, RewardsConfig, RewardScores, build_reward_from_config
from vlalign.training import Run

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
            raise ValueError(
                "update.kl_coef > 0 needs a reference policy; set update.reference to auto, copy or adapter"
            )

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
            self,
            samples=[self.samples[g] for g in groups],
            prompts=self.prompts.select(groups),
            token_ids=[self.token_ids[g] for g in groups],
            texts=[self.texts[g] for g in groups],
            stopped=[self.stopped[g] for g in groups],
            extras={k: cut(v) for k, v in self.extras.items()},
            **changes,
        )

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
            samples=[s for p in parts for s in p.samples],
            prompts=reduce(concat_prompts, [p.prompts for p in parts]),
            token_ids=[g for p in parts for g in p.token_ids],
            texts=[g for p in parts for g in p.texts],
            stopped=[g for p in parts for g in p.stopped],
            group_size=parts[0].group_size,
            seconds=sum(p.seconds for p in parts),
            **{k: v for k, v in tensors.items() if "." not in k},
            extras={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("extras.")},  # type: ignore[misc]
        )


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
    gens = generate(
        model,
        processor,
        list(samples),
        n=settings.n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_new_tokens=settings.max_new_tokens,
        seed=seed,
        batch_size=settings.batch_size,
        keep_prompts=True,
    )
    return Rollouts(
        samples=list(samples),
        prompts=reduce(concat_prompts, gens.encoded),
        token_ids=gens.token_ids,
        texts=gens.texts,
        stopped=gens.stopped,
        group_size=settings.n,
        seconds=gens.seconds,
    )


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
) -> CompletionLogprobs:
    """Per-token log-probs of the sampled completions under ``model`` at the sampling temperature
    (gradients flow; wrap in ``torch.no_grad()`` for old log-probs). Rows are in rollout order."""
    return completion_logprobs(
        model,
        rollouts.prompts,
        rollouts.token_ids,
        temperature=temperature,
        pad_token_id=pad_token_id,
        return_entropy=return_entropy,
        return_hidden=return_hidden,
    )


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
    return _by_micro_batch(
        rollouts,
        micro_batch,
        lambda part: policy_logprobs(model, part, temperature=temperature, pad_token_id=pad_token_id).logps,
    )


def reference_logprobs(
    reference: ReferencePolicy, rollouts: Rollouts, *, temperature: float, micro_batch: int
) -> Tensor:
    """``(R, L)`` log-probs under the reference policy (no gradient), in micro-batches of prompts."""
    return _by_micro_batch(
        rollouts,
        micro_batch,
        lambda part: reference.logprobs(part.prompts, part.token_ids, temperature=temperature).logps,
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
    returns = discounted_returns(token_rewards, mask, gamma=gamma)  # REINFORCE++: whiten the returns globally
    mean, var = global_masked_moments(returns, mask, reduce_sum=reduce_sum)
    return masked_whiten(returns, mask, mean=mean, var=var)


def group_filter_mask(rewards: Tensor, *, group_size: int) -> Tensor:
    """``(B,)`` True for groups whose rewards are not all equal (DAPO's dynamic sampling keeps those)."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(-1) > grouped.amin(-1)


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
    local = torch.tensor(
        [[float(metrics[k]), 1.0] if k in metrics else [0.0, 0.0] for k in keys], dtype=torch.float64, device=run.device
    ).reshape(-1, 2)
    total = run.accelerator.reduce(local, "sum")
    return {k: v / max(n, 1.0) for k, (v, n) in zip(keys, total.tolist())}


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
        from vlalign.rewards.model import load_reward_scorer

        scorers["reward_model"] = load_reward_scorer(
            reward_model, device="cpu" if device == "cpu" else "auto", dtype=dtype, batch_size=batch_size
        )
    return build_reward_from_config(rewards, scorers=scorers)


__all__ = [
    "ADVANTAGES",
    "PolicyUpdateConfig",
    "Rollouts",
    "advantages",
    "build_rl_reward",
    "global_masked_moments",
    "group_filter_mask",
    "mean_over_processes",
    "old_logprobs",
    "overlong_shaping",
    "policy_logprobs",
    "reference_logprobs",
    "require_reward_model",
    "rollout",
    "rollout_metrics",
    "rollout_seed",
    "score",
    "token_kl",
]
