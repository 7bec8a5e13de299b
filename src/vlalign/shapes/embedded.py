"""The embedded default: the shapes world and tiny models of real architectures, built on demand.

Recipes accept two shorthand sources besides ordinary paths, so that every command runs out of
the box on a laptop:

* ``tiny:<arch>:<size>`` as a model (e.g. ``tiny:gemma3:small``, the demo model): built offline
  by :func:`vlalign.models.tiny.build_tiny_model` into the cache and loaded from there;
* ``shapes:<file>`` as a dataset (e.g. ``shapes:train.jsonl``, ``shapes:test_prompts.jsonl``,
  ``shapes:pope_test_adversarial.jsonl``): the demo's shapes world
  (:data:`~vlalign.shapes.world.DEMO_WORLD`), written once into the cache.

The cache is ``$VLALIGN_CACHE`` if set, else ``~/.cache/vlalign``. Building is deterministic, so a
cached build is reused as long as the builder's version stamp matches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TINY_PREFIX = "tiny:"
SHAPES_PREFIX = "shapes:"


def cache_dir() -> Path:
    """Where built models and the default world live."""
    return Path(os.environ.get("VLALIGN_CACHE") or Path.home() / ".cache" / "vlalign")


def resolve_model(name_or_path: str, *, seed: int = 0) -> str:
    """A loadable model source: ``tiny:<arch>:<size>`` is built (once) and its folder returned."""
    if not name_or_path.startswith(TINY_PREFIX):
        return name_or_path
    from vlalign.models.tiny import ARCHITECTURES, SIZES, build_tiny_model

    parts = name_or_path[len(TINY_PREFIX) :].split(":")
    if len(parts) != 2 or parts[0] not in ARCHITECTURES or parts[1] not in SIZES:
        raise ValueError(
            f"model {name_or_path!r}: expected tiny:<arch>:<size> with arch in {', '.join(ARCHITECTURES)} "
            f"and size in {', '.join(SIZES)}"
        )
    arch, size = parts
    return str(build_tiny_model(arch, size, cache_dir() / "models" / f"{arch}-{size}-seed{seed}", seed=seed))


def resolve_data(path: str) -> str:
    """A dataset path: ``shapes:<file>`` names a file of the demo's world (written once)."""
    if not path.startswith(SHAPES_PREFIX):
        return path
    from vlalign.config import to_dict
    from vlalign.shapes.world import DEMO_WORLD, WorldConfig, write_world

    folder = cache_dir() / "shapes-default"
    target = folder / path[len(SHAPES_PREFIX) :]
    cfg = WorldConfig(**DEMO_WORLD)
    if not target.exists() or _cached_config(folder) != json.loads(json.dumps(to_dict(cfg))):
        # first use, or a world cached by an older vlalign (another world, or without this file)
        write_world(cfg, str(folder), overwrite=True)
    if not target.exists():
        available = sorted(p.name for p in folder.glob("*.jsonl"))
        raise FileNotFoundError(
            f"{path!r}: the shapes world has no file {target.name!r}; available: {', '.join(available)}"
        )
    return str(target)


def _cached_config(folder: Path) -> Any:
    try:
        return json.loads((folder / "manifest.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return None
