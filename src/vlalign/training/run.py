"""One training run's surroundings: the shared loop options (:class:`TrainConfig`), the
accelerator, optimiser and schedule, the run folder, the progress bar and :class:`Run`, which
ties them to the checkpoints (:mod:`vlalign.training.checkpoints`) and the metrics file
(:mod:`vlalign.training.metrics`).

The loops themselves live in ``vlalign.recipes``; they are written out in named phases and call
the pieces here. Nothing in this module knows about a particular loss or model family.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm
from transformers import get_scheduler

from vlalign.config import ConfigError, StrictFields, save_config, to_dict
from vlalign.errors import UserError
from vlalign.training.checkpoints import Checkpointer, CheckpointError, seed_everything
from vlalign.training.distributed import fsdp2_on_cpu, shard_on_cpu, sharding_of
from vlalign.training.launch import apply_threads, check_launch
from vlalign.training.metrics import MetricsLog, Throughput, to_float
from vlalign.training.options import check_input_files, check_options, validate_config
from vlalign.training.runfolder import (
    RunFolderError,
    check_resume,
    new_record,
    prepare_run_dir,
    read_record,
    run_fingerprints,
    write_record,
)
from vlalign.training.sharded_vision import vision_parity

logger = logging.getLogger("vlalign")


@dataclass
class TrainConfig(StrictFields):
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
    threads: int = 0
    """CPU threads of torch's operations (torch.set_num_threads) for this run; 0 keeps torch's default
    (the machine's cores, or OMP_NUM_THREADS). Results on a CPU can depend on it (summation order)."""

    def validate(self, prefix: str = "train") -> None:
        """Refuse option values the loop cannot use (:class:`~vlalign.config.ConfigError` naming
        the option), before any model or data is loaded."""
        check_options(
            prefix,
            [
                ("batch_size", self.batch_size > 0, "must be > 0"),
                ("grad_accum", self.grad_accum > 0, "must be > 0"),
                ("lr", self.lr > 0 and math.isfinite(self.lr), "must be a finite number > 0"),
                ("max_steps", self.max_steps >= 0, "must be >= 0 (0 derives it from train.epochs)"),
                ("epochs", self.max_steps > 0 or 0 < self.epochs < math.inf, "must be > 0 when max_steps is 0"),
                ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
                (
                    "adam_betas",
                    len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                    "must be two numbers in [0, 1)",
                ),
                ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "must be in [0, 1]"),
                ("max_grad_norm", self.max_grad_norm >= 0, "must be >= 0 (0 disables clipping)"),
                ("log_every", self.log_every >= 0, "must be >= 0"),
                ("save_every", self.save_every >= 0, "must be >= 0 (0 saves only at the end)"),
                ("keep_checkpoints", self.keep_checkpoints >= 0, "must be >= 0 (0 keeps every checkpoint)"),
                ("eval_every", self.eval_every >= 0, "must be >= 0 (0 evaluates only at the end)"),
                ("threads", self.threads >= 0, "must be >= 0 (0 keeps torch's default)"),
            ],
            values=self,
        )


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and 1-D (norm) weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters (check the LoRA / freezing options)")
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
        raise ConfigError(f"train.trackers: unknown tracker {name!r} (choose from tensorboard, wandb, mlflow, trackio)")
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


# ----------------------------------------------------------------------------- one run


