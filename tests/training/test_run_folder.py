"""Reliability of the run folder: checkpoints are data (never code), unreadable checkpoints are
named and skipped for an older one, metrics survive kills, a run folder is a contract, and
option values are refused before anything loads."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from vlalign.config import ConfigError
from vlalign.errors import UserError
from vlalign.training import Checkpointer, Run, TrainConfig, build_optimizer, build_scheduler
from vlalign.training.checkpoints import CheckpointError
from vlalign.training.metrics import METRICS_FILE, MetricsLog, read_metrics
from vlalign.training.runfolder import RUN_FILE, ResumeMismatchError, RunFolderError, changed_options


class _WritesMarker:
    """A pickle that, when unpickled by an unsafe loader, creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@dataclass
class _Config:
    """A recipe-like config: a train section and one option that alters training."""

    train: TrainConfig = field(default_factory=TrainConfig)
    beta: float = 0.1


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2))


def _train(out: Path, *, desc: str = "sft", steps: int = 4, finish: bool = True, **options) -> Run:
    """A tiny loop through :class:`Run`: ``steps`` optimiser steps, a final eval row, finish."""
    beta = options.pop("beta", 0.1)
    cfg = _Config(TrainConfig(output_dir=str(out), trackers=[], progress=False, log_every=1, **options), beta)
    run = Run(cfg.train, config=cfg, desc=desc)
    net = _net()
    opt = build_optimizer(net, cfg.train)
    sched = build_scheduler(opt, cfg.train, steps)
    modules, opt = run.prepare({"model": net}, opt, sched, total=steps)
    for step in range(run.start_step, steps):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))  # data: a function of the step
        loss = modules["model"](x).pow(2).mean()
        loss.backward()
        run.clip_and_step(modules["model"].parameters(), opt, sched)
        forwards = 2 * (step + 1 - run.start_step)  # a counter of this process, as a reference model's
        run.end_step(step + 1, {"train/loss": loss, "reference/forwards": forwards})
    run.log(steps, {"eval/loss": 1.0})
    if finish:
        run.finish()
    return run


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timing fields."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in read_metrics(run_dir)]


# ----------------------------------------------------------------------------- checkpoints are data


def test_crafted_rng_pickle_is_refused_and_runs_nothing(tmp_path):
    """A checkpoint whose rng-0.pt unpickles into a call must be refused: the marker file that
    the call would create must not exist, and the error names the file."""
    ck = Checkpointer(tmp_path)
    path = ck.save(1, modules={"model": _net()})
    marker = tmp_path / "pwned"
    torch.save({"python": _WritesMarker(marker)}, path / "rng-0.pt")
    with pytest.raises(CheckpointError, match=r"rng-0\.pt.*refused as unsafe") as info:
        ck.load(path, modules={"model": _net()})
    assert not marker.exists()
    assert isinstance(info.value, UserError)


def test_truncated_weights_name_their_path(tmp_path):
    ck = Checkpointer(tmp_path)
    path = ck.save(1, modules={"model": _net()})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot load"):
        ck.load(path, modules={"model": _net()})


def test_resume_falls_back_to_the_older_checkpoint(tmp_path, capsys):
    """With the newest checkpoint truncated, --resume loads the previous one (a warning says so)
    and the run ends with the weights of the uninterrupted run."""
    whole = _train(tmp_path / "whole", steps=4)
    expected = whole.checkpointer.latest()
    _train(tmp_path / "broken", steps=4, save_every=1, keep_checkpoints=3, finish=False)
    newest = Checkpointer(tmp_path / "broken").latest()
    (newest / "optimizer.pt").write_bytes(b"not a checkpoint")
    # the folder holds an unfinished run: its newest checkpoint is step 4 (unreadable), then step 3
    run = _train(tmp_path / "broken", steps=4, save_every=1, keep_checkpoints=3, resume=True)
    assert run.start_step == 3
    assert "optimizer.pt" in capsys.readouterr().out
    from safetensors.torch import load_file

    a = load_file(str(expected / "model.safetensors"))
    b = load_file(str(Checkpointer(tmp_path / "broken").latest() / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(tmp_path / "broken") == _rows(tmp_path / "whole")
    assert [r.get("reference/forwards") for r in _rows(tmp_path / "broken")] == [2.0, 4.0, 6.0, 8.0, None]


# ----------------------------------------------------------------------------- metrics survive kills


def test_half_written_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    log = MetricsLog(tmp_path)
    for step in (1, 2):
        log.log(step, {"train/loss": 1.0})
    with open(tmp_path / METRICS_FILE, "a") as fh:
        fh.write('{"step": 3, "train/lo')
    with caplog.at_level(logging.WARNING, logger="vlalign"):
        log.truncate_after(2)
    assert "half-written" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_final_row_is_not_duplicated_after_a_kill_while_saving_the_model(tmp_path):
    """Kill after the last checkpoint and the final evaluation row (before finish): the resume
    cuts the file back to the rows the checkpoint saw, so the eval row appears once."""
    _train(tmp_path / "whole")
    _train(tmp_path / "run", finish=False)  # killed while model/ was written
    _train(tmp_path / "run", resume=True)
    assert _rows(tmp_path / "run") == _rows(tmp_path / "whole")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 4]


def test_resume_without_a_checkpoint_says_so_and_starts_clean(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / METRICS_FILE).write_text('{"step": 1, "train/loss": 9}\n')
    run = _train(tmp_path / "run", resume=True)
    assert "no complete checkpoint" in capsys.readouterr().out
    assert run.start_step == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 4]


