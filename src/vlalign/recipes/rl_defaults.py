"""Defaults of the RL recipes that depend on other options, resolved before anything loads:
which held-out evaluation runs, whether a reference policy is kept, and the reward, built and
called once on the training prompts before the policy loads.

* ``data.eval`` (``vlalign grpo`` / ``vlalign ppo``): ``auto`` evaluates on the ``eval`` suite
  (default: the shapes world's held-out split) only when the training prompts come from a shapes
  world (``shapes:...``, or a file beside a shapes world's ``manifest.json``); on one's own data
  there is no evaluation unless asked: ``--data.eval=heldout.jsonl`` evaluates on those prompts
  (task accuracy of the rows' answers), ``--data.eval=shapes:`` on the shapes world, and
  ``--data.eval=''`` turns the evaluation off.
* A reference policy costs a frozen copy of the model (or, with LoRA, the adapter switched off)
  and, when the KL is logged every step, one forward per step. It is built when the KL is in the
  objective (``update.kl_coef > 0``), when ``update.log_kl=true``, or when the held-out evaluation
  measures the KL from the start (``eval.kl_prompts > 0`` with a frozen copy: not with LoRA's
  adapter); otherwise there is none. With a reference, ``log_kl=auto`` logs the KL every step,
  ``log_kl=false`` keeps it for the evaluation alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from vlalign.data.schema import PromptSample
from vlalign.eval.suite import Suite, SuiteConfig
from vlalign.models.reference import ReferencePolicy
from vlalign.recipes.common import DataConfig, task_suite
from vlalign.recipes.rl_common import PolicyUpdateConfig, build_rl_reward, rl_reference
from vlalign.rewards import CombinedReward, dry_run
from vlalign.shapes.embedded import SHAPES_PREFIX

AUTO = "auto"


def is_shapes_data(path: str) -> bool:
    """Whether ``path`` names data of a shapes world: ``shapes:<file>`` or a file beside a ``manifest.json``."""
    return path.startswith(SHAPES_PREFIX) or (bool(path) and (Path(path).parent / "manifest.json").is_file())


def heldout_suite_config(data: DataConfig, suite: SuiteConfig) -> SuiteConfig | None:
    """The suite the held-out evaluation runs (None: no evaluation), from ``data.eval`` (module docstring)."""
    if data.eval == AUTO:
        return suite if is_shapes_data(data.train) else None
    if not data.eval:
        return None
    return dataclasses.replace(suite, data=data.eval)


def reference_choice(update: PolicyUpdateConfig, *, eval_measures_kl: bool, lora: bool) -> str:
    """The ``update.reference`` to build: itself when the run uses one (module docstring), else "none"."""
    if update.reference == "none" or update.kl_coef > 0 or str(update.log_kl).lower() == "true":
        return update.reference
    frozen_copy = update.reference == "copy" or (update.reference == AUTO and not lora)
    if eval_measures_kl and frozen_copy:
        return update.reference
    return "none"


def suite_and_reference(cfg: Any, model: nn.Module, pad_token_id: int) -> tuple[Suite | None, ReferencePolicy | None]:
    """The held-out suite of an RL recipe's config (``data``, ``eval``, ``eval_tasks``; None for none) and
    its reference policy (``update``; None for none), built from the starting weights."""
    suite_cfg = heldout_suite_config(cfg.data, cfg.eval)
    suite = task_suite(suite_cfg, cfg.eval_tasks) if suite_cfg is not None else None
    measures_kl = suite is not None and suite_cfg is not None and suite_cfg.kl_prompts > 0
    name = reference_choice(cfg.update, eval_measures_kl=measures_kl, lora=cfg.model.use_lora)
    return suite, rl_reference(name, model, pad_token_id)


def checked_reward(cfg: Any, samples: Sequence[PromptSample]) -> CombinedReward:
    """The reward of an RL recipe's config (its ``rewards``, ``reward_model``, ``reward_batch_size`` and
    ``model``), built and called once on the first training prompt of each task
    (:func:`vlalign.rewards.dry_run`): a broken reward stops the run here, named, before the policy loads."""
    reward = build_rl_reward(
        cfg.rewards,
        cfg.reward_model,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        batch_size=cfg.reward_batch_size,
    )
    dry_run(reward, samples)
    return reward
