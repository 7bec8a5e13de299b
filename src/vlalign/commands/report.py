"""``vlalign report``: write the HTML report (plots and gallery embedded, PNG files beside it) of a folder.

The folder is one that vlalign wrote: the demo folder (``demo_summary.json``), an evaluation
folder (``eval.json``) or a training run folder (``metrics.jsonl``); see :mod:`vlalign.report.html`.

Examples::

    vlalign report --run_dir=runs/demo                       # runs/demo/report.html + runs/demo/report/*.png
    vlalign report --run_dir=runs/dpo --out=/tmp/dpo.html    # /tmp/dpo.html + /tmp/dpo/*.png
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from vlalign.config import StrictFields
from vlalign.report.html import ReportError, write_report
from vlalign.shapes.embedded import SHAPES_PREFIX, world_folder

POSITIONAL = ("run_dir",)
"""Fields that may also be given as bare arguments, in this order (``vlalign report runs/demo``)."""


@dataclass
class Config(StrictFields):
    """Which folder to report on, and where the HTML goes."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("run_dir",)
    """Options that have no default: the command stops without them."""

    run_dir: str = ""
    """The folder to report on: the demo folder, an eval folder or a training run folder (required)."""
    out: str = ""
    """The HTML file to write ('' = <run_dir>/report.html); the PNG plots go to the folder of the
    same name beside it."""


def run(cfg: Config) -> int:
    """Write the report and print its path; 2 (with the reason on stderr) if there is nothing to report."""
    if not cfg.run_dir:
        print("vlalign report: give the folder to report on: vlalign report --run_dir=RUN_DIR", file=sys.stderr)
        return 2
    try:
        path = write_report(
            Path(cfg.run_dir), Path(cfg.out) if cfg.out else None, data_folders={SHAPES_PREFIX: world_folder()}
        )
    except ReportError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"wrote {path} (plots in {path.parent / path.stem})")
    return 0
