"""The demo's summary: ``demo_summary.json``'s stages, the paired intervals and the printed table.

:mod:`vlalign.commands.demo` runs the stages; this module turns their records into the summary it
writes and prints (the image stages side by side, the video task's stages in a table of their own).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlalign.commands.pipeline import Stage
from vlalign.eval.paired import Interval, paired_bootstrap
from vlalign.shapes.video import MOVED_QUESTION

SMOKE_TEST = (
    "QUICK DEMO: a smoke test of the pipeline (a small world, a few training steps per stage). "
    "Its numbers say nothing about alignment; run `vlalign demo` for the full demo's."
)
"""What the quick demo prints above its table."""

TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("chair/chair_i", "CHAIR_i"),
    ("chair/chair_s", "CHAIR_s"),
    ("chair/recall", "object recall"),
    ("pope/adversarial/f1", "POPE adv F1"),
    ("pope/adversarial/yes_ratio", "POPE adv yes"),
    ("pope/popular/f1", "POPE pop F1"),
    ("pope/popular/yes_ratio", "POPE pop yes"),
    ("pope/random/f1", "POPE rand F1"),
    ("pope/random/yes_ratio", "POPE rand yes"),
    ("task/counting", "counting"),
    ("task/colour", "colour"),
    ("task/existence", "existence"),
    ("compositional/chair/chair_i", "comp. CHAIR_i"),
    ("compositional/task/counting", "comp. counting"),
    ("kl/seq", "KL from base (seq)"),
    ("kl/token_k3", "KL per token (k3)"),
)
"""The summary table's rows: suite metric -> label."""


def summarise(stages: list[Stage], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``demo_summary.json``: one object per evaluated stage (metrics by name, wall times)."""
    out: list[dict[str, Any]] = []
    for stage in stages:
        if not stage.label:
            continue
        trained = stage.after[0]
        metrics = dict(records[stage.name].get("result", {}).get("metrics", {}))
        metrics["seconds/train"] = records[trained]["seconds"]
        metrics["seconds/eval"] = records[stage.name]["seconds"]
        out.append({"stage": stage.label, "folder": trained, "eval": stage.name, "metrics": metrics})
    seconds = {name: rec["seconds"] for name, rec in records.items()}
    return {"stages": out, "stage_seconds": seconds}


VIDEO_METRICS: tuple[tuple[str, str], ...] = (
    ("task/moved", "moved accuracy"),
    ("kl/seq", "KL from video SFT (seq)"),
    ("kl/token_k3", "KL per token (k3)"),
)
"""The video table's rows: suite metric -> label."""


def video_summary(stages: list[Stage], records: dict[str, dict[str, Any]], model: str) -> dict[str, Any]:
    """``demo_summary.json``'s ``video``: the video model and one object per evaluated video stage
    (``{}`` without the video stages)."""
    out = []
    for name in ("eval-video-sft", "eval-video-grpo"):
        stage = next((s for s in stages if s.name == name), None)
        if stage is None:
            continue
        metrics = dict(records[name].get("result", {}).get("metrics", {}))
        metrics["seconds/train"] = records[stage.after[0]]["seconds"]
        metrics["seconds/eval"] = records[name]["seconds"]
        out.append({"stage": name.rsplit("-", 1)[-1], "folder": stage.after[0], "eval": name, "metrics": metrics})
    return {"model": model, "stages": out} if out else {}


def stage_intervals(root: Path, summary: dict[str, Any]) -> dict[str, Interval]:
    """Last evaluated stage - first, per metric, with its paired 95% interval over the test scenes
    (:func:`vlalign.eval.paired.paired_bootstrap` on the two stages' answers); {} when either
    stage's eval.json is missing or they did not answer the same questions."""
    stages = summary["stages"]
    files = [root / stages[i]["eval"] / "eval.json" for i in (-1, 0)] if len(stages) >= 2 else []
    if not files or not all(f.is_file() for f in files):
        return {}
    last, first = (json.loads(f.read_text()).get("records", {}).get("model") or [] for f in files)
    try:
        return paired_bootstrap([last], [first]) if last and first else {}
    except ValueError:
        return {}


def format_summary(summary: dict[str, Any]) -> str:
    """The printed table: one row per metric, one column per evaluated stage, and the last stage's
    difference from the first with its 95% interval when ``summary["intervals"]`` has it; above it,
    :data:`SMOKE_TEST` when the summary is the quick demo's."""
    stages = summary["stages"]
    intervals = summary.get("intervals") or {}
    rows = [
        ["metric", *(s["stage"] for s in stages)]
        + ([f"{stages[-1]['stage']} - {stages[0]['stage']} [95%]"] if intervals else [])
    ]
    for key, label in (*TABLE_METRICS, ("seconds/train", "train seconds"), ("seconds/eval", "eval seconds")):
        values = [s["metrics"].get(key) for s in stages]
        if all(v is None for v in values):
            continue
        row = [label, *("-" if v is None else f"{v:.0f}" if key.startswith("seconds") else f"{v:.3f}" for v in values)]
        if intervals:
            iv = intervals.get(key)
            row.append(Interval(**iv).text() if iv else "-")
        rows.append(row)
    lines = _aligned(rows)
    video = summary.get("video") or {}
    if video.get("stages"):
        lines += ["", f"video task ({MOVED_QUESTION!r}, {video['model']}, its own SFT and GRPO):"]
        lines += _aligned(_metric_rows(video["stages"], VIDEO_METRICS))
    extra = ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items())
    banner = [SMOKE_TEST, ""] if summary.get("quick") else []
    return "\n".join(banner + lines) + f"\n\nstage wall times: {extra}"


def _metric_rows(stages: list[dict[str, Any]], metrics: tuple[tuple[str, str], ...]) -> list[list[str]]:
    """A header of stage names, then one row per metric any stage has (seconds last)."""
    rows = [["metric", *(s["stage"] for s in stages)]]
    for key, label in (*metrics, ("seconds/train", "train seconds"), ("seconds/eval", "eval seconds")):
        values = [s["metrics"].get(key) for s in stages]
        if any(v is not None for v in values):
            fmt = "{:.0f}" if key.startswith("seconds") else "{:.3f}"
            rows.append([label, *("-" if v is None else fmt.format(v) for v in values)])
    return rows


def _aligned(rows: list[list[str]]) -> list[str]:
    """``rows`` as text columns (the first left-aligned, the others right-aligned) under a rule."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
