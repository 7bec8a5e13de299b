"""The shapes world's video task ("Which shape moved?"): clips, rows, frames, and worlds without it unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlalign.data.io import load_samples
from vlalign.data.schema import PromptSample
from vlalign.shapes.render import render_scene
from vlalign.shapes.rewards import shapes_answer
from vlalign.shapes.tasks import manifest_config, read_manifest, write_world
from vlalign.shapes.video import MOVED_QUESTION, VIDEO_FRAMES, Clip, make_clip
from vlalign.shapes.world import Scene, WorldConfig, WorldObject, generate_split


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _small(**overrides) -> WorldConfig:
    base = dict(n_train=6, n_validation=2, n_test=2, n_compositional=0, pope_splits=(), image_size=48, supersample=1)
    return WorldConfig(**{**base, **overrides})


def test_a_clip_moves_one_object_one_cell_into_a_free_cell():
    """Grid 3 (cells of 1/3), objects in cells (row, col) (0, 0), (0, 1), (1, 0), (1, 1): the disc at
    (0, 0) has no free neighbour; the square at (0, 1) can go to (0, 2) only, the triangle at (1, 0)
    to (2, 0) only, the star at (1, 1) to (1, 2) or (2, 1). Centres below are in cell units (x, y).
    A full grid leaves no clip."""
    cfg = WorldConfig()
    third = 1 / 3
    objects = (
        WorldObject("circle", "red", 0.2, 0.5 * third, 0.5 * third),
        WorldObject("square", "blue", 0.2, 1.5 * third, 0.5 * third),
        WorldObject("triangle", "green", 0.2, 0.5 * third, 1.5 * third),
        WorldObject("star", "yellow", 0.2, 1.5 * third, 1.5 * third),
    )
    allowed = {1: [(2.5, 0.5)], 2: [(0.5, 2.5)], 3: [(2.5, 1.5), (1.5, 2.5)]}
    for k in range(20):
        clip = make_clip(cfg, Scene(f"train-{k:06d}", "train", objects))
        assert clip is not None and clip.moved in allowed
        end = (round(clip.end[0] / third, 4), round(clip.end[1] / third, 4))
        assert end in allowed[clip.moved]
    full = tuple(
        WorldObject("circle", "red", 0.2, (c + 0.5) * third, (r + 0.5) * third) for r in range(3) for c in range(3)
    )
    assert make_clip(cfg, Scene("train-000000", "train", full)) is None


def test_frames_interpolate_from_the_scene():
    """Frame 0 is the scene itself; frame t puts the object at start + t/3 (end - start)."""
    scene = Scene(
        "s", "train", (WorldObject("circle", "red", 0.2, 0.2, 0.2), WorldObject("square", "blue", 0.2, 0.8, 0.8))
    )
    clip = Clip(scene, 0, (0.2, 0.2), (0.5, 0.2))
    assert clip.frame(0) == scene
    assert [clip.frame(t).objects[0].x for t in range(VIDEO_FRAMES)] == [0.2, 0.3, 0.4, 0.5]
    assert all(clip.frame(t).objects[1] == scene.objects[1] for t in range(VIDEO_FRAMES))


def test_write_world_with_clips(tmp_path):
    cfg = _small(video_clips=3)
    manifest = write_world(cfg, tmp_path)
    assert manifest["config"]["video_clips"] == 3
    rows = read_jsonl(tmp_path / "train_video_prompts.jsonl")
    assert len(rows) == 3 and manifest["files"]["train_video.jsonl"]["rows"] == 3
    scenes = {s.id: s for s in generate_split(cfg, "train")}
    for row in rows:
        scene = scenes[row["scene_id"]]
        video, text = row["prompt"][0]["content"]
        assert text == {"type": "text", "text": MOVED_QUESTION} and video["fps"] == 1.0
        assert len(video["video"]) == VIDEO_FRAMES
        assert row["answer"] == row["moved_object"] and row["answer"] in row["objects"]
        first = np.asarray(render_scene(scene, cfg))
        frames = [np.asarray(Image.open(tmp_path / p)) for p in video["video"]]
        assert np.array_equal(frames[0], first)  # the clip starts at the scene
        assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))  # something moves each frame
        step = abs(row["moved_to"][0] - row["moved_from"][0]) + abs(row["moved_to"][1] - row["moved_from"][1])
        assert step == pytest.approx(1 / cfg.grid, abs=1e-4)
    samples = load_samples(tmp_path / "train_video.jsonl", "supervised")
    assert [s.completion for s in samples] == [r["answer"] for r in rows]
    first_frame = rows[0]["prompt"][0]["content"][0]["video"][0]
    assert samples[0].images == [] and samples[0].prompt[0]["content"][0]["video"][0] == str(tmp_path / first_frame)
    assert samples[0].meta["task"] == "moved"


def test_worlds_without_clips_are_unchanged(tmp_path):
    """video_clips = 0 (the default) writes no video file and no ``video_clips`` key in the manifest;
    every other file is byte-identical to a world written with clips."""
    plain = write_world(_small(), tmp_path / "plain")
    with_clips = write_world(_small(video_clips=2), tmp_path / "clips")
    assert "video_clips" not in plain["config"]
    assert not (tmp_path / "plain" / "videos").exists()
    assert not any("video" in name for name in plain["files"])
    shared = {k: v for k, v in with_clips["files"].items() if "video" not in k}
    assert shared == plain["files"]
    # the embedded world's cache check compares the manifest with manifest_config: equal, so it is not rewritten
    for name, cfg in (("plain", _small()), ("clips", _small(video_clips=2))):
        assert read_manifest(tmp_path / name)["config"] == json.loads(json.dumps(manifest_config(cfg)))


def test_negative_clip_count_is_refused():
    with pytest.raises(ValueError, match="video_clips"):
        _small(video_clips=-1)


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("The red circle moved.", 1.0),
        ("red circle", 1.0),
        ("The blue square.", 0.0),
        ("A red circle and a blue square.", 0.0),
        ("Nothing moved.", 0.0),
    ],
)
def test_moved_answers_are_rewarded(completion, reward):
    """``shapes_answer`` on a video row: 1 for naming exactly the moved object, 0 for another or several."""
    sample = PromptSample("v", [], [], meta={"task": "moved", "moved_object": "red circle"})
    assert shapes_answer(completion, sample) == reward
