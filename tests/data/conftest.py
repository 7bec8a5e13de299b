"""Shared fixtures of the data tests: tiny image files (the small shapes world is in tests/conftest.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image


def png_bytes(colour: tuple[int, int, int] = (200, 10, 10), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(name="png_bytes")
def png_bytes_fixture():
    """``png_bytes(colour, size)``: the bytes of a one-colour PNG."""
    return png_bytes


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder with ``a.png`` (red), ``b.png`` (green) and a corrupt ``bad.png``."""
    (tmp_path / "a.png").write_bytes(png_bytes((200, 10, 10)))
    (tmp_path / "b.png").write_bytes(png_bytes((10, 200, 10)))
    (tmp_path / "bad.png").write_bytes(png_bytes()[:30])
    return tmp_path
