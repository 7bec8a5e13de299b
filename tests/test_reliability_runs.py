"""Nothing lost, nothing silent (issue 19), end to end on the tiny Qwen2-VL: a finished run that a
second command must not touch, a killed run whose resumed metrics equal the uninterrupted run's
row for row, one-line errors for bad options, and extra image columns checked at load time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlalign.config import load_config
from vlalign.data.schema import DataError, DataFileNotFoundError
from vlalign.recipes import dpo, sft
from vlalign.recipes.common import DataConfig, load_split
from vlalign.recipes.preference_common import load_pairs_split
from vlalign.training.metrics import read_metrics
from vlalign.training.runfolder import RunFolderError


def _args(model_dir: Path, world: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={world / 'train.jsonl'}",
        f"--data.eval={world / 'validation.jsonl'}",
        f"--train.output_dir={out}",
        "--train.batch_size=4",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        *extra,
    ]


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timing fields (wall-clock time, throughput, peak memory)."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in read_metrics(run_dir)]


def test_dpo_resume_on_a_finished_sft_folder_refuses_and_touches_nothing(tiny_model_dir, world_dir, tmp_path):
    out = tmp_path / "run"
    sft.run(
        load_config(
            sft.Config, None, _args(tiny_model_dir("qwen2_vl"), world_dir, out, "--train.max_steps=1", "--data.limit=8")
        )
    )
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    args = _args(tiny_model_dir("qwen2_vl"), world_dir, out, "--train.max_steps=1", "--train.resume=true")
    with pytest.raises(RunFolderError, match=r"holds a finished `vlalign sft` run, not a `dpo` run"):
        dpo.run(load_config(dpo.Config, None, args))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_metrics_rows(
    tiny_model_dir, world_dir, tmp_path, vlalign_process, kill_after
):
    """SIGKILL after the step-4 checkpoint, then --resume: metrics.jsonl equals the uninterrupted
    run's row for row (losses, grad norms, lr, drop counters, the final evaluation row), timing
    fields aside. Slow (about a minute): two runs of 8 steps and a killed one, in subprocesses."""
    common = ["--train.max_steps=8", "--train.save_every=2", "--train.keep_checkpoints=1", "--data.limit=40"]
    model_dir = tiny_model_dir("qwen2_vl")
    whole = tmp_path / "whole"
    sft.run(load_config(sft.Config, None, _args(model_dir, world_dir, whole, *common)))
    broken = tmp_path / "broken"
    proc = vlalign_process(["sft", *_args(model_dir, world_dir, broken, *common)], tmp_path / "cache")
    kill_after(proc, broken / "checkpoints" / "step-0000004" / "state.json")
    resumed = vlalign_process(["sft", *_args(model_dir, world_dir, broken, *common), "--resume"], tmp_path / "cache")
    assert resumed.wait(timeout=300) == 0
    assert _rows(broken) == _rows(whole)
    assert [r["step"] for r in _rows(broken)][-2:] == [8, 8]  # the last step's row, then the final evaluation


def test_a_bad_option_value_is_one_line_before_any_model_loads(tmp_path):
    """The model named does not exist: the option check must come first, and the CLI prints the
    error as one line with exit status 2."""
    args = [
        "sft",
        "--model.name_or_path=/nonexistent",
        f"--train.output_dir={tmp_path / 'run'}",
        "--train.batch_size=0",
    ]
    done = subprocess.run([sys.executable, "-m", "vlalign.cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.batch_size: must be > 0, got 0" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_missing_data_file_names_the_option(tmp_path):
    cfg = DataConfig(train=str(tmp_path / "train.jsonl"))
    with pytest.raises(DataFileNotFoundError, match=r"^data\.train: data file .*train\.jsonl' does not exist"):
        load_split(cfg.train, "supervised", cfg)


def test_a_missing_rejected_image_is_named_at_load_and_can_be_skipped(tmp_path):
    """mDPO's rejected_images are opened at load time: a missing one names the sample and the
    column, and data.skip_bad_rows counts it instead."""
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "a_blur.png")
    rows = [
        {
            "id": "ok",
            "images": ["a.png"],
            "prompt": "<image>Colour?",
            "chosen": "Red.",
            "rejected": "Red.",
            "rejected_images": ["a_blur.png"],
        },
        {
            "id": "gone",
            "images": ["a.png"],
            "prompt": "<image>Colour?",
            "chosen": "Red.",
            "rejected": "Red.",
            "rejected_images": ["missing.png"],
        },
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=str(tmp_path / "pairs.jsonl"))
    with pytest.raises(
        DataError, match=r"sample 'gone' 'rejected_images\[0\]': image file .*missing\.png' does not exist"
    ):
        load_pairs_split(cfg.train, cfg, image_conditioned_ok=True)
    cfg.skip_bad_rows = True
    kept, skipped = load_pairs_split(cfg.train, cfg, image_conditioned_ok=True)
    assert [s.id for s in kept] == ["ok"] and skipped == {"unreadable image": 1}


def test_world_refuses_a_non_empty_folder_with_a_user_error(tmp_path):
    from vlalign.commands import world
    from vlalign.errors import UserError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"is not empty; pass --overwrite=true"):
        world.run(world.Config(out=str(tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
