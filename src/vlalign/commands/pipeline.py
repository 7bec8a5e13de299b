"""A pipeline of stages, each run in its own folder, reused while current and resumed when interrupted.

A finished stage leaves a ``stage.json`` in its folder holding its fingerprint (a hash of its
settings and of the fingerprints of the stages it reads, :func:`stage_fingerprint`), its wall
time and a brief of its result. :func:`run_stage` reuses a folder whose ``stage.json`` has the
same fingerprint; resumes a stage that started with that fingerprint and did not finish (its
action gets ``resume=True`` and picks up its last checkpoint); and otherwise, or when forced,
empties the folder and runs the stage afresh. ``vlalign demo`` is such a pipeline.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGE_FILE = "stage.json"

Action = Callable[[Path, bool], dict[str, Any]]
"""``action(folder, resume) -> result``: runs a stage in ``folder``."""


@dataclass
class Stage:
    """One step of the pipeline: what it reads, its settings, and the action that runs it."""

    name: str
    settings: dict[str, Any]
    after: list[str]
    action: Action
    """``action(folder, resume) -> result``; ``resume`` when an interrupted run of it is there."""
    label: str = ""
    """The stage's column in the summary table ('' for stages without one)."""


def stage_fingerprint(stage: Stage, upstream: list[str]) -> str:
    """A hash of the stage's name and settings and of the fingerprints of the stages it reads."""
    text = json.dumps({"stage": stage.name, "settings": stage.settings, "after": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_stage(folder: Path) -> dict[str, Any] | None:
    path = folder / STAGE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def run_stage(stage: Stage, folder: Path, fingerprint: str, *, force: bool) -> tuple[dict[str, Any], bool]:
    """Run one stage unless its outputs are current; returns (its stage.json, whether it ran)."""
    done = _read_stage(folder)
    if done is not None and done.get("fingerprint") == fingerprint and done.get("finished") and not force:
        print(f"[demo] {stage.name}: up to date ({folder}), reused")
        return done, False
    started = folder / ".fingerprint"
    resume = not force and started.exists() and started.read_text().strip() == fingerprint
    if folder.exists() and not resume:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started.write_text(fingerprint + "\n")
    print(f"[demo] {stage.name}: {'resuming' if resume else 'running'} in {folder}")
    start = time.perf_counter()
    result = stage.action(folder, resume)
    seconds = time.perf_counter() - start
    record = {
        "stage": stage.name,
        "fingerprint": fingerprint,
        "finished": True,
        "seconds": seconds,
        "settings": stage.settings,
        "result": _jsonable(_brief(result)),
    }
    (folder / STAGE_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record, True


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """What stage.json keeps of a stage's result: an evaluation's metrics (not its answers)."""
    return {"metrics": result["metrics"]} if "metrics" in result else result


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: float(v) if hasattr(v, "__float__") else str(v)))
