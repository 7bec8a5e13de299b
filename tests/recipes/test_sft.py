"""``vlalign sft``: the loop learns, resumes exactly after a kill, and names bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlalign.config import load_config
from vlalign.recipes import sft
from vlalign.training.metrics import read_metrics


def _args(model_dir: Path, world: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={world / 'train.jsonl'}",
        f"--data.eval={world / 'validation.jsonl'}",
        f"--train.output_dir={out}",
        "--train.batch_size=4",
        "--train.lr=3e-3",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        *extra,
    ]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


def test_sft_learns_on_a_fixed_batch(tiny_model_dir, recipe_world, tmp_path):
    """Twenty steps on one fixed batch of four samples (grad_accum splits it in two micro-batches):
    the loss must fall well below its start (a broken loss mask or label shift would not)."""
    cfg = load_config(
        sft.Config,
        None,
        _args(
            tiny_model_dir("qwen2_vl"),
            recipe_world,
            tmp_path / "run",
            "--data.limit=4",
            "--train.max_steps=20",
            "--train.batch_size=2",
            "--train.grad_accum=2",
            "--train.warmup_ratio=0",
            "--train.save_every=0",
        ),
    )
    final = sft.run(cfg)
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert final["eval/loss"] > 0


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_losses(tiny_model_dir, recipe_world, tmp_path, vlalign_process, kill_after):
    """A run killed (SIGKILL) after its step-4 checkpoint and resumed logs exactly the losses of
    an uninterrupted run: same data order, optimiser, schedule and RNG states."""
    model_dir = tiny_model_dir("qwen2_vl")
    common = ["--train.max_steps=8", "--train.save_every=2", "--train.keep_checkpoints=1"]
    whole = tmp_path / "whole"
    sft.run(load_config(sft.Config, None, _args(model_dir, recipe_world, whole, *common)))

    broken = tmp_path / "broken"
    proc = vlalign_process(["sft", *_args(model_dir, recipe_world, broken, *common)], tmp_path / "cache")
    kill_after(proc, broken / "checkpoints" / "step-0000004" / "state.json")
    assert not (broken / "model").exists()  # it really was interrupted before the end

    resumed = vlalign_process(["sft", *_args(model_dir, recipe_world, broken, *common), "--resume"], tmp_path / "cache")
    assert resumed.wait(timeout=300) == 0
    assert _losses(broken) == _losses(whole)
    assert [s for s, _ in _losses(broken)] == list(range(1, 9))


def test_existing_run_folder_is_not_clobbered(tiny_model_dir, recipe_world, tmp_path):
    args = _args(tiny_model_dir("qwen2_vl"), recipe_world, tmp_path / "run", "--train.max_steps=1", "--data.limit=8")
    sft.run(load_config(sft.Config, None, args))
    with pytest.raises(FileExistsError, match="pass --resume"):
        sft.run(load_config(sft.Config, None, args))


def test_missing_data_file_is_named(tiny_model_dir, tmp_path):
    cfg = load_config(sft.Config, None, _args(tiny_model_dir("qwen2_vl"), tmp_path, tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        sft.run(cfg)
