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

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlalign.config import load_config
from vlalign.data.annotations import load_vocabulary
from vlalign.data.collate import encode_completions, encode_prompts, pad_token_id_of
from vlalign.data.io import load_samples, write_samples
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.data.schema import DataError, user_prompt
from vlalign.models.load import find_parts, load_model_and_processor
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.tiny import ARCHITECTURES
from vlalign.recipes import dpo
from vlalign.training import BatchPlan
from vlalign.training.distributed import FSDP2_CPU
from vlalign.training.metrics import read_metrics
from vlalign.training.sharded_vision import vision_parity

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


def _one_and_two_processes(model_dir: Path, pairs: Path, tmp_path: Path, launch, **launch_kw) -> str:
    """One process with 2 micro-batches of 1, then two processes with 1 each (mixed at every step);
    the losses, and the final weights of every tensor, equal (the tolerances above); the vision
    tower trained. Returns the two-process launch's output."""
    common = [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={pairs}",
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
    done = launch("dpo", [*common, "--train.grad_accum=1", f"--train.output_dir={two}"], **launch_kw)

    steps_a = [r for r in read_metrics(one) if "train/loss" in r]
    steps_b = [r for r in read_metrics(two) if "train/loss" in r]
    assert len(steps_a) == len(steps_b) == STEPS
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5, abs=1e-6)
    wa = load_file(str(one / "model" / "model.safetensors"))
    wb = load_file(str(two / "model" / "model.safetensors"))
    start = load_file(str(model_dir / "model.safetensors"))
    vision = [k for k in wa if "visual.blocks." in k]
    assert vision and any(not torch.equal(wa[k], start[k]) for k in vision)  # the vision tower trained
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=2e-5)
    return done.stdout


def test_text_only_and_image_processes_match_one_process(tiny_model_dir, mixed_pairs, tmp_path, launch_two_processes):
    _one_and_two_processes(tiny_model_dir("qwen2_vl"), mixed_pairs, tmp_path, launch_two_processes)


@pytest.mark.slow
def test_text_only_and_image_processes_under_fsdp2_match_one_process(
    tiny_model_dir, mixed_pairs, tmp_path, launch_two_processes, monkeypatch
):
    """The same under FSDP2 (``VLALIGN_FSDP2_CPU=1``: the vision blocks, decoder layers and the rest
    sharded with ``fully_shard``). The text-only process runs the vision tower on a blank image at
    each language-model call (:mod:`vlalign.training.sharded_vision`) and adds 0 times its features:
    the collectives match and its vision gradients are exact zeros. Without that, the image-bearing
    process waits in the vision blocks' all-gathers while the other gathers the decoder layers: gloo
    fails or hangs, so the launch has a timeout (a hang fails the test in minutes, not hours).
    Slow: one unsharded and one two-process sharded run of 3 steps (about 40 s here)."""
    monkeypatch.setenv(FSDP2_CPU, "1")
    out = _one_and_two_processes(tiny_model_dir("qwen2_vl"), mixed_pairs, tmp_path, launch_two_processes, timeout=240)
    assert "sharded with fully_shard over 2 processes" in out  # FSDP2 ran, not DDP


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_blank_image_gives_the_gradients_an_image_gives_all_zero(arch, tiny_model_dir, recipe_world):
    """What a text-only process under FSDP2 adds (:meth:`VisionParity.blank_features`, on every tiny
    architecture): exactly 0.0, on the graph. FSDP2 reduce-scatters only the parameters that have a
    gradient, so a text-only forward plus that term must give a gradient to exactly the parameters
    that an image-bearing forward gives one (same set, vision tower, projector and all), and those
    of the vision tower and projector must be exact zeros. Two architectures are outside this:
    Mllama (cross-attention, no ``get_image_features``: vision_parity declines it, so under FSDP
    every micro-batch must hold an image) and PaliGemma (no text-only prompts at all)."""
    model, processor = load_model_and_processor(tiny_model_dir(arch), device="cpu", dtype="float32")
    sample = load_samples(recipe_world / "train.jsonl", "supervised")[0]
    text_only = copy.deepcopy(sample)
    text_only.images, text_only.prompt = [], user_prompt("Describe a red square.", 0)
    if arch == "mllama":  # cross-attention to the image: no get_image_features, no blank forward
        assert vision_parity([model], processor) == []
        return
    if arch == "paligemma":  # its processor refuses a prompt without an image: nothing to mix
        with pytest.raises(DataError, match="images"):
            encode_prompts(processor, [text_only])
        return
    [parity] = vision_parity([model], processor)

    def with_gradient(s, extra=None) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        scored = completion_logprobs(
            model,
            encode_prompts(processor, [s]),
            encode_completions(processor, [["a red square"]]),
            pad_token_id=pad_token_id_of(processor),
        )
        loss = scored.logps[scored.mask].sum()
        (loss if extra is None else loss + extra()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with_image = with_gradient(sample)
    assert parity.dummies == 0  # unsharded: the hook adds nothing
    without = with_gradient(text_only)
    blank = with_gradient(text_only, parity.blank_features)
    assert parity.dummies == 1
    parts = find_parts(model)
    seeing = [n for n in with_image if any(n.startswith(f"{q}.") for q in (parts.vision, *parts.projectors))]
    assert seeing and not any(n in without for n in seeing)  # the text-only forward alone misses them
    assert blank.keys() == with_image.keys()
    assert all(not blank[n].any() for n in seeing)
