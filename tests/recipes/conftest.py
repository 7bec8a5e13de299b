"""Fixtures of the recipe tests: a small shapes world."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlalign.data.world import WorldConfig
from vlalign.data.world_tasks import write_world


@pytest.fixture(scope="session")
def recipe_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes world (48 px images) with every split, written once per session."""
    out = tmp_path_factory.mktemp("recipe-world")
    write_world(WorldConfig(n_train=60, n_validation=10, n_test=20, n_compositional=10, image_size=48, seed=3), out)
    return out
