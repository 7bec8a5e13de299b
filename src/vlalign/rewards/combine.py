"""Reward functions by config: weighted combination of reward functions and batched scorers.

A rewards config names reward functions with weights::

    rewards:
      weights: {count_match: 1.0, format: 0.2, my_rewards.py:brevity: 0.1}
      options: {overlong_penalty: {max_length: 64, cache_length: 16}}
      tasks: {count_match: [counting]}     # optional: the tasks a reward scores
      timeout_s: 5

A name is a key of :data:`vlalign.rewards.verifiable.REWARD_FUNCTIONS` (the registry; the shapes
world adds its own when :mod:`vlalign.shapes` is imported), a user function
``path/to/file.py:function`` (relative paths from ``base_dir``, usually the config file's folder)
or ``package.module:function`` (:mod:`vlalign.rewards.user`), or the name of a batched scorer (a
reward model) that the recipe passes in ``scorers``. :func:`build_reward` checks every name and
its options at once (a missing file, a missing or non-callable function, an option the function
does not take: one clear error); the returned :class:`CombinedReward` scores a batch into the
weighted total plus each function's own values, whose metrics are ``rewards/<name>/mean`` and
``rewards/<name>/std``.

Several tasks in one run (``tasks``): a reward named there scores only the samples whose task
(:func:`vlalign.data.annotations.task_of`, the ``task`` column) is one of its tasks, and gives 0 to
the others without being called. So a reward model trained on descriptions scores the
descriptions, and a verifiable reward the short answers, in the same batch. Its metrics are over
the samples it scored (absent from a step where it scored none). When every reward is restricted,
a sample that none of them scores is an error, not a zero.

Every call is guarded (:func:`vlalign.rewards.guard.call_reward`: exceptions, non-numbers, NaN and
time limits become a :class:`~vlalign.rewards.guard.RewardError` naming the function and the
sample). Batched scorers (reward models) run without a time limit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from vlalign.config import CONFIG_DIR, StrictFields
from vlalign.data.annotations import task_of
from vlalign.data.schema import PromptSample
from vlalign.rewards.guard import RewardError, RewardTimeout, as_reward_value, call_reward, call_with_timeout
from vlalign.rewards.user import (
    BatchedUserReward,
    RewardConfigError,
    RewardFunction,
    bind_options,
    is_batched,
    load_user_function,
)
from vlalign.rewards.verifiable import REWARD_FUNCTIONS, sample_id

# ----------------------------------------------------------------------------- protocols


class BatchScorer(Protocol):
    """Rewards of a batch: ``(samples, completions) -> one float per pair`` (e.g. a reward model).

    ``samples[i]`` is the prompt that ``completions[i]`` answers (repeat a prompt for its G
    completions). The same protocol serves sample-and-rank and the win-rate metric.
    """

    def __call__(self, samples: Sequence[PromptSample], completions: Sequence[str]) -> Sequence[float]: ...


def metric_name(name: str) -> str:
    """The name a reward's metrics go under: the function part of ``file.py:function``."""
    return name.rpartition(":")[2] if ":" in name else name


# ----------------------------------------------------------------------------- combination


@dataclass
class RewardScores:
    """Rewards of a batch of N completions."""

    total: Tensor
    """``(N,)`` Σ_k weight_k · values[k]."""
    values: dict[str, Tensor]
    """Each function's own (unweighted) values, ``(N,)``, keyed by metric name (0 where it did not score)."""
    weights: dict[str, float]
    """Each function's weight, keyed by metric name."""
    scored: dict[str, Tensor] = field(default_factory=dict)
    """``(N,)`` bool: which completions a task-restricted function scored (absent: all of them)."""

    def metrics(self) -> dict[str, Tensor]:
        """``rewards/<name>/mean`` and ``/std`` (population std) per function, over the completions it
        scored, and for the total."""
        out: dict[str, Tensor] = {}
        for name, values in [*self.values.items(), ("total", self.total)]:
            if name in self.scored:
                values = values[self.scored[name]]
                if values.numel() == 0:
                    continue
            out[f"rewards/{name}/mean"] = values.mean()
            out[f"rewards/{name}/std"] = values.std(correction=0) if values.numel() > 1 else values.new_zeros(())
        return out


