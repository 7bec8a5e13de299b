"""Fixtures of the recipe tests: a small shapes world, and a way to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
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


def _vlalign_process(args: list[str], cache: Path, **kwargs) -> subprocess.Popen:
    """Start ``vlalign <args>`` in a new Python process (offline, cache in ``cache``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLALIGN_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlalign.cli", *args], env=env, **kwargs)


@pytest.fixture
def vlalign_process():
    """``vlalign_process(args, cache) -> Popen``: the CLI in a subprocess (to kill it mid-run)."""
    return _vlalign_process
