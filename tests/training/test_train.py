"""Loop pieces: the batch plan, checkpoints (atomic, exact), run-folder safety, metrics."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vlalign.training import (
    BatchPlan,
    Checkpointer,
    NonFiniteLossError,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    check_finite,
    prepare_run_dir,
    total_steps,
)
from vlalign.training.metrics import MetricsLog, read_metrics


def test_batch_plan_is_a_function_of_the_step():
    plan = BatchPlan(num_samples=50, batch_size=4, grad_accum=2, seed=3)
    assert plan.global_batch == 8 and plan.steps_per_epoch == 6
    assert plan.micro_batches(7) == BatchPlan(num_samples=50, batch_size=4, grad_accum=2, seed=3).micro_batches(7)
    epoch0 = [i for s in range(6) for i in plan.global_indices(s)]
    assert len(set(epoch0)) == 48  # no sample twice within an epoch
    assert plan.global_indices(6) != plan.global_indices(0)  # a new permutation each epoch


def test_processes_and_accumulation_share_one_global_batch():
    """Two processes with accumulation 2 see exactly the samples of one process with accumulation 4."""
    one = BatchPlan(num_samples=64, batch_size=2, grad_accum=4, num_processes=1, seed=0)
    two = BatchPlan(num_samples=64, batch_size=2, grad_accum=2, num_processes=2, seed=0)
    for step in range(3):
        union = sorted(i for p in range(2) for mb in two.micro_batches(step, p) for i in mb)
        assert union == sorted(i for mb in one.micro_batches(step) for i in mb)
        assert all(len(mb) == 2 for p in range(2) for mb in two.micro_batches(step, p))


def test_batch_plan_rejects_too_small_dataset():
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        BatchPlan(num_samples=10, batch_size=8, grad_accum=2)


def test_total_steps():
    plan = BatchPlan(num_samples=100, batch_size=10)
    assert total_steps(TrainConfig(epochs=2.5), plan) == 25
    assert total_steps(TrainConfig(max_steps=7), plan) == 7


def _tiny_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    net[0].weight.requires_grad_(False)  # a frozen weight is not saved
    return net


def test_checkpoint_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path):
    cfg = TrainConfig(lr=0.1, max_steps=10)
    net = _tiny_net()
    opt = build_optimizer(net, cfg)
    sched = build_scheduler(opt, cfg, 10)
    for _ in range(3):
        net(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    ck = Checkpointer(tmp_path, keep=2)
    path = ck.save(3, modules={"model": net}, optimizer=opt, scheduler=sched, extra={"note": "x"})
    after = (torch.rand(1), np.random.rand(), random.random())  # RNG draws right after saving
    expected = {n: p.clone() for n, p in net.state_dict().items()}

    net2 = _tiny_net()
    opt2 = build_optimizer(net2, cfg)
    sched2 = build_scheduler(opt2, cfg, 10)
    state = ck.load(path, modules={"model": net2}, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 3, "note": "x"}
    for name, value in net2.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert (torch.rand(1), np.random.rand(), random.random()) == after


def test_checkpoints_are_pruned_and_partial_ones_ignored(tmp_path):
    net = _tiny_net()
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(step, modules={"model": net})
    assert [p.name for p in ck.all()] == ["step-0000002", "step-0000003"]
    (ck.root / "step-0000009.tmp").mkdir()  # a save killed half-way
    (ck.root / "step-0000010").mkdir()  # no state.json: incomplete
    assert ck.latest().name == "step-0000003"


def test_checkpoint_must_match_trainable_parameters(tmp_path):
    ck = Checkpointer(tmp_path)
    path = ck.save(1, modules={"model": _tiny_net()})
    other = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="missing"):
        ck.load(path, modules={"model": other})


def test_run_dir_refuses_to_clobber_checkpoints(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path))
    Checkpointer(tmp_path).save(5, modules={"model": _tiny_net()})
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_run_dir(cfg)
    _, resume_from = prepare_run_dir(TrainConfig(output_dir=str(tmp_path), resume=True))
    assert resume_from.name == "step-0000005"
    _, resume_from = prepare_run_dir(TrainConfig(output_dir=str(tmp_path), overwrite=True))
    assert resume_from is None and Checkpointer(tmp_path).latest() is None


def test_metrics_log_appends_and_truncates(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"train/loss": torch.tensor(step / 2)})
    log.truncate_after(2)
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 0.5), (2, 1.0)]


def test_non_finite_loss_names_step_samples_and_checkpoint(tmp_path):
    Checkpointer(tmp_path).save(4, modules={"model": _tiny_net()})
    check_finite(torch.tensor(1.0), step=5, sample_ids=["a"], run_dir=tmp_path)
    with pytest.raises(
        NonFiniteLossError, match=r"at step 5; batch sample ids: a, b; the last good checkpoint is .*step-0000004"
    ):
        check_finite(torch.tensor(float("nan")), step=5, sample_ids=["a", "b"], run_dir=tmp_path)


def test_mixed_precision_auto(monkeypatch):
    """auto: what ``accelerate launch --mixed_precision`` set (None lets accelerate read it), else
    bf16 on a GPU that has it and 'no' elsewhere; explicit values pass through."""
    from vlalign.training import resolve_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert resolve_mixed_precision("auto") == ("bf16" if gpu_bf16 else "no")
    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("fp16") == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision("auto") is None
    assert resolve_mixed_precision("no") == "no"
