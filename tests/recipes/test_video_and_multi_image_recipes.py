"""SFT, DPO and GRPO run a step on prompts with a video (frame files) and on prompts with two images.

Rows in the documented formats (``docs/data-formats.md``): a video is a ``{"type": "video", "video":
[frame paths]}`` prompt part with paths relative to the data file; two images are two
``{"type": "image"}`` parts and an ``images`` list of two paths. Each recipe's own ``run`` takes one
step on the tiny model: the loss is finite and some weight moved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from vlalign.config import load_config
from vlalign.recipes import dpo, grpo, sft
from vlalign.training.metrics import read_metrics

COLOURS = [(220, 30, 30), (30, 60, 220), (30, 160, 60), (230, 200, 20)]


def _frame(px: int, disc_x: int, colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (px, px), "white")
    ImageDraw.Draw(image).ellipse([disc_x, 8, disc_x + 10, 18], fill=colour)
    return image


def _write_data(root: Path) -> dict[str, Path]:
    """Four clips of 4 frames (a disc moving right) and four image pairs, as SFT, DPO and prompt rows."""
    video_rows, image_rows = [], []
    for k, colour in enumerate(COLOURS):
        names = []
        for t in range(4):
            name = f"clips/c{k}/f{t}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            _frame(32, 2 + 5 * t, colour).save(root / name)
            names.append(name)
        prompt = [
            {"role": "user", "content": [{"type": "video", "video": names}, {"type": "text", "text": "Which way?"}]}
        ]
        video_rows.append({"id": f"v{k}", "prompt": prompt, "answer": "right"})
        pair = [f"pairs/p{k}-{j}.png" for j in range(2)]
        (root / "pairs").mkdir(exist_ok=True)
        _frame(32, 4, colour).save(root / pair[0])
        _frame(32, 18, COLOURS[(k + 1) % 4]).save(root / pair[1])
        two = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same colour?"}],
            }
        ]
        image_rows.append({"id": f"i{k}", "images": pair, "prompt": two, "answer": "no"})
    files = {}
    for name, rows in (("video", video_rows), ("images", image_rows)):
        for kind, extra in (
            ("sft", lambda r: {"completion": r["answer"]}),
            ("dpo", lambda r: {"chosen": r["answer"], "rejected": "up"}),
            ("prompts", lambda r: {}),
        ):
            path = root / f"{name}-{kind}.jsonl"
            path.write_text(
                "".join(json.dumps({k: v for k, v in r.items() if k != "answer"} | extra(r)) + "\n" for r in rows)
            )
            files[f"{name}-{kind}"] = path
    return files


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _write_data(tmp_path_factory.mktemp("video-recipes"))


@pytest.fixture(scope="module")
def reward(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("video-reward") / "parity_reward.py"
    path.write_text("def parity(completion, sample):\n    return float(sum(map(ord, completion)) % 2)\n")
    return f"{path}:parity"


def _args(start: Path, out: Path, train: Path) -> list[str]:
    return [
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
        f"--data.train={train}",
        f"--data.eval={train}",  # the held-out loss on the same rows (not the shapes world's validation file)
    ]


@pytest.mark.parametrize(("arch", "inputs"), [("qwen3_vl", "video"), ("qwen2_vl", "images")])
@pytest.mark.parametrize("recipe", ["sft", "dpo", "grpo"])
def test_one_step_on_videos_and_image_pairs(arch, inputs, recipe, data, reward, tiny_model_dir, tmp_path):
    module, kind, extra = {
        "sft": (sft, "sft", []),
        "dpo": (dpo, "dpo", []),
        "grpo": (
            grpo,
            "prompts",
            [f"--rewards.weights={{{reward}: 1.0}}", "--rollout.n=4", "--rollout.max_new_tokens=6", "--eval_tasks=[]"],
        ),
    }[recipe]
    start, out = tiny_model_dir(arch), tmp_path / "run"
    module.run(load_config(module.Config, None, _args(start, out, data[f"{inputs}-{kind}"]) + extra))
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0]), losses
    a, b = load_file(start / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in b if k in a), "the step left every weight as it was"
