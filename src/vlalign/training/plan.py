"""The data order: which samples each process uses at each optimiser step, a pure function of
(seed, step), so that a checkpoint only needs the step number to know where the data stream stands."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vlalign.config import ConfigError

if TYPE_CHECKING:
    from vlalign.training.run import TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    """Which samples each process uses at each optimiser step: a pure function of the step.

    Each epoch is a permutation of the dataset drawn from ``seed + epoch``; an optimiser step
    takes the next ``global_batch = batch_size * grad_accum * num_processes`` indices (a
    trailing partial global batch is dropped). Micro-batch ``a`` of process ``p`` is the slice
    ``[(a * P + p) * batch_size, ... + batch_size)`` of the step's indices, so the union over
    processes and micro-batches is always the same global batch whatever P and grad_accum are:
    a 2-process run sees exactly the samples of a 1-process run with twice the accumulation.
    """

    num_samples: int
    batch_size: int
    grad_accum: int = 1
    num_processes: int = 1
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                f"{self.global_batch} (batch_size {self.batch_size} x grad_accum {self.grad_accum} "
                f"x processes {self.num_processes}); lower train.batch_size or train.grad_accum"
            )

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(self.num_samples)

    def global_indices(self, step: int) -> list[int]:
        """All indices of optimiser step ``step`` (every process, every micro-batch)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        start = within * self.global_batch
        return order[start : start + self.global_batch].tolist()

    def micro_batches(self, step: int, process_index: int = 0) -> list[list[int]]:
        """The ``grad_accum`` micro-batches (lists of sample indices) of one process at ``step``."""
        idx = self.global_indices(step)
        out = []
        for a in range(self.grad_accum):
            start = (a * self.num_processes + process_index) * self.batch_size
            out.append(idx[start : start + self.batch_size])
        return out


def total_steps(cfg: TrainConfig, plan: BatchPlan) -> int:
    """``cfg.max_steps``, or the steps that ``cfg.epochs`` passes over the data take."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
