"""What ``vlalign report`` reads: the files a run, an evaluation or the demo folder holds.

Reading never fails on a damaged file: a half-written last line of ``metrics.jsonl``, a file that
is not JSON, a demo stage without an evaluation are each skipped and described in ``notes``
(the report lists them). :func:`read_evaluation` also finds what the gallery needs beside the
answers: the folder of the evaluation's data (for relative image paths) and its object
vocabulary; for a published benchmark's ``eval.json`` (a ``benchmark`` key), the benchmark, its
``official`` numbers and the stored ``difference_interval``, with the settings' image folder as
where the records' images are. A named data source (``shapes:``, the embedded world) is not
resolved here: the caller maps it to its folder (``data_folders``), so that report/ reads files
and knows no data source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlalign.data.annotations import ObjectVocabulary, load_vocabulary

SUMMARY_FILE = "demo_summary.json"
METRICS_FILE = "metrics.jsonl"  # the name vlalign.training.metrics.MetricsLog writes (not imported: it pulls in torch)
EVAL_FILE = "eval.json"
SUITE_FILE = "suite_eval.json"
CONFIG_FILE = "config.yaml"


@dataclass
class Evaluation:
    """One evaluation's file: a model's metrics and answers (and a baseline's, for ``eval.json``)."""

    path: Path
    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    baseline_metrics: dict[str, Any] | None = None
    baseline_records: list[dict[str, Any]] | None = None
    image_roots: list[Path] = field(default_factory=list)
    """Folders relative image paths are tried against (the suite's data folder first)."""
    vocabulary: ObjectVocabulary | None = None
    benchmark: dict[str, Any] | None = None
    """A published benchmark's run (``vlalign eval --bench``): its name, input files (path -> sha256)
    and settings; None for the suite's evaluations."""
    official: dict[str, Any] | None = None
    """The benchmark's numbers as its own script prints them (the model's)."""
    baseline_official: dict[str, Any] | None = None
    """The same of the baseline, when there is one."""
    difference_interval: dict[str, Any] | None = None
    """The paired intervals ``vlalign eval`` wrote (metric -> a, b, difference, low, high, se), if any."""


@dataclass
class Stage:
    """One stage of the demo (or the single run of a plain folder)."""

    name: str
    run_dir: Path | None
    records: list[dict[str, Any]]
    """metrics.jsonl of its training run (empty if none)."""
    evaluation: Evaluation | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    """Summary metrics (demo_summary.json, else the evaluation's metrics)."""


# ----------------------------------------------------------------------------- reading


def read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; lines that do not parse (a run killed mid-write) are
    skipped and counted in ``notes``."""
    if not path.is_file():
        return []
    out, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            out.append(record)
        else:
            bad += 1
    if bad:
        notes.append(f"{path}: skipped {bad} line(s) that are not JSON objects")
    return out


def read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as exc:
        notes.append(f"{path}: not valid JSON ({exc}); left out")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path}: expected a JSON object; left out")
        return None
    return data


def _data_folder(data: Any, bases: list[Path], data_folders: Mapping[str, Path]) -> Path | None:
    """The folder of an evaluation's data: a named source that ``data_folders`` maps (``shapes:``, the
    embedded world, when the caller passes its folder), else a path, tried under ``bases`` first."""
    if not isinstance(data, str) or not data:
        return None
    for prefix, folder in data_folders.items():
        if data.startswith(prefix):
            return Path(folder)
    path = Path(data)
    candidates = [path]
    if not path.is_absolute():  # relative to where the evaluation ran: the folders we know (and the path's
        # tails under them) come first, so that a folder of the same name under today's working directory
        # (another run's) is not taken for this run's
        candidates = [b / Path(*path.parts[i:]) for i in range(len(path.parts)) for b in bases] + [path]
    for candidate in candidates:
        if candidate.exists():
            return candidate if candidate.is_dir() else candidate.parent
    return None


def _vocabulary(suite: dict[str, Any], data_folder: Path | None, bases: list[Path]) -> ObjectVocabulary | None:
    source = suite.get("vocabulary") if isinstance(suite.get("vocabulary"), str) else ""
    candidates = [Path(source), *(b / source for b in bases)] if source else []
    if data_folder is not None:
        candidates.append(data_folder / "manifest.json")
    for path in candidates:
        if path.is_file():
            try:
                return load_vocabulary(path)
            except (ValueError, OSError):
                continue
    return None


def _records(raw: Any) -> list[dict[str, Any]]:
    return [r for r in raw if isinstance(r, dict)] if isinstance(raw, list) else []


def read_evaluation(
    path: Path, bases: list[Path], notes: list[str], data_folders: Mapping[str, Path] | None = None
) -> Evaluation | None:
    """An ``eval.json`` (``vlalign eval``) or ``suite_eval.json`` (end of a training run).

    ``data_folders`` maps named data sources (``{"shapes:": folder}``) to their folders.
    """
    data = read_json(path, notes)
    if data is None:
        return None
    suite = data.get("suite") or (data.get("config") or {}).get("suite") or {}
    suite = suite if isinstance(suite, dict) else {}
    bases = [path.parent, *bases]
    folder = _data_folder(suite.get("data"), bases, data_folders or {})
    records = data.get("records")
    model, baseline = (records.get("model"), records.get("baseline")) if isinstance(records, dict) else (records, None)
    metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    base_metrics = data.get("baseline_metrics") if isinstance(data.get("baseline_metrics"), dict) else None
    bench = data.get("benchmark") if isinstance(data.get("benchmark"), dict) else None
    official = data.get("official") if isinstance(data.get("official"), dict) else {}
    settings = (bench or {}).get("settings")
    if bench is not None and isinstance(settings, dict):  # a benchmark's records name images under --images
        images = _data_folder(settings.get("images"), bases, {})
        folder = images if images is not None else folder
    intervals = data.get("difference_interval")
    return Evaluation(
        path=path,
        metrics=metrics,
        records=_records(model),
        baseline_metrics=base_metrics,
        baseline_records=_records(baseline) if baseline is not None else None,
        image_roots=([folder] if folder else []) + bases,
        vocabulary=_vocabulary(suite, folder, bases) if bench is None else None,
        benchmark=bench,
        official=official.get("model") if isinstance(official.get("model"), dict) else None,
        baseline_official=official.get("baseline") if isinstance(official.get("baseline"), dict) else None,
        difference_interval=intervals if isinstance(intervals, dict) else None,
    )


def _sub(root: Path, name: Any) -> Path | None:
    return root / name if isinstance(name, str) and name else None


def read_demo(
    root: Path, summary: dict[str, Any], notes: list[str], data_folders: Mapping[str, Path] | None = None
) -> list[Stage]:
    """The stages of ``demo_summary.json`` in pipeline order; any piece of a stage may be missing."""
    stages_raw = summary.get("stages")
    if not isinstance(stages_raw, list):
        notes.append(f"{root / SUMMARY_FILE}: no 'stages' list")
        return []
    stages = []
    for i, raw in enumerate(stages_raw):
        if not isinstance(raw, dict):
            notes.append(f"{root / SUMMARY_FILE}: stage {i} is not an object; left out")
            continue
        name = str(raw.get("stage") or f"stage {i + 1}")
        run_dir = _sub(root, raw.get("folder"))
        eval_dir = _sub(root, raw.get("eval"))
        evaluation = None
        if eval_dir is not None:
            evaluation = read_evaluation(eval_dir / EVAL_FILE, [root], notes, data_folders)
            if evaluation is None:
                notes.append(f"stage {name}: no {EVAL_FILE} in {eval_dir}")
        metrics = (
            dict(raw["metrics"])
            if isinstance(raw.get("metrics"), dict)
            else (dict(evaluation.metrics) if evaluation else {})
        )
        if "seconds" in raw and "seconds" not in metrics:
            metrics["seconds"] = raw["seconds"]
        records = read_jsonl(run_dir / METRICS_FILE, notes) if run_dir else []
        stages.append(Stage(name, run_dir, records, evaluation, metrics))
    return stages
