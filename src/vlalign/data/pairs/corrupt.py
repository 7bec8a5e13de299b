"""Image corruption (as in mDPO, POVID and BPO): the same response, a destroyed image.

An image-conditioned pair keeps the response and corrupts the image: the original image is the
chosen condition, the corrupted one the rejected condition (mDPO's
``L_CoPO = -log sigmoid(beta [r(y_w | m, q) - r(y_w | m', q)])``). Three corruptions, each
deterministic given a seed, with ``level`` in [0, 1] (0 leaves the image unchanged):

- ``crop``: keep a random window holding ``1 - level`` of the area (same aspect ratio), resized
  back to the original size. mDPO crops to under 20 % of the image: ``level = 0.8``.
- ``mask``: split the image into a ``grid x grid`` of patches and paint ``round(level * grid^2)``
  of them, chosen at random, with the image's mean colour (the repository of mDPO masks visual
  tokens; this is the pixel-space version).
- ``noise``: the forward diffusion step ``x' = sqrt(1 - level) x + sqrt(level) eps`` on pixels
  scaled to [-1, 1], ``eps ~ N(0, 1)``, clipped back to [0, 255] (POVID adds diffusion noise; at
  ``level = 1`` nothing of the image is left).

:func:`corrupt_image` is what the DPO recipe calls on the fly (mDPO: the corrupted image made from
the chosen one), with :func:`corruption_seed` giving each sample its own stream.
:func:`corrupt_pairs` makes a dataset of such pairs: chosen and rejected hold the same response,
the corrupted images are written as files and listed in a ``rejected_images`` column (paths
relative to the output file's folder), and ``corruption`` records method, level and the sample's
seed. Rows that share an image file share its corrupted version (seeded by the file name, written
once): :func:`image_seed` gives each image its seed, which POVID's distorted images
(:mod:`vlalign.data.pairs.povid`) use too.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlalign.config import StrictFields
from vlalign.data.pairs import PairStats, pair_meta
from vlalign.data.schema import PreferenceSample, SupervisedSample, load_image

CORRUPTIONS: tuple[str, ...] = ("crop", "mask", "noise")


@dataclass
class CorruptConfig(StrictFields):
    """Image-corruption options."""

    method: str = "crop"
    """crop, mask or noise (see vlalign.data.pairs.corrupt)."""
    level: float = 0.8
    """Strength in [0, 1]: share of the area cut away (crop), of the patches masked (mask), or the
    noise variance (noise)."""
    grid: int = 8
    """Patches per side for mask."""
    seed: int = 0
    """Seed; an image file's corruption is drawn from (seed, file name), an in-memory image's from (seed, sample id)."""


def corruption_seed(seed: int, sample_id: str) -> int:
    """A sample's corruption seed (stable across runs and machines)."""
    digest = hashlib.sha256(f"vlalign-corrupt/{seed}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)  # fits int64 columns, leaves room for + k


def image_seed(seed: int, sample_id: str, image: Any, k: int) -> int:
    """The corruption seed of image ``k`` of a sample: drawn from (seed, file name) for an image
    file, so that rows sharing a file share its corruption; from (seed, sample id) + k otherwise."""
    if isinstance(image, (str, os.PathLike)):
        return corruption_seed(seed, Path(image).name)
    return corruption_seed(seed, sample_id) + k


def _check_level(level: float) -> None:
    if not 0.0 <= level <= 1.0 or math.isnan(level):
        raise ValueError(f"corruption level must lie in [0, 1], got {level}")


def crop_image(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """A random window with ``1 - level`` of the area, resized back to ``image.size``."""
    _check_level(level)
    w, h = image.size
    scale = math.sqrt(1.0 - level)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    window = image.crop((x0, y0, x0 + cw, y0 + ch))
    return window.resize((w, h), Image.Resampling.BICUBIC) if (cw, ch) != (w, h) else window.copy()


def patch_boxes(size: tuple[int, int], grid: int) -> list[tuple[int, int, int, int]]:
    """The ``grid x grid`` patches of an image of ``size`` (left, top, right, bottom), row-major."""
    w, h = size
    xs = [round(k * w / grid) for k in range(grid + 1)]
    ys = [round(k * h / grid) for k in range(grid + 1)]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(grid) for c in range(grid)]


def mask_patches(image: Image.Image, level: float, rng: np.random.Generator, *, grid: int = 8) -> Image.Image:
    """``round(level * grid^2)`` random patches painted with the image's mean colour."""
    _check_level(level)
    if grid < 1:
        raise ValueError(f"mask grid must be >= 1, got {grid}")
    pixels = np.asarray(image, dtype=np.uint8).copy()  # (H, W, 3)
    fill = pixels.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    boxes = patch_boxes(image.size, grid)
    chosen = rng.choice(len(boxes), size=round(level * len(boxes)), replace=False)
    for k in sorted(chosen.tolist()):
        left, top, right, bottom = boxes[k]
        pixels[top:bottom, left:right] = fill
    return Image.fromarray(pixels, "RGB")


def add_noise(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """``sqrt(1 - level) x + sqrt(level) eps`` on pixels in [-1, 1] (a forward diffusion step)."""
    _check_level(level)
    x = np.asarray(image, dtype=np.float64) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    noisy = math.sqrt(1.0 - level) * x + math.sqrt(level) * rng.standard_normal(x.shape)
    return Image.fromarray(np.clip((noisy + 1.0) * 127.5, 0, 255).round().astype(np.uint8), "RGB")


def corrupt_image(image: Any, method: str, level: float, seed: int, *, grid: int = 8) -> Image.Image:
    """``image`` (PIL, path or bytes) corrupted by ``method`` at ``level``, deterministic in ``seed``."""
    if method not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {method!r}; choose from {CORRUPTIONS}")
    img = load_image(image)
    rng = np.random.default_rng(seed)
    if method == "crop":
        return crop_image(img, level, rng)
    if method == "mask":
        return mask_patches(img, level, rng, grid=grid)
    return add_noise(img, level, rng)


def pixel_change(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two same-size RGB images, as a share of the range (0..1)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    return float(np.abs(x - y).mean() / 255.0)


def corrupt_pairs(
    samples: Sequence[SupervisedSample],
    cfg: CorruptConfig,
    *,
    save_image: Callable[[Image.Image, str], str] | None = None,
) -> tuple[list[PreferenceSample], PairStats]:
    """Image-conditioned pairs: same response, original image chosen, corrupted image rejected.

    ``save_image(image, stem) -> path`` stores each corrupted image and returns the path put in
    the ``rejected_images`` column; without it the PIL images themselves are put there (for use in
    memory). Samples without images are dropped (counted).
    """
    if cfg.method not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {cfg.method!r}; choose from {CORRUPTIONS}")
    _check_level(cfg.level)
    stats = PairStats(method=f"image corruption ({cfg.method}, level {cfg.level:g})")
    pairs: list[PreferenceSample] = []
    source = f"corrupt-{cfg.method}"
    done: dict[str, tuple[Any, float]] = {}  # image file -> (its corrupted version, pixel change)
    for sample in samples:
        stats.inputs += 1
        if not sample.images:
            stats.drop("no image")
            continue
        seed = corruption_seed(cfg.seed, sample.id)
        rejected_images: list[Any] = []
        changes = []
        for k, image in enumerate(sample.images):
            key = str(image) if isinstance(image, (str, os.PathLike)) else None
            if key is None or key not in done:  # rows sharing an image file share its corruption
                original = load_image(image)
                img_seed = image_seed(cfg.seed, sample.id, image, k)
                bad = corrupt_image(original, cfg.method, cfg.level, img_seed, grid=cfg.grid)
                stem = Path(key).stem if key is not None else f"{sample.id}-{k}"
                entry = (save_image(bad, stem) if save_image else bad, pixel_change(original, bad))
                if key is None:
                    rejected_images.append(entry[0])
                    changes.append(entry[1])
                    continue
                done[key] = entry
            rejected_images.append(done[key][0])
            changes.append(done[key][1])
        margin = sum(changes) / len(changes)
        corruption = {"method": cfg.method, "level": cfg.level, "seed": seed, "grid": cfg.grid}
        meta = pair_meta(
            sample.meta, source=source, rejected_images=rejected_images, corruption=corruption, margin=margin
        )
        pairs.append(
            PreferenceSample(
                f"{sample.id}/{source}", list(sample.images), sample.prompt, sample.completion, sample.completion, meta
            )
        )
        stats.add(source, margin)
    return pairs, stats


def image_saver(out_dir: str | os.PathLike, subdir: str = "corrupted") -> Callable[[Image.Image, str], str]:
    """A ``save_image`` for :func:`corrupt_pairs`: PNGs under ``out_dir/subdir``, paths relative to
    ``out_dir``; a stem already used gets a numbered suffix."""
    root = Path(out_dir)
    (root / subdir).mkdir(parents=True, exist_ok=True)

    used: set[str] = set()

    def save(image: Image.Image, stem: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "image"
        name, k = base, 1
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        image.save(root / subdir / f"{name}.png", format="PNG")
        return f"{subdir}/{name}.png"

    return save
