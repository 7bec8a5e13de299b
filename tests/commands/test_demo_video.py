"""The demo's video stages as planned (no stage runs here; ``tests/commands/test_demo.py`` runs them)."""

from __future__ import annotations

from vlalign.commands import demo
from vlalign.config import load_config
from vlalign.shapes.world import DEMO_WORLD


def _stages(*args: str) -> dict:
    return {s.name: s for s in demo.build_stages(load_config(demo.Config, None, ["--output_dir=d", *args]))}


def test_the_demo_world_adds_clips_and_the_video_stages_follow():
    """The demo's world is DEMO_WORLD (which writes no clip) plus ``video_clips``; the video stages come
    after the image stages, read only the world, and train the video model, not the demo model."""
    assert "video_clips" not in DEMO_WORLD
    stages = _stages()
    names = list(stages)
    assert names[-4:] == list(demo.VIDEO_STAGES) and names.index("eval-grpo") == len(names) - 5
    assert stages["world"].settings["video_clips"] == demo.VIDEO_CLIPS
    assert {k: v for k, v in stages["world"].settings.items() if k not in ("seed", "video_clips")} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in DEMO_WORLD.items()
    }
    sft = stages["video-sft"]
    assert sft.after == ["world"] and sft.settings["model"] == "tiny:qwen2_vl:small"
    assert stages["video-grpo"].after == ["video-sft"] and stages["video-grpo"].settings["grpo.tasks"] == ["moved"]
    assert stages["eval-video-sft"].settings["data"] == "d/world/test_video_prompts.jsonl"
    assert all(not s.label for n, s in stages.items() if n in demo.VIDEO_STAGES)  # not in the image table
    quick = _stages("--quick")
    assert quick["world"].settings["video_clips"] == 40 and quick["video-sft"].settings["train.max_steps"] == 10


def test_no_video_model_no_video_stages():
    assert not set(demo.VIDEO_STAGES) & set(_stages("--video_model=")), "--video_model='' skips them"


def test_the_video_table_follows_the_demo_table():
    summary = {
        "stages": [{"stage": "base", "metrics": {"task/colour": 0.5, "seconds/train": 10.0}}],
        "stage_seconds": {"world": 1.0},
        "video": {
            "model": "tiny:qwen2_vl:small",
            "stages": [
                {"stage": "sft", "metrics": {"task/moved": 0.25, "seconds/train": 60.0, "seconds/eval": 5.0}},
                {"stage": "grpo", "metrics": {"task/moved": 0.5, "kl/seq": 0.125, "seconds/train": 30.0}},
            ],
        },
    }
    text = demo.format_summary(summary)
    table = text.split("video task ('Which shape moved?', tiny:qwen2_vl:small, its own SFT and GRPO):\n")[1]
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "sft", "grpo"]
    assert lines[2].split() == ["moved", "accuracy", "0.250", "0.500"]
    assert lines[3].split()[-2:] == ["-", "0.125"]  # KL per token: no stage has it, no row
    assert lines[4].split()[-2:] == ["60", "30"] and lines[5].split()[-2:] == ["5", "-"]
    assert lines[6:] == ["", "stage wall times: world 1s"]
    assert text.index("colour") < text.index("video task")
    assert "video task" not in demo.format_summary({**summary, "video": {}})