# ----------------------------------------------------------------------------- a run folder is a contract


def test_another_command_on_a_finished_run_is_refused_and_touches_nothing(tmp_path):
    _train(tmp_path / "run", desc="sft")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(RunFolderError, match=r"holds a finished `vlalign sft` run, not a `dpo` run.*overwrite"):
        _train(tmp_path / "run", desc="dpo", resume=True, lr=0.5)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before  # config.yaml, run.json and metrics.jsonl untouched


def test_finished_run_refuses_a_second_start_and_an_empty_resume(tmp_path):
    _train(tmp_path / "run")
    with pytest.raises(
        RunFolderError,
        match=r"finished `vlalign sft` run \(newest checkpoint: step-0000004\); pass --resume with a larger",
    ):
        _train(tmp_path / "run")
    # without model/ (deleted, or a kill while the recipe rewrote it) the resume runs no step and
    # lets the recipe save the model again; with model/ in place there is nothing to resume
    run = _train(tmp_path / "run", resume=True)
    assert run.start_step == 4
    (tmp_path / "run" / "model").mkdir()
    with pytest.raises(RunFolderError, match="nothing to resume; raise --train.max_steps above 4"):
        _train(tmp_path / "run", resume=True)
    run = _train(tmp_path / "run", resume=True, max_steps=6, steps=6)  # extending is allowed
    assert run.start_step == 4
    record = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert record["status"] == "finished" and record["history"][-1]["changed"] == ["train.max_steps"]


def test_resume_with_options_that_alter_training_is_refused(tmp_path):
    _train(tmp_path / "run", finish=False)
    with pytest.raises(ResumeMismatchError, match=r"beta \(0\.1 -> 0\.2\); train\.lr \(0\.0001 -> 0\.5\)"):
        _train(tmp_path / "run", resume=True, lr=0.5, beta=0.2)
    assert "lr: 0.0001" in (tmp_path / "run" / "config.yaml").read_text()


def test_changed_options_splits_harmless_from_altering():
    old = {"train": {"lr": 0.1, "log_every": 10, "adam_betas": [0.9, 0.99]}, "suite": {"parts": ["a"]}}
    new = {"train": {"lr": 0.1, "log_every": 1, "adam_betas": (0.9, 0.99)}, "suite": {"parts": []}}
    assert changed_options(old, new) == ([], ["suite.parts", "train.log_every"])


# ----------------------------------------------------------------------------- options checked first


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "train.batch_size: must be > 0, got 0"),
        ({"grad_accum": -1}, "train.grad_accum: must be > 0, got -1"),
        ({"lr": -1.0}, "train.lr: must be a finite number > 0, got -1.0"),
        ({"warmup_ratio": 1.5}, r"train.warmup_ratio: must be in \[0, 1\], got 1.5"),
        ({"adam_betas": (0.9, 1.0)}, r"train.adam_betas: must be two numbers in \[0, 1\)"),
    ],
)
def test_option_values_are_refused_before_the_folder_is_touched(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        Run(TrainConfig(output_dir=str(tmp_path / "run"), trackers=[], **options))
    assert not (tmp_path / "run").exists()


def test_a_full_disk_is_named_as_such(tmp_path):
    """ENOSPC (what a full disk gives to a plain write) names the file and says so; any other
    write error names the file and the original error."""
    import errno

    from vlalign.training.checkpoints import write_error

    full = write_error(
        tmp_path / "optimizer.pt", OSError(errno.ENOSPC, "No space left on device"), "the checkpoint file"
    )
    assert str(full) == f"{tmp_path / 'optimizer.pt'}: no space left on device while writing the checkpoint file"
    other = write_error(tmp_path / "optimizer.pt", PermissionError(errno.EACCES, "denied"), "the checkpoint file")
    assert "cannot write the checkpoint file (PermissionError" in str(other)


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tmp_path):
    """Its checkpoints deleted, a finished run cannot be extended: --resume must not restart it
    from step 0 over the finished model and metrics."""
    import shutil

    _train(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    rows = (tmp_path / "run" / METRICS_FILE).read_text()
    with pytest.raises(RunFolderError, match="finished `vlalign sft` run with no checkpoint left to resume from"):
        _train(tmp_path / "run", resume=True, max_steps=6, steps=6)
    assert (tmp_path / "run" / METRICS_FILE).read_text() == rows