@dataclass
class CombinedReward:
    """Weighted sum of reward functions and batched scorers, each call guarded."""

    functions: dict[str, RewardFunction]
    """Per-completion reward functions (options bound), keyed by metric name."""
    scorers: dict[str, BatchScorer]
    """Batched scorers (reward models), keyed by metric name."""
    weights: dict[str, float]
    """Weight of every function and scorer (0: computed and logged, not added to the total)."""
    timeout_s: float | None = 10.0
    """Time limit of one reward-function call in seconds (None: no limit)."""
    mode: Literal["auto", "signal", "thread"] = "auto"
    """How time limits are enforced (see :func:`call_with_timeout`)."""
    tasks: dict[str, frozenset[str]] = field(default_factory=dict)
    """Metric name -> the sample tasks it scores; a function not named here scores every sample."""

    def _scored(self, name: str, samples: Sequence[PromptSample]) -> list[bool] | None:
        """Which samples ``name`` scores (None: all), by the task that ``grpo.tasks`` / ``ppo.tasks`` filter on."""
        if name not in self.tasks:
            return None
        return [task_of(s) in self.tasks[name] for s in samples]

    def __call__(
        self, samples: Sequence[PromptSample], completions: Sequence[str], *, dtype: torch.dtype = torch.float32
    ) -> RewardScores:
        """Score ``completions[i]`` against ``samples[i]`` with every function and scorer."""
        if len(samples) != len(completions):
            raise ValueError(
                f"{len(samples)} samples but {len(completions)} completions; pass one sample per completion"
            )
        values: dict[str, Tensor] = {}
        scored: dict[str, Tensor] = {}
        for name in [*self.functions, *self.scorers]:
            mask = self._scored(name, samples)
            keep = range(len(samples)) if mask is None else [i for i, m in enumerate(mask) if m]
            sub_s, sub_c = [samples[i] for i in keep], [completions[i] for i in keep]
            if name in self.functions:
                found = [
                    call_reward(self.functions[name], name, c, s, timeout_s=self.timeout_s, mode=self.mode)
                    for s, c in zip(sub_s, sub_c)
                ]
            else:
                scorer = self.scorers[name]
                limit = (
                    self.timeout_s * len(sub_s) if self.timeout_s and isinstance(scorer, BatchedUserReward) else None
                )
                found = self._score_batch(name, scorer, sub_s, sub_c, timeout_s=limit, mode=self.mode) if keep else []
            v = torch.zeros(len(samples), dtype=torch.float64)  # (N,)
            v[list(keep)] = torch.tensor(found, dtype=torch.float64)
            values[name] = v
            if mask is not None:
                scored[name] = torch.tensor(mask, dtype=torch.bool)
        if scored and len(scored) == len(values):  # every reward is task-restricted: none may leave a sample out
            unscored = [i for i in range(len(samples)) if not any(bool(m[i]) for m in scored.values())]
            if unscored:
                s = samples[unscored[0]]
                raise RewardError(
                    f"no reward scores sample {sample_id(s)!r} (task {task_of(s)!r}): "
                    f"rewards.tasks names only {sorted(set().union(*self.tasks.values()))}",
                    function="rewards.tasks",
                    sample_id=sample_id(s),
                )
        total = torch.zeros(len(completions), dtype=torch.float64)  # (N,)
        for name, v in values.items():
            total = total + self.weights[name] * v
        return RewardScores(
            total=total.to(dtype),
            values={k: v.to(dtype) for k, v in values.items()},
            weights=dict(self.weights),
            scored=scored,
        )

    @staticmethod
    def _score_batch(
        name: str,
        scorer: BatchScorer,
        samples: Sequence[PromptSample],
        completions: Sequence[str],
        *,
        timeout_s: float | None = None,
        mode: Literal["auto", "signal", "thread"] = "auto",
    ) -> list[float]:
        try:
            raw = call_with_timeout(scorer, samples, completions, timeout_s=timeout_s, mode=mode)
        except RewardTimeout:
            raise RewardError(
                f"reward {name!r} timed out after {timeout_s} s on a batch of {len(samples)} "
                "(rewards.timeout_s per completion); make it faster or raise rewards.timeout_s",
                function=name,
                sample_id=None,
            ) from None
        except Exception as exc:
            ids = [sample_id(s) for s in samples[:4]]
            raise RewardError(
                f"reward scorer {name!r} raised {type(exc).__name__} on a batch of {len(samples)} "
                f"(samples {ids}...): {exc}",
                function=name,
                sample_id=None,
            ) from exc
        if isinstance(raw, Tensor):
            raw = raw.detach().cpu().reshape(-1).tolist()
        if len(raw) != len(completions):
            raise RewardError(
                f"reward scorer {name!r} returned {len(raw)} scores for {len(completions)} completions",
                function=name,
                sample_id=None,
            )
        return [as_reward_value(v, function=name, sample=s) for v, s in zip(raw, samples)]


