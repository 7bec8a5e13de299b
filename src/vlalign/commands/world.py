"""``vlalign world``: write the shapes world (images, JSONL datasets, POPE files, manifest) to disk.

Example::

    vlalign world --out data/shapes --world.n_train=4000 --world.cooccurrence_strength=0.9
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlalign.config import StrictFields
from vlalign.errors import UserError
from vlalign.shapes.tasks import write_world
from vlalign.shapes.world import WorldConfig


@dataclass
class Config(StrictFields):
    """Where to write the world, and the world itself."""

    out: str = "data/shapes"
    """Folder the datasets are written to (image paths in the files are relative to it)."""
    overwrite: bool = False
    """Empty a non-empty ``out`` folder first instead of stopping."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The shapes world: shapes, colours, objects per scene, bias, split sizes, tasks."""


def run(cfg: Config) -> int:
    """Write the world and print what was written; a non-empty ``out`` is refused (one line)
    unless ``overwrite``."""
    out = Path(cfg.out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not cfg.overwrite):
        what = "a file" if out.is_file() else "not empty"
        raise UserError(f"{out} is {what}; pass --overwrite=true to replace its contents, or choose another --out")
    manifest = write_world(cfg.world, cfg.out, overwrite=cfg.overwrite)
    scenes = ", ".join(f"{split} {n}" for split, n in manifest["scenes"].items())
    print(f"wrote the shapes world to {cfg.out}: scenes {scenes}")
    width = max(len(name) for name in manifest["files"])
    for name, info in manifest["files"].items():
        print(f"  {name.ljust(width)}  {info['rows']:>7} rows")
    return 0
