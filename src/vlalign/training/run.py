"""One training run's surroundings: the shared loop options (:class:`TrainConfig`), the
accelerator, optimiser and schedule, the run folder, the progress bar and :class:`Run`, which
ties them to the checkpoints (:mod:`vlalign.training.checkpoints`) and the metrics file
(:mod:`vlalign.training.metrics`).

The loops themselves live in ``vlalign.recipes``; they are written out in named phases and call
the pieces here. Nothing in this module knows about a particular loss or model family.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm
from transformers import get_scheduler

from vlalign.config import save_config, to_dict
from vlalign.errors import UserError
from vlalign.training.checkpoints import Checkpointer, seed_everything
from vlalign.training.metrics import METRICS_FILE, MetricsLog, Throughput, to_float


@dataclass
class TrainConfig:
    """Options of the training loop shared by every recipe."""

    output_dir: str = "runs/run"
    """Run folder: metrics.jsonl, checkpoints/, the final model and the config used go here."""
    seed: int = 0
    """Seed of the data order, initialisation of new heads, dropout and sampling."""
    max_steps: int = 0
    """Optimiser steps to run; 0 derives it from `epochs` and the dataset size."""
    epochs: float = 1.0
    """Passes over the training data (used when max_steps is 0)."""
    batch_size: int = 8
    """Samples per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimiser step; the global batch is batch_size * grad_accum * processes."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and normalisation weights)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_ratio: float = 0.05
    """Share of max_steps spent warming the learning rate up linearly from 0."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision. auto: what ``accelerate launch`` was told, else bf16 on a GPU that
    supports it and 'no' on CPUs."""
    log_every: int = 10
    """Write metrics every this many optimiser steps."""
    save_every: int = 200
    """Checkpoint every this many optimiser steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints to keep on disk."""
    eval_every: int = 0
    """Evaluate on the held-out split every this many steps; 0 evaluates only at the end."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir (the data position, optimiser, schedule
    and RNG states are restored, so the run continues exactly)."""
    overwrite: bool = False
    """Start afresh even if output_dir holds checkpoints of an earlier run (they are deleted)."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers through accelerate: tensorboard (default), wandb, mlflow, trackio; [] for none."""
    progress: bool = True
    """Show a progress bar."""


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and 1-D (norm) weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (check the LoRA / freezing options)")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    """Linear warm-up over ``warmup_ratio * steps``, then cosine / linear decay or constant."""
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps)


def make_accelerator(cfg: TrainConfig, run_dir: Path):
    """An ``accelerate.Accelerator`` logging to the configured trackers inside ``run_dir``."""
    trackers = [t for t in cfg.trackers if _tracker_available(t)]
    return Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )


def resolve_mixed_precision(value: str) -> str | None:
    """``train.mixed_precision`` for ``Accelerator``: "auto" is None (accelerate then reads what
    ``accelerate launch`` set) under ``accelerate launch --mixed_precision``, else bf16 on a GPU
    that supports it and "no" otherwise; other values pass through."""
    if value != "auto":
        return value
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _tracker_available(name: str) -> bool:
    module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}.get(name)
    if module is None:
        raise ValueError(f"train.trackers: unknown tracker {name!r} (choose from tensorboard, wandb, mlflow, trackio)")
    if importlib.util.find_spec(module) is None:
        print(f"vlalign: tracker {name!r} is not installed; skipping it (pip install {module})")
        return False
    return True


# ----------------------------------------------------------------------------- progress


def progress_bar(total: int, initial: int, *, enabled: bool, desc: str):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the step, the samples and the last checkpoint."""


def check_finite(loss: torch.Tensor, *, step: int, sample_ids: list[str], run_dir: Path) -> None:
    """Stop the run on a NaN or infinite loss, naming what a user needs to investigate."""
    if torch.isfinite(loss).all():
        return
    last = Checkpointer(run_dir).latest()
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    shown = ", ".join(sample_ids[:20]) + (" ..." if len(sample_ids) > 20 else "")
    raise NonFiniteLossError(
        f"non-finite loss ({float(loss.detach().float().reshape(-1)[0])}) at step {step}; batch sample ids: {shown}; {where}"
    )


def prepare_run_dir(cfg: TrainConfig, *, is_main: bool = True) -> tuple[Path, Path | None]:
    """Create the run folder; return it and the checkpoint to resume from (or None).

    A folder that already holds checkpoints is an error unless ``resume`` (continue from the
    newest) or ``overwrite`` (delete them) is set, so that no earlier work is lost by accident.
    """
    run_dir = Path(cfg.output_dir)
    ckpt = Checkpointer(run_dir)
    latest = ckpt.latest()
    if latest is not None and not cfg.resume:
        if not cfg.overwrite:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints (newest: {latest.name}); pass --resume to continue "
                f"that run, --train.overwrite=true to start afresh, or another --train.output_dir"
            )
        if is_main:
            shutil.rmtree(ckpt.root, ignore_errors=True)
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
        latest = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, (latest if cfg.resume else None)


# ----------------------------------------------------------------------------- one run


