"""What keeps the processes of a data-parallel run in step, shared by every recipe's loop.

* :func:`check_supported` refuses set-ups the written-out loops do not support (today: several
  backward passes per optimiser step under DeepSpeed, which steps its engine at each one);
* :func:`global_count` sums a count over processes before any backward pass, so that every
  per-example mean divides by the count of the whole optimiser step;
* :func:`micro_step_context` skips the gradient all-reduce before the last micro-batch of a step;
* :func:`zero_loss` lets a process with nothing to train on (every sample dropped, every group
  filtered out) still join the gradient all-reduce that the others wait for;
* :func:`mean_over_processes` averages metrics that processes may hold under different keys.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DistributedType, gather_object
from torch import Tensor, nn

from vlalign.config import ConfigError

if TYPE_CHECKING:
    from vlalign.training.run import Run


def check_supported(run: Run, *, micro_batches_per_step: int, hint: str = "train.grad_accum=1") -> None:
    """Refuse several backward passes per optimiser step under DeepSpeed.

    accelerate steps a DeepSpeed engine at every ``backward`` call, so the loop's own gradient
    accumulation (``micro_batches_per_step`` backwards per optimiser step) would step it too often:
    accumulate with more processes or a larger batch instead. ``hint`` names the setting to change.
    """
    if run.accelerator.distributed_type == DistributedType.DEEPSPEED and micro_batches_per_step > 1:
        raise ConfigError(
            f"under DeepSpeed use {hint} (one micro-batch per optimiser step; raise train.batch_size or "
            "the number of processes instead), and set gradient_clipping in the DeepSpeed config"
        )


def global_count(run: Run, local: int) -> Tensor:
    """``local`` summed over processes (a float tensor on the run's device)."""
    return run.accelerator.reduce(torch.tensor(float(local), device=run.device), reduction="sum")


def micro_step_context(run: Run, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """No gradient all-reduce before the last micro-batch of an optimiser step."""
    return contextlib.nullcontext() if last else run.accelerator.no_sync(model)


def zero_loss(model: nn.Module) -> Tensor:
    """A loss of exactly 0 touching every trainable parameter (a process with nothing to train on
    still joins DDP's gradient all-reduce)."""
    return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)  # type: ignore[return-value]


def union_of_keys(run: Run, keys: list[str]) -> list[str]:
    """The sorted union of every process's ``keys`` (each process must join the same all-reduces)."""
    if run.num_processes == 1:
        return sorted(keys)
    return sorted({k for ks in gather_object([sorted(keys)]) for k in ks})


def mean_over_processes(run: Run, metrics: dict[str, Any]) -> dict[str, float]:
    """Every metric averaged over the processes that have it (one all-reduce; processes may hold
    different keys, e.g. one whose groups were all filtered out)."""
    keys = sorted(metrics)
    if run.num_processes == 1:
        return {k: float(metrics[k]) for k in keys}
    keys = union_of_keys(run, keys)
    local = torch.tensor(
        [[float(metrics[k]), 1.0] if k in metrics else [0.0, 0.0] for k in keys], dtype=torch.float64, device=run.device
    ).reshape(-1, 2)
    total = run.accelerator.reduce(local, "sum")
    return {k: v / max(n, 1.0) for k, (v, n) in zip(keys, total.tolist())}
