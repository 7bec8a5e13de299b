"""What every recipe refuses before it trains: option values before any model loads (each config
section's ``validate``), rows whose numbers a loss reads as the data loads, and a training set of
which no sample fits ``data.max_length`` before the first step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vlalign.config import ConfigError, load_config
from vlalign.data.io import write_jsonl
from vlalign.data.schema import DataError
from vlalign.recipes import dpo, grpo, kto, ppo, reward_model, sft
from vlalign.training.metrics import read_metrics

RECIPES = {"sft": sft, "dpo": dpo, "kto": kto, "rm": reward_model}


def _common(model: Path | str, out: Path) -> list[str]:
    return [
        f"--model.name_or_path={model}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.max_steps=1",
        "--train.batch_size=2",
    ]


def _pairs(recipe_world: Path, folder: Path, n: int = 6, **extra: float) -> Path:
    """``n`` preference rows over three images of the recipe world (each image a few dozen tokens)."""
    images = [str(p) for p in sorted((recipe_world / "images").rglob("*.png"))[:3]]
    rows = [
        {
            "id": f"p{i}",
            "images": [images[i % 3]],
            "prompt": "Describe the image.",
            "chosen": "The image shows a red circle.",
            "rejected": "The image shows a blue square.",
            **extra,
        }
        for i in range(n)
    ]
    path = folder / "pairs.jsonl"
    write_jsonl(rows, path)
    return path


@pytest.mark.parametrize("name", list(RECIPES))
def test_no_sample_fitting_max_length_stops_before_the_first_step(name, tiny_model_dir, recipe_world, tmp_path):
    """data.max_length=8 is shorter than every sample (each image alone is dozens of tokens): each
    recipe stops after building its collator, before a step, with the count of the probed samples,
    all too long (fewer than the collator's own safety net of 64, so only the check can stop it)."""
    out = tmp_path / "run"
    args = [*_common(tiny_model_dir("qwen2_vl"), out), "--data.max_length=8"]
    if name == "sft":
        args += [f"--data.train={recipe_world / 'train.jsonl'}", "--data.eval=", "--data.limit=5"]
        n = 5
    else:
        pairs = _pairs(recipe_world, tmp_path)
        args += [f"--data.train={pairs}", f"--data.eval={pairs}" if name == "rm" else "--data.eval="]
        args += ["--from_pairs=true"] if name == "kto" else []
        n = 12 if name == "kto" else 6  # kto: each pair gives two completions
    module = RECIPES[name]
    with pytest.raises(DataError, match=rf"^0 of {n} samples usable: {n} longer than data.max_length 8; raise"):
        module.run(load_config(module.Config, None, args))
    assert not [r for r in read_metrics(out) if "train/loss" in r]
    assert not (out / "checkpoints").exists()


def test_rm_margin_column_is_checked_as_the_data_loads(tiny_model_dir, recipe_world, tmp_path):
    """loss.margin_column names a column every row must hold as a finite number: an infinite one
    (line 1) stops the reward model's run at load time, naming the line and the column."""
    pairs = _pairs(recipe_world, tmp_path, margin=math.inf)
    args = [*_common(tiny_model_dir("qwen2_vl"), tmp_path / "run"), f"--data.train={pairs}", f"--data.eval={pairs}"]
    with pytest.raises(DataError, match=r"pairs\.jsonl line 1: column 'margin' is inf, not a finite number"):
        reward_model.run(load_config(reward_model.Config, None, [*args, "--loss.margin_column=margin"]))


@pytest.mark.parametrize(
    ("module", "option", "message"),
    [
        (ppo, "--ppo.lam=1.5", "ppo.lam: must be in [0, 1], got 1.5"),
        (grpo, "--grpo.overlong_factor=-1", "grpo.overlong_factor: must be >= 0, got -1.0"),
        (ppo, "--critic.vf_coef=-0.5", "critic.vf_coef: must be >= 0, got -0.5"),
        (dpo, "--loss.ddpo_min_match=0", "loss.ddpo_min_match: must be >= 1, got 0"),
        (kto, "--loss.beta=0", "loss.beta: must be > 0, got 0.0"),
    ],
)
def test_an_invalid_option_fails_before_the_model_loads(module, option, message, recipe_world, tmp_path):
    """An invalid value stops the run with one line naming the option, its rule and its value;
    the model path does not exist, so an error from loading it would say so instead."""
    args = [*_common(tmp_path / "no-such-model", tmp_path / "run"), option]
    if module in (grpo, ppo):
        args += [f"--data.train={recipe_world / 'train_prompts.jsonl'}", "--data.eval="]
        args += ["--rewards.weights={count_match: 1.0}"] if module is ppo else []
    else:
        args += [f"--data.train={_pairs(recipe_world, tmp_path)}", "--data.eval="]
    with pytest.raises(ConfigError) as info:
        module.run(load_config(module.Config, None, args))
    assert str(info.value) == message


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_missing_data_file_fails_before_the_model_loads(name, tmp_path):
    """A data file that is not there is named with its option before any model loads: the model
    path does not exist either, so an error from loading it would say so instead."""
    module = RECIPES[name]
    args = [*_common(tmp_path / "no-such-model", tmp_path / "run"), f"--data.train={tmp_path / 'nope.jsonl'}"]
    with pytest.raises(DataError) as info:
        module.run(load_config(module.Config, None, [*args, "--data.eval="]))
    assert str(info.value) == f"data.train: no file or folder {str(tmp_path / 'nope.jsonl')!r}"
    assert not (tmp_path / "run").exists()