class Run:
    """The surroundings of one training loop: run folder, accelerator, metrics, checkpoints,
    progress bar and the resume point. The loop itself stays in the recipe::

        run = Run(cfg.train, config=cfg, desc="sft")
        model, optimizer, scheduler = run.prepare(model, optimizer, scheduler)
        for step in range(run.start_step, steps):
            ...                                   # forward, backward (the recipe's phases)
            run.clip_and_step(model, optimizer, scheduler)
            run.end_step(step + 1, {"train/loss": loss})
        run.finish()

    ``modules`` passed to :meth:`prepare` are what checkpoints hold (their trainable parameters).
    """

    def __init__(self, cfg: TrainConfig, *, config: Any = None, desc: str = "train", total: int = 0) -> None:
        self.cfg = cfg
        is_main = int(os.environ.get("RANK", "0")) == 0
        self.run_dir, self.resume_from = prepare_run_dir(cfg, is_main=is_main)
        self.accelerator = make_accelerator(cfg, self.run_dir)
        self.metrics = MetricsLog(self.run_dir, self.accelerator)
        self.checkpointer = Checkpointer(self.run_dir, keep=cfg.keep_checkpoints)
        self.throughput = Throughput(self.accelerator.device)
        self.desc = desc
        self.total = total
        self.start_step = 0
        self._pending: dict[str, list[float]] = {}
        self._modules: dict[str, torch.nn.Module] = {}
        self._optimizer = self._scheduler = None
        if config is not None and self.accelerator.is_main_process:
            save_config(config, self.run_dir / "config.yaml")
        if self.accelerator.log_with:
            self.accelerator.init_trackers(desc, config=_flat_config(config))
        seed_everything(cfg.seed)
        self.bar = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    def prepare(self, modules: dict[str, torch.nn.Module], optimizer, scheduler, *, total: int):
        """Wrap modules and optimiser for the accelerator, then restore the newest checkpoint if
        resuming. Returns the prepared modules (same keys) and optimiser; the scheduler is kept as
        is (one scheduler step per optimiser step, whatever the number of processes)."""
        names = list(modules)
        prepared = self.accelerator.prepare(*modules.values(), optimizer)
        wrapped = dict(zip(names, prepared[:-1]))
        optimizer = prepared[-1]
        self._modules, self._optimizer, self._scheduler = wrapped, optimizer, scheduler
        self.total = total
        if self.resume_from is not None:
            state = self.checkpointer.load(
                self.resume_from,
                modules=wrapped,
                optimizer=optimizer,
                scheduler=scheduler,
                accelerator=self.accelerator,
            )
            self.start_step = int(state["step"])
            self.metrics.truncate_after(self.start_step)
            self.print(f"resumed from {self.resume_from} at step {self.start_step}")
        self.bar = progress_bar(
            total, self.start_step, enabled=self.cfg.progress and self.accelerator.is_main_process, desc=self.desc
        )
        self.throughput.reset()
        return wrapped, optimizer

    def clip_and_step(self, parameters, optimizer, scheduler) -> torch.Tensor | None:
        """Clip the gradient norm (if configured), step optimiser and schedule, zero the grads."""
        norm = None
        if self.cfg.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(parameters, self.cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def end_step(
        self,
        step: int,
        metrics: dict[str, Any],
        *,
        samples: int = 0,
        tokens: int = 0,
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        """Record a finished optimiser step (``step`` counts steps done): accumulate metrics, write
        them every ``log_every`` steps, checkpoint every ``save_every`` steps and at the end."""
        self.throughput.add(samples, tokens)
        for key, value in metrics.items():
            if value is not None:
                self._pending.setdefault(key, []).append(to_float(value))
        if self.bar is not None:
            self.bar.update(1)
            if "train/loss" in self._pending:
                self.bar.set_postfix(loss=f"{self._pending['train/loss'][-1]:.4f}", refresh=False)
        if step % max(self.cfg.log_every, 1) == 0 or step == self.total:
            self.flush(step)
        if (self.cfg.save_every and step % self.cfg.save_every == 0) or step == self.total:
            self.save(step, extra_state)

    def flush(self, step: int) -> None:
        if not self._pending:
            return
        record = {k: sum(v) / len(v) for k, v in self._pending.items()}
        if self._scheduler is not None:
            record["train/lr"] = self._scheduler.get_last_lr()[0]
        record.update(self.throughput.read())
        self.metrics.log(step, record)
        self._pending = {}

    def save(self, step: int, extra_state: dict[str, Any] | None = None) -> Path:
        return self.checkpointer.save(
            step,
            modules=self._modules,
            optimizer=self._optimizer,
            scheduler=self._scheduler,
            extra=extra_state,
            accelerator=self.accelerator,
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write ``metrics`` now (evaluations, one-off numbers)."""
        self.metrics.log(step, metrics)

    def print(self, *args: Any) -> None:
        if self.accelerator.is_main_process:
            (self.bar.write if self.bar is not None else print)(" ".join(str(a) for a in args))

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def _flat_config(config: Any) -> dict[str, Any]:
    """Config as a flat dict of scalars (what trackers accept as hyperparameters)."""
    if config is None:
        return {}
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            key = prefix[:-1]
            flat[key] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", to_dict(config))
    return flat
