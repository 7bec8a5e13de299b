"""The embedded default: the shapes world, written on demand into the cache.

Recipes accept two shorthand sources besides ordinary paths, so that every command runs out of
the box on a laptop:

* ``tiny:<arch>:<size>`` as a model (e.g. ``tiny:gemma3:small``, the demo model): built offline
  by :func:`vlalign.models.tiny.resolve_model` into the cache and loaded from there (its tokenizer
  learns this world's vocabulary, the corpus :mod:`vlalign.shapes` registers);
* ``shapes:<file>`` as a dataset (e.g. ``shapes:train.jsonl``, ``shapes:test_prompts.jsonl``,
  ``shapes:pope_test_adversarial.jsonl``): the demo's shapes world
  (:data:`~vlalign.shapes.world.DEMO_WORLD`), written once into the cache by :func:`resolve_data`,
  which :mod:`vlalign.shapes` registers as the ``shapes:`` source of :mod:`vlalign.data.sources`.

The cache is ``$VLALIGN_CACHE`` if set, else ``~/.cache/vlalign``
(:func:`vlalign.models.tiny.cache_dir`). Building is deterministic, so a cached build is reused as
long as its config (or the builder's version stamp) matches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlalign.models.tiny import cache_dir, cache_lock
from vlalign.shapes.tasks import manifest_config, write_world
from vlalign.shapes.world import DEMO_WORLD, WorldConfig

SHAPES_PREFIX = "shapes:"


def world_folder() -> Path:
    """The folder of the embedded world that ``shapes:<file>`` paths name (in the cache)."""
    return cache_dir() / "shapes-default"


def resolve_data(path: str) -> str:
    """A dataset path: ``shapes:<file>`` names a file of the demo's world (written once)."""
    if not path.startswith(SHAPES_PREFIX):
        return path
    folder = world_folder()
    target = folder / path[len(SHAPES_PREFIX) :]
    cfg = WorldConfig(**DEMO_WORLD)
    with cache_lock(folder.name):  # another process writing the same world: wait for it, then reuse it
        if not target.exists() or _cached_config(folder) != json.loads(json.dumps(manifest_config(cfg))):
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