COUNTERS = ("reference/forwards", "data/dropped_overlong")
"""Metrics that count since the start of a process (a reference model's forward passes, samples
a collator dropped): :meth:`Run.end_step` adds the count a resumed checkpoint holds, so a resumed
run logs the numbers of an uninterrupted one."""


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
        validate_config(config, cfg)
        check_input_files(config)
        apply_threads(cfg.threads)
        is_main = int(os.environ.get("RANK", "0")) == 0
        self.command = desc.split("[")[0]
        self.run_dir, self.resume_from = prepare_run_dir(cfg, is_main=is_main, command=self.command)
        self.record = self._check_record(config) if is_main else None
        self.accelerator = make_accelerator(cfg, self.run_dir)
        check_launch(self.accelerator.num_processes)
        self.metrics = MetricsLog(self.run_dir, self.accelerator)
        self.checkpointer = Checkpointer(self.run_dir, keep=cfg.keep_checkpoints)
        self.throughput = Throughput(self.accelerator.device)
        self.desc = desc
        self.total = total
        self.start_step = 0
        self._pending: dict[str, list[float]] = {}
        self._counts: dict[str, float] = {}
        self._count_base: dict[str, float] = {}
        self._modules: dict[str, torch.nn.Module] = {}
        self._optimizer = self._scheduler = None
        self._config = config
        self.resumed_state: dict[str, Any] = {}
        """``state.json`` of the checkpoint resumed from (the step and the recipe's ``extra_state``)."""
        if self.record is not None and self.record["status"] == "new":
            self._write_record(status="running")
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

    def prepare(self, modules: dict[str, torch.nn.Module], optimizer, scheduler, *, total: int, processor: Any = None):
        """Wrap modules and optimiser for the accelerator, then restore the newest checkpoint if
        resuming. Returns the prepared modules (same keys) and optimiser; the scheduler is kept as
        is (one scheduler step per optimiser step, whatever the number of processes). Under FSDP,
        with the model's ``processor``, every process runs the vision tower at every forward, images
        or not (:func:`vlalign.training.sharded_vision.vision_parity`)."""
        if fsdp2_on_cpu(self.accelerator):  # opt-in: FSDP2 on CPU processes (VLALIGN_FSDP2_CPU=1)
            wrapped, optimizer = shard_on_cpu(self.accelerator, modules, optimizer)
            self.print(
                f"FSDP2 on CPU: {', '.join(wrapped)} sharded with fully_shard over {self.num_processes} processes"
            )
        else:
            names = list(modules)
            prepared = self.accelerator.prepare(*modules.values(), optimizer)
            wrapped = dict(zip(names, prepared[:-1]))
            optimizer = prepared[-1]
        if processor is not None and sharding_of(self) == "FSDP":
            vision_parity([self.accelerator.unwrap_model(m) for m in wrapped.values()], processor)
        self._modules, self._optimizer, self._scheduler = wrapped, optimizer, scheduler
        self.total = total
        if self.resume_from is not None:
            state = self._load_checkpoint(wrapped, optimizer, scheduler)
            self.resumed_state = state
            self._count_base = {k: float(v) for k, v in state.get("counters", {}).items()}
            self.start_step = int(state["step"])
            finished = self.record is not None and self.record.get("status") == "finished"
            # a finished run whose model/ is gone (deleted, or a kill while it was rewritten) resumes
            # to save it again; with its model in place there is nothing to do
            if finished and self.start_step >= total and (self.run_dir / "model").is_dir():
                raise RunFolderError(
                    f"{self.run_dir} holds a finished `vlalign {self.command}` run of {self.start_step} steps: "
                    f"nothing to resume; raise --train.max_steps above {self.start_step} to extend it"
                )
            self.metrics.truncate_after(self.start_step, rows=state.get("metrics_rows"))
            self.print(f"resumed from {self.resume_from} at step {self.start_step}")
        if self.resume_from is not None:
            self._write_record(status="running")  # the harmless changes, and an extended finished run
        self.bar = progress_bar(
            total, self.start_step, enabled=self.cfg.progress and self.accelerator.is_main_process, desc=self.desc
        )
        self.throughput.reset()
        return wrapped, optimizer

    def _load_checkpoint(self, modules, optimizer, scheduler) -> dict[str, Any]:
        """Load the newest checkpoint; if one of its files is unreadable, fall back (with a
        warning) to the next older complete one, and name every unreadable file if none loads."""
        candidates = [p for p in self.checkpointer.all() if p <= self.resume_from][::-1]
        failures = []
        for path in candidates:
            try:
                state = self.checkpointer.load(
                    path, modules=modules, optimizer=optimizer, scheduler=scheduler, accelerator=self.accelerator
                )
            except CheckpointError as exc:
                failures.append(str(exc))
                logger.warning("%s; trying the previous checkpoint", exc)
                self.print(f"vlalign: warning: {exc}; trying the previous checkpoint")
                continue
            if path != self.resume_from:
                self.print(f"vlalign: warning: resuming from the older checkpoint {path}")
                self.resume_from = path
            return state
        raise CheckpointError(
            f"no checkpoint of {self.run_dir} can be loaded: {'; '.join(failures)}; "
            f"start over with --train.overwrite=true"
        )

    def _check_record(self, config: Any) -> dict[str, Any]:
        """The run's ``run.json`` record: a new one, or the recorded one after checking that a
        resume changes no option that alters training (harmless changes are noted in its history)."""
        options = to_dict(config) if config is not None else {"train": to_dict(self.cfg)}
        prints = run_fingerprints(config)
        recorded = read_record(self.run_dir) if self.resume_from is not None else None
        if recorded is None:
            return {**new_record(self.command, options, prints), "status": "new"}
        harmless = check_resume(recorded, options, prints, self.run_dir)
        if harmless:
            recorded["history"].append({"resumed": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": harmless})
        recorded["options"] = options
        return recorded

    def _write_record(self, *, status: str) -> None:
        """Write ``run.json`` and ``config.yaml`` (main process)."""
        if self.record is None:
            return
        self.record["status"] = status
        write_record(self.run_dir, self.record)
        if self._config is not None:
            save_config(self._config, self.run_dir / "config.yaml")

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
                number = to_float(value)
                if key in COUNTERS:  # counted by this process: continue from the checkpoint's count
                    self._counts[key] = number
                    number += self._count_base.get(key, 0.0)
                self._pending.setdefault(key, []).append(number)
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
            extra={
                **(extra_state or {}),
                "metrics_rows": self.metrics.rows,
                "counters": {k: self._count_base.get(k, 0.0) + v for k, v in self._counts.items()},
            },
            accelerator=self.accelerator,
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write ``metrics`` now (evaluations, one-off numbers)."""
        self.metrics.log(step, metrics)

    def print(self, *args: Any) -> None:
        if self.accelerator.is_main_process:
            (self.bar.write if self.bar is not None else print)(" ".join(str(a) for a in args))

    def finish(self) -> None:
        """Close the progress bar and the trackers and mark the run finished in ``run.json``."""
        if self.bar is not None:
            self.bar.close()
        if self.record is not None:
            self.record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.record["steps"] = self.total
            write_record(self.run_dir, {**self.record, "status": "finished"})
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
