"""A small demo folder written by hand (``small_demo``): two stages, a four-colour world of three
images, and what a person reading its report should see.

- ``base`` -> ``dpo``: scene ``s0``'s description loses its hallucinated green triangle, scene
  ``s1``'s gains a hallucinated red circle, scene ``s2``'s stays word for word: 2 of 3 changed,
  1 with fewer hallucinated objects, 1 with more, 0 with as many.
- the DPO model's sequence KL (k1) is -0.02: sampling noise, not a negative divergence.
- SFT logged three steps (curves); DPO logged one step only (numbers, not curves).
- ``demo_summary.json`` holds counts and timings (``seconds/train``, ``chair/n``) beside the
  headline metrics, nested wall times (``stage_seconds``) and the intervals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

VOCAB = {"red circle": ["red circles", "red disc"], "blue square": ["blue squares"], "green triangle": []}


def _describe(i: int, output: str, objects: list[str], hallucinated: list[str]) -> dict[str, Any]:
    return {
        "part": "heldout",
        "id": f"s{i}-describe",
        "task": "describe",
        "image": f"images/s{i}.png",
        "output": output,
        "objects": objects,
        "hallucinated": hallucinated,
        "recalled": objects,
        "mentions": 1 + len(hallucinated),
    }


BASE = [
    _describe(0, "A red circle and a green triangle.", ["red circle"], ["green triangle"]),
    _describe(1, "A blue square.", ["blue square"], []),
    _describe(2, "A green triangle.", ["green triangle"], []),
]
DPO = [
    _describe(0, "A red circle.", ["red circle"], []),
    _describe(1, "A blue square and a red circle.", ["blue square"], ["red circle"]),
    _describe(2, "A  green triangle.", ["green triangle"], []),  # white space aside, unchanged
]
METRICS = {
    "base": {
        "chair/chair_i": 0.25,
        "chair/chair_s": 1 / 3,
        "chair/n": 3.0,
        "pope/adversarial/f1": 0.8,
        "pope/adversarial/yes_ratio": 0.55,
        "task/counting": 0.5,
        "seconds/train": 61.25,
    },
    "dpo": {
        "chair/chair_i": 0.25,
        "chair/chair_s": 1 / 3,
        "chair/n": 3.0,
        "pope/adversarial/f1": 0.85,
        "pope/adversarial/yes_ratio": 0.5,
        "task/counting": 0.75,
        "kl/seq": -0.02,
        "kl/token_k3": 0.004,
        "seconds/train": 1297.5,
    },
}


def _world(folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    for i, colour in enumerate(("red", "blue", "green")):
        image = Image.new("RGB", (48, 48), "white")
        ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=colour)
        image.save(folder / "images" / f"s{i}.png")
    (folder / "manifest.json").write_text(json.dumps({"object_vocabulary": VOCAB}))


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_demo(root: Path, *, quick: bool) -> Path:
    """Write the small demo folder into ``root`` (see the module doc); returns ``root``."""
    _world(root / "world")
    _jsonl(root / "sft" / "metrics.jsonl", [{"step": s, "train/loss": 2.0 / s, "train/lr": 1e-3} for s in (1, 2, 3)])
    _jsonl(root / "dpo" / "metrics.jsonl", [{"step": 4, "train/loss": 0.6, "rewards/margin": 0.25}])
    for stage, folder, records in (("base", "eval-base", BASE), ("dpo", "eval-dpo", DPO)):
        (root / folder).mkdir()
        payload = {"metrics": METRICS[stage], "config": {"suite": {"data": "../world"}}, "records": {"model": records}}
        (root / folder / "eval.json").write_text(json.dumps(payload))
    stages = [
        {"stage": s, "folder": f, "eval": e, "metrics": METRICS[s]}
        for s, f, e in (("base", "sft", "eval-base"), ("dpo", "dpo", "eval-dpo"))
    ]
    summary = {
        "stages": stages,
        "stage_seconds": {"world": 0.5925293900000952, "sft": 61.25, "dpo": 1297.5},
        "quick": quick,
        "intervals": {"chair/chair_i": {"a": 0.25, "b": 0.25, "difference": 0.0, "low": 0.0, "high": 0.0, "se": 0.0}},
        "total_seconds": 1359.3425,
    }
    (root / "demo_summary.json").write_text(json.dumps(summary))
    (root / "demo_config.json").write_text(json.dumps({"model": "tiny:gemma3:tiny", "quick": quick, "seed": 0}))
    return root


@pytest.fixture
def small_demo(tmp_path: Path) -> Callable[..., Path]:
    """``small_demo(quick=False) -> folder``: a fresh small demo folder under ``tmp_path``."""
    return lambda quick=False: build_demo(tmp_path / ("quick" if quick else "full"), quick=quick)