@dataclass
class RewardsConfig(StrictFields):
    """Which rewards a recipe optimises, and how they are called."""

    weights: dict[str, float] = field(default_factory=lambda: {"shapes_answer": 1.0})
    """Reward name -> weight. Names: exact_match, answer_tag, format, count_match, colour_match,
    yes_no_match, object_f1, shapes_answer, box_iou, threshold_score, overlong_penalty; a user
    function 'file.py:function' or 'package.module:function' called as fn(completion, sample);
    or a reward model the recipe provides. Weight 0 logs a reward without optimising it."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Reward name -> keyword options, e.g. {overlong_penalty: {max_length: 64, cache_length: 16}}."""
    tasks: dict[str, list[str]] = field(default_factory=dict)
    """Reward name -> the tasks (a sample's task column) it scores, e.g. {reward_model: [describe],
    shapes_answer: [colour, existence]}; it gives 0 to other samples. A reward not named: every sample."""
    timeout_s: float = 10.0
    """Time limit of one reward call in seconds; a slower call stops the step (0: no limit). A batched
    (TRL-style) function gets this much per completion of its batch."""
    base_dir: str = field(default="", metadata={CONFIG_DIR: True})
    """Folder that a relative 'file.py:function' is read from before the working directory ('' = the
    folder of the --config file, filled in when the config is loaded; without one, the working directory)."""


def build_reward(
    weights: Mapping[str, float],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    scorers: Mapping[str, BatchScorer] | None = None,
    timeout_s: float | None = 10.0,
    base_dir: str | Path | None = None,
    mode: Literal["auto", "signal", "thread"] = "auto",
    tasks: Mapping[str, Sequence[str]] | None = None,
) -> CombinedReward:
    """Resolve every reward name of ``weights`` (see the module docstring) into a :class:`CombinedReward`."""
    options = dict(options or {})
    scorers = dict(scorers or {})
    tasks = dict(tasks or {})
    if not weights:
        raise RewardConfigError("rewards.weights is empty: name at least one reward, e.g. {count_match: 1.0}")
    for section, names in (("options", options), ("tasks", tasks)):
        unused = sorted(set(names) - set(weights))
        if unused:
            raise RewardConfigError(
                f"rewards.{section} names {unused}, which are not in rewards.weights ({sorted(weights)})"
            )
    for name, listed in tasks.items():
        if isinstance(listed, str) or not listed or not all(isinstance(t, str) and t for t in listed):
            raise RewardConfigError(f"rewards.tasks.{name}: give a non-empty list of task names, got {listed!r}")
    functions: dict[str, RewardFunction] = {}
    batch: dict[str, BatchScorer] = {}
    out_weights: dict[str, float] = {}
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise RewardConfigError(f"rewards.weights.{name}: {weight!r} is not a finite number")
        key = metric_name(name)
        if key in out_weights:
            raise RewardConfigError(f"rewards.weights: {name!r} and another reward both log as {key!r}; rename one")
        if name in scorers:
            if name in options:
                raise RewardConfigError(f"rewards.options.{name}: options of a reward model are set where it is built")
            batch[key] = scorers[name]
        elif name in REWARD_FUNCTIONS:
            functions[key] = bind_options(REWARD_FUNCTIONS[name], name, options.get(name))
        elif ":" in name:
            fn = load_user_function(name, base_dir=base_dir)
            if is_batched(fn):
                batch[key] = BatchedUserReward(fn, name, options.get(name))
            else:
                functions[key] = bind_options(fn, name, options.get(name))
        else:
            known = sorted([*REWARD_FUNCTIONS, *scorers])
            raise RewardConfigError(
                f"rewards.weights: unknown reward {name!r}; choose from {known}, or name a user function "
                "as 'file.py:function'"
            )
        out_weights[key] = float(weight)
    by_task = {metric_name(name): frozenset(listed) for name, listed in tasks.items()}
    return CombinedReward(functions, batch, out_weights, timeout_s=timeout_s or None, mode=mode, tasks=by_task)


def build_reward_from_config(
    cfg: RewardsConfig, *, scorers: Mapping[str, BatchScorer] | None = None, base_dir: str | Path | None = None
) -> CombinedReward:
    """:func:`build_reward` from a :class:`RewardsConfig` section (relative user files from ``base_dir``,
    else ``cfg.base_dir``, then the working directory)."""
    return build_reward(
        cfg.weights,
        options=cfg.options,
        scorers=scorers,
        timeout_s=cfg.timeout_s,
        base_dir=base_dir or cfg.base_dir or None,
        tasks=cfg.tasks,
    )


DRY_COMPLETION = "a dry run"
"""The completion every reward scores in :func:`dry_run`."""


def dry_run(reward: CombinedReward, samples: Sequence[PromptSample], *, completion: str = DRY_COMPLETION) -> None:
    """Call every reward once before training (on the first sample of each task in ``samples``, each
    answered by ``completion``), so that a broken reward stops the run in seconds, named, before any
    model loads: a :class:`~vlalign.rewards.guard.RewardError` naming the function and the sample."""
    firsts: dict[str, PromptSample] = {}
    for sample in samples:
        firsts.setdefault(str(task_of(sample)), sample)
    if not firsts:
        return
    picked = list(firsts.values())
    try:
        reward(picked, [completion] * len(picked))
    except RewardError as exc:
        raise RewardError(
            f"dry run before training (completion {completion!r}): {exc}",
            function=exc.function,
            sample_id=exc.sample_id,
        ) from exc
