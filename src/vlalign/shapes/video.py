"""The shapes world's video task: "Which shape moved?" over a short clip of a scene.

A clip is a scene of the world in which one object slides from its grid cell into a free
neighbouring cell over :data:`VIDEO_FRAMES` frames (evenly spaced, the first at its place, the
last one cell away), the other objects standing still. Its path stays inside those two cells, so it
never overlaps another object and never leaves the image. The answer is the moving object's name
(``"red circle"``). Written by :func:`vlalign.shapes.tasks.write_world` when
``WorldConfig.video_clips`` > 0 (off by default: existing worlds are unchanged)::

    videos/<split>/<scene id>/frame<t>.png   the frames of each clip
    <split>_video.jsonl                      supervised rows (prompt with a video part + completion)
    <split>_video_prompts.jsonl              the same as prompt-only rows

Rows hold ``{"type": "video", "video": [frame paths], "fps": 1.0}`` in their prompt (paths relative
to the world folder) and no ``images``; ground truth: ``task`` ("moved"), ``answer``,
``moved_object``, ``moved_from`` / ``moved_to`` (centres, fractions of the side), ``objects``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vlalign.shapes.render import render_scene
from vlalign.shapes.world import Scene, WorldConfig

VIDEO_FRAMES = 4
"""Frames of a clip."""
VIDEO_FPS = 1.0
"""Frame rate written into each video part (timestamps of processors that write them)."""
VIDEO_TASK = "moved"
MOVED_QUESTION = "Which shape moved?"
_STEPS = ((0, 1), (0, -1), (1, 0), (-1, 0))


@dataclass(frozen=True)
class Clip:
    """One object of ``scene`` moving from ``start`` to ``end`` (centres, fractions of the side)."""

    scene: Scene
    moved: int
    """Index of the moving object in ``scene.objects``."""
    start: tuple[float, float]
    end: tuple[float, float]

    def frame(self, t: int) -> Scene:
        """The scene at frame ``t`` (0 .. VIDEO_FRAMES - 1): the object at ``start + t / (F - 1) * (end - start)``."""
        f = t / (VIDEO_FRAMES - 1)
        obj = self.scene.objects[self.moved]
        x = round(self.start[0] + f * (self.end[0] - self.start[0]), 5)
        y = round(self.start[1] + f * (self.end[1] - self.start[1]), 5)
        objects = list(self.scene.objects)
        objects[self.moved] = replace(obj, x=x, y=y)
        return replace(self.scene, objects=tuple(objects))


def _cell(cfg: WorldConfig, x: float, y: float) -> tuple[int, int]:
    return min(int(y * cfg.grid), cfg.grid - 1), min(int(x * cfg.grid), cfg.grid - 1)


def make_clip(cfg: WorldConfig, scene: Scene) -> Clip | None:
    """The clip of ``scene``: a random object with a free neighbouring cell moves into it (None if none has one)."""
    rng = random.Random(f"vlalign-shapes-video/{cfg.seed}/{scene.id}")
    taken = {_cell(cfg, o.x, o.y) for o in scene.objects}
    moves = []
    for k, obj in enumerate(scene.objects):
        row, col = _cell(cfg, obj.x, obj.y)
        for dr, dc in _STEPS:
            target = (row + dr, col + dc)
            if 0 <= target[0] < cfg.grid and 0 <= target[1] < cfg.grid and target not in taken:
                moves.append((k, dr, dc))
    if not moves:
        return None
    k, dr, dc = rng.choice(moves)
    obj, side = scene.objects[k], 1.0 / cfg.grid
    return Clip(scene, k, (obj.x, obj.y), (round(obj.x + dc * side, 5), round(obj.y + dr * side, 5)))


def frame_paths(scene: Scene) -> list[str]:
    """Paths of a clip's frames relative to the world folder."""
    return [f"videos/{scene.split}/{scene.id}/frame{t}.png" for t in range(VIDEO_FRAMES)]


def clip_row(clip: Clip, cfg: WorldConfig) -> dict[str, Any]:
    """The prompt-only row of a clip (its answer and ground truth as columns)."""
    scene, obj = clip.scene, clip.scene.objects[clip.moved]
    video = {"type": "video", "video": frame_paths(scene), "fps": VIDEO_FPS}
    return {
        "id": f"{scene.id}/{VIDEO_TASK}/0",
        "prompt": [{"role": "user", "content": [video, {"type": "text", "text": MOVED_QUESTION}]}],
        "task": VIDEO_TASK,
        "answer": obj.name,
        "split": scene.split,
        "scene_id": scene.id,
        "objects": scene.object_names(cfg),
        "moved_object": obj.name,
        "moved_from": list(clip.start),
        "moved_to": list(clip.end),
    }


def supervised_clip_row(row: dict[str, Any]) -> dict[str, Any]:
    """A clip's prompt row with its answer as the assistant completion."""
    completion = [{"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
    return {"id": row["id"], "prompt": row["prompt"], "completion": completion} | {
        k: v for k, v in row.items() if k not in ("id", "prompt")
    }


def write_clips(cfg: WorldConfig, scenes: list[Scene], out: Path) -> list[dict[str, Any]]:
    """Render the clips of the first ``cfg.video_clips`` scenes that have one; return their prompt rows."""
    rows = []
    for scene in scenes:
        if len(rows) >= cfg.video_clips:
            break
        clip = make_clip(cfg, scene)
        if clip is None:
            continue
        for t, path in enumerate(frame_paths(scene)):
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            render_scene(clip.frame(t), cfg).save(out / path, format="PNG")
        rows.append(clip_row(clip, cfg))
    return rows
