"""Shared fixtures of the data tests: a small shapes world written once, and tiny image files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vlalign.shapes.tasks import write_world
from vlalign.shapes.world import WorldConfig


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


def png_bytes(colour: tuple[int, int, int] = (200, 10, 10), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(name="png_bytes")
def png_bytes_fixture():
    """``png_bytes(colour, size)``: the bytes of a one-colour PNG."""
    return png_bytes


@pytest.fixture
def make_world_config():
    """``make_world_config(**overrides)``: :func:`small_world_config`."""
    return small_world_config


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder with ``a.png`` (red), ``b.png`` (green) and a corrupt ``bad.png``."""
    (tmp_path / "a.png").write_bytes(png_bytes((200, 10, 10)))
    (tmp_path / "b.png").write_bytes(png_bytes((10, 200, 10)))
    (tmp_path / "bad.png").write_bytes(png_bytes()[:30])
    return tmp_path
