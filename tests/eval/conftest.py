"""Fixtures of the evaluation tests: a very small shapes world, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlalign.shapes.tasks import write_world
from vlalign.shapes.world import WorldConfig


@pytest.fixture(scope="session")
def eval_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 test scenes, 3 compositional scenes, 32 px images: every suite part, in milliseconds."""
    cfg = WorldConfig(n_train=12, n_validation=2, n_test=4, n_compositional=3, image_size=32, seed=3)
    out = tmp_path_factory.mktemp("eval-world")
    write_world(cfg, out)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the threads'
    synchronisation makes them about 10x slower (measured: these tests 69 s -> 8 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
