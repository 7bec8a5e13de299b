"""A step where one process holds an image and the other a text-only sample, under DDP (two CPU
processes, gloo), with the vision tower training (full fine-tuning).

Without :func:`vlalign.training.distributed.vision_touch` the text-only process never runs the vision
tower, its vision gradient buckets never become ready and the two processes' all-reduces stop
matching: gloo aborts with "Received data size doesn't match expected size" (NCCL would hang). With
it, the text-only process contributes zero gradients for the vision tower, which is what it holds:
the run must give the losses and final weights of one process with the same global batch (2
micro-batches of 1 against 2 processes of 1; only the order of float32 additions differs, so the
tolerances of ``test_data_parallel.py``).

The data is laid out from the batch plan itself: at every step, process 0's sample has its image
and process 1's has none, so every step is mixed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlalign.config import load_config
from vlalign.data.annotations import load_vocabulary
from vlalign.data.io import load_samples, write_samples
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.data.schema import user_prompt
from vlalign.recipes import dpo
from vlalign.training import BatchPlan
from vlalign.training.metrics import read_metrics

STEPS = 3


@pytest.fixture(scope="module")
def mixed_pairs(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    pairs, _ = inject_pairs(samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(tasks=("describe",)))
    pairs = pairs[:8]
    plan = BatchPlan(len(pairs), batch_size=1, grad_accum=1, num_processes=2, seed=0)
    text_only = {i for step in range(STEPS) for mb in plan.micro_batches(step, 1) for i in mb}
    for i in text_only:
        pairs[i].images = []
        pairs[i].prompt = user_prompt("Describe a red square.", 0)
    out = tmp_path_factory.mktemp("mixed-pairs") / "pairs.jsonl"
    write_samples(pairs, out)
    return out


def test_text_only_and_image_processes_match_one_process(tiny_model_dir, mixed_pairs, tmp_path, launch_two_processes):
    common = [
        f"--model.name_or_path={tiny_model_dir('qwen2_vl')}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={mixed_pairs}",
        "--data.eval=",
        "--train.batch_size=1",
        f"--train.max_steps={STEPS}",
        "--train.lr=1e-3",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.warmup_ratio=0",
        "--train.seed=0",
    ]
    one = tmp_path / "one"
    dpo.run(load_config(dpo.Config, None, [*common, "--train.grad_accum=2", f"--train.output_dir={one}"]))
    two = tmp_path / "two"
    launch_two_processes("dpo", [*common, "--train.grad_accum=1", f"--train.output_dir={two}"])

    steps_a = [r for r in read_metrics(one) if "train/loss" in r]
    steps_b = [r for r in read_metrics(two) if "train/loss" in r]
    assert len(steps_a) == len(steps_b) == STEPS
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5, abs=1e-6)
    wa = load_file(str(one / "model" / "model.safetensors"))
    wb = load_file(str(two / "model" / "model.safetensors"))
    start = load_file(str(tiny_model_dir("qwen2_vl") / "model.safetensors"))
    vision = [k for k in wa if "visual.blocks." in k]
    assert vision and any(not torch.equal(wa[k], start[k]) for k in vision)  # the vision tower trained
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=2e-5)
