"""Session-wide fixtures: tiny models of every architecture, each built ONCE per test session.

Use them from any test:

- ``tiny_model_dir(arch, size="tiny") -> Path``: the folder of a built model (reload it with
  ``load_model_and_processor``); built on first request, then reused.
- ``tiny_processor(arch) -> processor``: the tiny model's processor, loaded once (do not mutate).
- ``tiny_model(arch, **load_kwargs) -> (model, processor)``: a FRESH model each call (safe to
  train or wrap with LoRA), loaded from the session's folder in a few milliseconds.
- ``shape_images``: four distinct 48 px RGB images (a red disc, a blue square, a green
  triangle, a yellow bar on white), deterministic.
- ``world_cfg``, ``world_dir``: a small shapes world (:func:`small_world_config`) written once per
  session; ``make_world_config(**overrides)`` makes more of them.

The tiny models' tokenizers learn the shapes world's vocabulary, a corpus that
:mod:`vlalign.shapes` registers when it is imported (here, for every test).

``ARCHITECTURES`` (from :mod:`vlalign.models.tiny`) lists the architectures to parametrize over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from vlalign.shapes.tasks import write_world
from vlalign.shapes.world import WorldConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the network
# One compute thread everywhere, subprocesses included: the tiny models gain nothing from more on
# the shared 2-core machine, and a run resumed in a subprocess must reduce in the same order as
# the uninterrupted run in this process (different thread counts give last-bit differences).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    from vlalign.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, size: str = "tiny") -> Path:
        key = (arch, size)
        if key not in built:
            built[key] = build_tiny_model(arch, size, root / f"{arch}-{size}", seed=0)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir: Callable[..., Path]) -> Callable[[str], Any]:
    from transformers import AutoProcessor

    loaded: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in loaded:
            loaded[arch] = AutoProcessor.from_pretrained(tiny_model_dir(arch), local_files_only=True)
        return loaded[arch]

    return get


@pytest.fixture
def tiny_model(tiny_model_dir: Callable[..., Path]) -> Callable[..., tuple[Any, Any]]:
    from vlalign.models.load import load_model_and_processor

    def get(arch: str, **kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("dtype", "float32")
        return load_model_and_processor(tiny_model_dir(arch), **kwargs)

    return get


def _draw_images() -> list[Image.Image]:
    images = []
    for colour, shape in [
        ((220, 30, 30), "disc"),
        ((30, 60, 220), "square"),
        ((30, 170, 60), "triangle"),
        ((230, 200, 20), "bar"),
    ]:
        img = Image.new("RGB", (48, 48), (250, 250, 250))
        draw = ImageDraw.Draw(img)
        if shape == "disc":
            draw.ellipse((8, 8, 40, 40), fill=colour)
        elif shape == "square":
            draw.rectangle((10, 10, 38, 38), fill=colour)
        elif shape == "triangle":
            draw.polygon([(24, 6), (42, 40), (6, 40)], fill=colour)
        else:
            draw.rectangle((4, 18, 44, 30), fill=colour)
        images.append(img)
    return images


@pytest.fixture(scope="session")
def shape_images() -> list[Image.Image]:
    return _draw_images()


def _vlalign_process(args: list[str], cache: Path, **kwargs: Any) -> subprocess.Popen:
    """Start ``vlalign <args>`` in a new Python process (offline, cache in ``cache``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLALIGN_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlalign.cli", *args], env=env, **kwargs)


@pytest.fixture
def vlalign_process() -> Callable[..., subprocess.Popen]:
    """``vlalign_process(args, cache) -> Popen``: the CLI in a subprocess (to kill it mid-run)."""
    return _vlalign_process


def _kill_after(proc: subprocess.Popen, marker: Path, timeout: float = 240.0) -> None:
    """Wait until ``marker`` exists (a checkpoint written by ``proc``), then SIGKILL ``proc``."""
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run never wrote {marker}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def kill_after() -> Callable[..., None]:
    """``kill_after(proc, marker)``: SIGKILL the process once it has written ``marker``."""
    return _kill_after


# ----------------------------------------------------------------------------- a small shapes world


def small_world_config(**overrides) -> WorldConfig:
    """A world small enough to write in well under a second, with every split and POPE file."""
    base = dict(
        n_train=150,
        n_validation=20,
        n_test=40,
        n_compositional=30,
        image_size=48,
        pope_splits=("test", "compositional"),
        seed=7,
    )
    base.update(overrides)
    return WorldConfig(**base)


@pytest.fixture(scope="session")
def world_cfg() -> WorldConfig:
    return small_world_config()


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory, world_cfg: WorldConfig) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(world_cfg, out)
    return out


@pytest.fixture
def make_world_config():
    """``make_world_config(**overrides)``: :func:`small_world_config`."""
    return small_world_config
