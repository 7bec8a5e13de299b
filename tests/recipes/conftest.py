"""Fixtures of the recipe tests: a small shapes world, a reward model folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlalign.shapes.tasks import write_world
from vlalign.shapes.world import WorldConfig


@pytest.fixture(scope="session")
def recipe_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes world (48 px images) with every split, written once per session."""
    out = tmp_path_factory.mktemp("recipe-world")
    write_world(WorldConfig(n_train=60, n_validation=10, n_test=20, n_compositional=10, image_size=48, seed=3), out)
    return out


@pytest.fixture(scope="session")
def reward_model_dir(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) reward model folder on the tiny Qwen2-VL: a fixed, deterministic scorer."""
    from vlalign.models.heads import RewardModel, RewardModelInfo, new_head, save_reward_model
    from vlalign.models.load import load_model_and_processor

    model, processor = load_model_and_processor(tiny_model_dir("qwen2_vl"), device="cpu", dtype="float32")
    rm = RewardModel(model, new_head(model, seed=11))
    info = RewardModelInfo(hidden_size=rm.head.hidden_size, scale=0.1)
    return save_reward_model(rm, processor, tmp_path_factory.mktemp("rl-rm") / "rm", info)
