"""What every training loop shares: the accelerator, optimiser and schedule, the batch plan,
checkpoints with exact resume, the progress bar, and (from :mod:`vlalign.run_metrics`) the
metrics file and trackers.

The loops themselves live in ``vlalign.recipes``; they are written out in named phases and call
the pieces here. Nothing in this module knows about a particular loss or model family.

Exact resume rests on three facts:

* the data order is a pure function of (seed, step) — :class:`BatchPlan` — so a checkpoint only
  needs the step number to know where the data stream stands;
* a checkpoint holds the trainable parameters (the LoRA adapter, or the whole model when every
  weight trains, or a value head...), the optimiser and scheduler states and every RNG state
  of every process;
* checkpoints are written to a temporary folder and renamed into place, so a run killed while
  saving leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlalign.run_metrics import METRICS_FILE, MetricsLog, Throughput, to_float

CHECKPOINT_DIR = "checkpoints"


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


# ----------------------------------------------------------------------------- randomness


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- data order


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
            raise ValueError(
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
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps)


def make_accelerator(cfg: TrainConfig, run_dir: Path):
    """An ``accelerate.Accelerator`` logging to the configured trackers inside ``run_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

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
    import importlib.util

    if importlib.util.find_spec(module) is None:
        print(f"vlalign: tracker {name!r} is not installed; skipping it (pip install {module})")
        return False
    return True


# ----------------------------------------------------------------------------- progress


def progress_bar(total: int, initial: int, *, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


# ----------------------------------------------------------------------------- checkpoints


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, the samples and the last checkpoint."""


def check_finite(loss: torch.Tensor, *, step: int, sample_ids: list[str], run_dir: Path) -> None:
    """Stop the run on a NaN or infinite loss, naming what a user needs to investigate."""
    if torch.isfinite(loss).all():
        return
    last = Checkpointer(run_dir).latest()
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    shown = ", ".join(sample_ids[:20]) + (" ..." if len(sample_ids) > 20 else "")
    raise NonFiniteLossError(f"non-finite loss ({float(loss.detach().float().reshape(-1)[0])}) at step {step}; batch sample ids: {shown}; {where}")


class Checkpointer:
    """Writes and reads ``<run_dir>/checkpoints/step-NNNNNNN`` folders atomically."""

    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / CHECKPOINT_DIR
        self.keep = keep

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder is complete once its state.json exists)."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step-*") if p.is_dir() and (p / "state.json").exists() and "." not in p.name]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, *, modules: dict[str, torch.nn.Module], optimizer=None, scheduler=None,
             extra: dict[str, Any] | None = None, accelerator=None) -> Path:
        """Save the trainable parameters of each module, optimiser, scheduler, every process's
        RNG state and ``extra`` (JSON) as checkpoint ``step``; returns its folder."""
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f"step-{step:07d}.tmp"
        is_main = accelerator is None or accelerator.is_main_process
        rank = 0 if accelerator is None else accelerator.process_index
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(accelerator)
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        if is_main:
            for name, module in modules.items():
                save_file(trainable_state_dict(module, accelerator), str(tmp / f"{name}.safetensors"))
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _barrier(accelerator)
        if is_main:
            (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.all()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(accelerator)
        return final

    def load(self, path: Path, *, modules: dict[str, torch.nn.Module], optimizer=None, scheduler=None,
             accelerator=None) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save`; returns its ``state.json`` contents."""
        rank = 0 if accelerator is None else accelerator.process_index
        for name, module in modules.items():
            load_trainable_state_dict(module, load_file(str(path / f"{name}.safetensors")), accelerator)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng-{rank}.pt"
        if not rng_file.exists():
            raise FileNotFoundError(f"{rng_file} is missing: was this checkpoint written with a different number of processes?")
        set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((path / "state.json").read_text())


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _unwrap(module: torch.nn.Module, accelerator) -> torch.nn.Module:
    return accelerator.unwrap_model(module) if accelerator is not None else module


def trainable_state_dict(module: torch.nn.Module, accelerator=None) -> dict[str, torch.Tensor]:
    """The parameters that require gradients (a LoRA adapter, a head, or all weights), on CPU."""
    model = _unwrap(module, accelerator)
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], accelerator=None) -> None:
    """Copy ``state`` into the module's trainable parameters; every one must be present."""
    model = _unwrap(module, accelerator)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model's trainable parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it written with other LoRA / freezing options?)"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))


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
        from vlalign.config import save_config

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
            state = self.checkpointer.load(self.resume_from, modules=wrapped, optimizer=optimizer,
                                           scheduler=scheduler, accelerator=self.accelerator)
            self.start_step = int(state["step"])
            self.metrics.truncate_after(self.start_step)
            self.print(f"resumed from {self.resume_from} at step {self.start_step}")
        self.bar = progress_bar(total, self.start_step, enabled=self.cfg.progress and self.accelerator.is_main_process, desc=self.desc)
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

    def end_step(self, step: int, metrics: dict[str, Any], *, samples: int = 0, tokens: int = 0,
                 extra_state: dict[str, Any] | None = None) -> None:
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
        return self.checkpointer.save(step, modules=self._modules, optimizer=self._optimizer, scheduler=self._scheduler,
                                      extra=extra_state, accelerator=self.accelerator)

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
    from vlalign.config import to_dict

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
