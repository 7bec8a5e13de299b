"""Video parts that name a file (``{"type": "video", "video": "clip.mp4"}``), decoded with PyAV.

transformers 5's video processors read a path with torchcodec alone (which needs FFmpeg's shared
libraries on the system); vlalign decodes a file itself with PyAV (``pip install av``; its wheels
carry FFmpeg) and hands every frame and the file's frame rate to the processor, as it does for a
list of frame files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlalign.config import load_config
from vlalign.data.collate import encode_prompts
from vlalign.data.io import load_samples
from vlalign.data.schema import DataError, PromptSample
from vlalign.data.video import read_video_file
from vlalign.recipes import dpo, grpo, sft
from vlalign.training.metrics import read_metrics

av = pytest.importorskip("av")

ARCH = "qwen2_vl"
"""A video family with the ChatML template (its video part is ``<|vision_start|><|video_pad|><|vision_end|>``)."""


def clip_frames(n: int = 4, px: int = 32, colour: tuple[int, int, int] = (220, 30, 30)) -> list[np.ndarray]:
    """``n`` frames ``(px, px, 3)`` of a disc-like block moving right 4 px a frame, on white."""
    frames = []
    for t in range(n):
        image = np.full((px, px, 3), 255, np.uint8)
        image[8:18, 4 + 4 * t : 14 + 4 * t] = colour
        frames.append(image)
    return frames


def write_clip(path: Path, frames: list[np.ndarray], *, fps: int = 2, codec: str = "libx264") -> Path:
    """Encode ``frames`` into ``path`` (``libx264``/yuv420p: an ordinary mp4; ``ffv1``/bgr0 in .mkv: lossless)."""
    pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def video_prompt(video, text: str = "Which way?", **extra) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video, **extra}, {"type": "text", "text": text}]}]


def test_a_file_decodes_to_its_frames_and_frame_rate(tmp_path):
    """A lossless clip (FFV1) of 4 frames at 2 fps decodes to exactly its frames, with metadata 4 frames,
    2.0 fps, indices 0..3; an mp4 (H.264, lossy) to 4 frames of the same size, close to them."""
    frames = clip_frames()
    decoded, meta = read_video_file(str(write_clip(tmp_path / "clip.mkv", frames, codec="ffv1")))
    assert np.array_equal(np.asarray(decoded), np.stack(frames))
    assert meta == {"total_num_frames": 4, "fps": 2.0, "frames_indices": [0, 1, 2, 3]}
    decoded, meta = read_video_file(str(write_clip(tmp_path / "clip.mp4", frames)))
    assert np.asarray(decoded).shape == (4, 32, 32, 3) and meta["total_num_frames"] == 4
    assert np.abs(np.asarray(decoded, dtype=float) - np.stack(frames)).mean() < 8
    with pytest.raises(DataError, match="does not exist"):
        read_video_file(str(tmp_path / "missing.mp4"))
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(DataError, match="cannot be decoded"):
        read_video_file(str(tmp_path / "junk.mp4"))


@pytest.mark.parametrize("arch", [ARCH, "qwen3_vl"])
def test_a_lossless_file_encodes_as_its_frame_list(arch, tiny_processor, tmp_path):
    """The same 4 frames as a lossless file (2 fps) and as frame files with ``fps: 2``: one processor
    call gives identical token ids and video tensors (Qwen3-VL: the same timestamps too)."""
    frames = clip_frames()
    clip = write_clip(tmp_path / "clip.mkv", frames, codec="ffv1")
    paths = []
    for t, frame in enumerate(frames):
        paths.append(str(tmp_path / f"f{t}.png"))
        Image.fromarray(frame).save(paths[-1])
    processor = tiny_processor(arch)
    from_file, from_frames = (
        encode_prompts(processor, [PromptSample("v", [], video_prompt(v, **extra))])
        for v, extra in ((str(clip), {}), (paths, {"fps": 2}))
    )
    assert from_file.input_ids == from_frames.input_ids
    assert from_file.vision.keys() == from_frames.vision.keys() and "pixel_values_videos" in from_file.vision
    for key, value in from_frames.vision.items():
        assert torch.equal(from_file.vision[key], value), key


def _write_rows(root: Path) -> dict[str, Path]:
    """Four mp4 clips (a block of one of four colours moving right) as SFT, DPO and prompt rows with
    paths relative to the data files."""
    colours = [(220, 30, 30), (30, 60, 220), (30, 160, 60), (230, 200, 20)]
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, colour in enumerate(colours):
        write_clip(root / "clips" / f"c{k}.mp4", clip_frames(colour=colour))
        rows.append({"id": f"v{k}", "prompt": video_prompt(f"clips/c{k}.mp4")})
    files = {}
    for kind, extra in (
        ("sft", {"completion": "right"}),
        ("dpo", {"chosen": "right", "rejected": "up"}),
        ("prompts", {}),
    ):
        files[kind] = root / f"{kind}.jsonl"
        files[kind].write_text("".join(json.dumps(r | extra) + "\n" for r in rows))
    return files


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _write_rows(tmp_path_factory.mktemp("video-files"))


def test_rows_with_a_file_resolve_its_path(rows):
    (sample,) = load_samples(rows["sft"], "supervised")[:1]
    assert sample.prompt[0]["content"][0]["video"] == str(rows["sft"].parent / "clips" / "c0.mp4")


@pytest.mark.parametrize("recipe", ["sft", "dpo", "grpo"])
def test_one_step_on_mp4_clips(recipe, rows, tiny_model_dir, tmp_path):
    """Each recipe's ``run`` takes one step on the tiny Qwen2-VL from rows whose video is an mp4 file:
    the loss is finite and some weight moved."""
    reward = tmp_path / "parity_reward.py"
    reward.write_text("def parity(completion, sample):\n    return float(sum(map(ord, completion)) % 2)\n")
    module, kind, extra = {
        "sft": (sft, "sft", []),
        "dpo": (dpo, "dpo", []),
        "grpo": (
            grpo,
            "prompts",
            [f"--rewards.weights={{{reward}:parity: 1.0}}", "--rollout.n=4", "--rollout.max_new_tokens=6"],
        ),
    }[recipe]
    start, out = tiny_model_dir(ARCH), tmp_path / "run"
    args = [
        f"--model.name_or_path={start}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--train.warmup_ratio=0",
        "--train.max_steps=1",
        "--train.batch_size=2",
        "--train.lr=1e-3",
        f"--data.train={rows[kind]}",
        f"--data.eval={rows[kind]}",
    ]
    if recipe == "grpo":
        args.append("--eval_tasks=[]")
    module.run(load_config(module.Config, None, args + extra))
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0]), losses
    a, b = load_file(start / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in b if k in a), "the step left every weight as it was"
