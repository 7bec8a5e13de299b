"""What keeps data-parallel processes in step, on one process (the two-process runs are in
tests/recipes/test_data_parallel.py and test_grpo.py): counts, the zero loss, metric means, and the
per-step JSONL records that follow the checkpoints."""

from __future__ import annotations

import json

import torch
from torch import nn

from vlalign.training import (
    Run,
    StepRecords,
    TrainConfig,
    global_count,
    mean_over_processes,
    micro_step_context,
    union_of_keys,
    zero_loss,
)


def _run(tmp_path) -> Run:
    return Run(TrainConfig(output_dir=str(tmp_path / "run"), trackers=[], progress=False))


def test_zero_loss_is_zero_and_reaches_every_trainable_parameter():
    """The loss a process with nothing to train on backpropagates: exactly 0, with a (zero) gradient on
    every trainable parameter (so DDP's all-reduce waits for none) and none on frozen ones."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].requires_grad_(False)
    loss = zero_loss(model)
    assert float(loss) == 0.0
    loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model[0].parameters())
    assert all(p.grad is None for p in model[1].parameters())


def test_single_process_reductions(tmp_path):
    """On one process: a count is itself (a float tensor on the run's device), metric means are the
    values as floats with sorted keys, the union of keys is the sorted keys, and every micro-batch
    syncs (no no_sync context is needed for the last one)."""
    run = _run(tmp_path)
    count = global_count(run, 7)
    assert count.dtype == torch.float32 and float(count) == 7.0 and count.device == run.device
    means = mean_over_processes(run, {"b": torch.tensor(2.5), "a": 1})
    assert list(means) == ["a", "b"] and means == {"a": 1.0, "b": 2.5}
    assert union_of_keys(run, ["z", "a"]) == ["a", "z"]
    with micro_step_context(run, nn.Linear(1, 1), last=True):
        pass
    run.finish()


def test_step_records_follow_the_checkpoint_on_resume(tmp_path):
    """Records past the resumed step are dropped when the file is reopened; nothing is written (nor the
    file created) without records or on a process that does not write."""
    path = tmp_path / "completions.jsonl"
    log = StepRecords(path, enabled=True, start_step=0)
    log.write([])
    assert not path.exists()
    log.write({"step": s, "id": f"p{s}"} for s in (1, 2, 3))
    StepRecords(path, enabled=True, start_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    StepRecords(path, enabled=False, start_step=0).write([{"step": 9}])
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
