"""Checkpoints with exact resume: the trainable parameters of each module, the optimiser and
scheduler states and every process's RNG state, written to a temporary folder and renamed into
place, so a run killed while saving leaves the previous checkpoint intact and never a
half-written one.

Under FSDP2 (parameters as DTensor shards) every process gathers each trainable parameter whole
and the main process writes it, so ``<module>.safetensors`` loads without FSDP; the optimiser
state stays sharded, one ``optimizer-<rank>.pt`` per process (resume with the same process count,
as for the RNG states).

Checkpoints are data, never code: every ``.pt`` file is read with ``torch.load(weights_only=True)``
(tensors, numbers, strings and containers only), so a crafted file cannot run anything when a
run is resumed. A file that cannot be read raises :class:`CheckpointError` naming its path (and
"no space left on device" when the disk filled up while writing)."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from vlalign.errors import UserError

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file cannot be written or read (truncated, not a checkpoint, unsafe, disk full);
    the message names the file."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's parameters are not the model's trainable parameters (other LoRA / freezing options)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, as tensors and plain values (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

    def save(
        self,
        step: int,
        *,
        modules: dict[str, torch.nn.Module],
        optimizer=None,
        scheduler=None,
        extra: dict[str, Any] | None = None,
        accelerator=None,
    ) -> Path:
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
        _write(tmp / f"rng-{rank}.pt", lambda f: torch.save(rng_state(), f))
        sharded = any(is_sharded(module) for module in modules.values())
        for name, module in modules.items():
            if is_main or sharded:  # gathering sharded (FSDP2) parameters takes every process
                state = trainable_state_dict(module, accelerator)
            if is_main:
                _write(tmp / f"{name}.safetensors", lambda f, state=state: save_file(state, str(f)))
        if optimizer is not None and sharded:  # each process's shard of the optimiser state
            _write(tmp / f"optimizer-{rank}.pt", lambda f: torch.save(local_optimizer_state(optimizer), f))
        if is_main:
            if optimizer is not None and not sharded:
                _write(tmp / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
            if scheduler is not None:
                _write(tmp / "scheduler.pt", lambda f: torch.save(scheduler.state_dict(), f))
        _barrier(accelerator)
        if is_main:
            state_json = json.dumps({"step": step, **(extra or {})}, indent=1)
            _write(tmp / "state.json", lambda f: f.write_text(state_json))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.all()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(accelerator)
        return final

    def load(
        self, path: Path, *, modules: dict[str, torch.nn.Module], optimizer=None, scheduler=None, accelerator=None
    ) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save`; returns its ``state.json`` contents."""
        rank = 0 if accelerator is None else accelerator.process_index
        state = _read(path / "state.json", lambda f: json.loads(f.read_text()))
        for name, module in modules.items():
            weights = _read(path / f"{name}.safetensors", lambda f: load_file(str(f)))
            load_trainable_state_dict(module, weights, accelerator)
        if optimizer is not None and any(is_sharded(module) for module in modules.values()):
            optimizer.load_state_dict(_read(path / f"optimizer-{rank}.pt", _load_data))
            reshard_optimizer_state(optimizer)
        elif optimizer is not None:
            optimizer.load_state_dict(_read(path / "optimizer.pt", _load_data))
        if scheduler is not None:
            scheduler.load_state_dict(_read(path / "scheduler.pt", _load_data))
        rng_file = path / f"rng-{rank}.pt"
        if not rng_file.exists():
            raise CheckpointError(
                f"{rng_file} is missing: was this checkpoint written with a different number of processes?"
            )
        set_rng_state(_read(rng_file, _load_data))
        return state


def _load_data(path: Path) -> Any:
    """``torch.load`` that accepts data only (tensors, numbers, strings, containers), never code."""
    return torch.load(path, weights_only=True)


def _read(path: Path, reader) -> Any:
    """``reader(path)``, with any failure turned into a :class:`CheckpointError` naming ``path``."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing (the checkpoint is incomplete)")
    try:
        return reader(path)
    except Exception as exc:  # truncated, corrupt or unsafe: every reader's own error class
        unsafe = "Unsupported global" in str(exc) or "not an allowed global" in str(exc)
        why = "it holds objects other than tensors and plain data, refused as unsafe" if unsafe else "it is unreadable"
        raise CheckpointError(f"{path}: cannot load the checkpoint file: {why} ({type(exc).__name__})") from exc


def _write(path: Path, writer) -> None:
    """``writer(path)``, with a failure (a full disk above all) turned into a :class:`CheckpointError`."""
    try:
        writer(path)
    except (OSError, RuntimeError) as exc:
        raise write_error(path, exc, "the checkpoint file") from exc


def disk_full(path: Path, exc: BaseException) -> bool:
    """Whether ``exc``, raised while writing ``path``, comes from a full disk: ENOSPC, or (torch
    reports a full disk as "unexpected pos ...") less than 1 MiB free where ``path`` is written."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in str(exc):
        return True
    try:
        stats = os.statvfs(path if path.is_dir() else path.parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20


def write_error(path: Path, exc: BaseException, what: str) -> CheckpointError:
    """A :class:`CheckpointError` naming ``path`` and saying "no space left on device" when the
    disk is full (:func:`disk_full`)."""
    if disk_full(path, exc):
        return CheckpointError(f"{path}: no space left on device while writing {what}")
    return CheckpointError(f"{path}: cannot write {what} ({type(exc).__name__}: {exc})")


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _unwrap(module: torch.nn.Module, accelerator) -> torch.nn.Module:
    return accelerator.unwrap_model(module) if accelerator is not None else module


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a :class:`~torch.distributed.tensor.DTensor` (FSDP2 shards)
    or a DeepSpeed ZeRO-3 partition (it carries ``ds_id``)."""
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in module.parameters())


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter's full value: a DTensor or a ZeRO-3 partition is gathered from every process (a
    collective call)."""
    if hasattr(param, "ds_id"):
        import deepspeed  # optional: only reached under DeepSpeed ZeRO-3

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()
    param = param.detach()
    return param.full_tensor() if isinstance(param, DTensor) else param


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every sharded (FSDP2 DTensor) entry gathered whole, on CPU: what
    ``save_pretrained(state_dict=...)`` writes. Every process must call it (one all-gather per tensor).

    FSDP2 modules are resharded first (local, no communication): a root module keeps its weights
    unsharded after a forward without backward (an evaluation), and ``state_dict()`` would then hold
    views of the gather buffer, which the next reshard frees."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
    params = dict(module.named_parameters())  # ZeRO-3 marks the parameters, not state_dict()'s tensors
    return {k: _whole(params.get(k, v)).to("cpu") for k, v in module.state_dict().items()}


def trainable_state_dict(module: torch.nn.Module, accelerator=None) -> dict[str, torch.Tensor]:
    """The parameters that require gradients (a LoRA adapter, a head, or all weights), whole and on CPU.
    Under FSDP2 every process must call it (each parameter is gathered from the shards)."""
    model = _unwrap(module, accelerator)
    return {n: _whole(p).to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], accelerator=None) -> None:
    """Copy ``state`` into the module's trainable parameters; every one must be present. A sharded
    (DTensor) parameter takes its own shard of the whole tensor, without communication."""
    model = _unwrap(module, accelerator)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"checkpoint does not match the model's trainable parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it written with other LoRA / freezing options?)"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name].to(param.device, param.dtype)
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            if hasattr(param, "ds_id"):  # a ZeRO-3 partition: whole while copied, then each keeps its part
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # rank 0's copy re-partitioned
                    param.copy_(value)
                continue
            param.copy_(value)


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with each DTensor replaced by this process's shard (a plain tensor),
    loadable with ``weights_only``; :func:`reshard_optimizer_state` turns them back after loading."""
    state = optimizer.state_dict()
    local = {
        i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in per_param.items()}
        for i, per_param in state["state"].items()
    }
    return {**state, "state": local}


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading :func:`local_optimizer_state`: every per-parameter tensor shaped like the local
    shard of a DTensor parameter becomes a DTensor with that parameter's mesh and placements."""
    for param, per_param in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        shard = param.to_local()
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == shard.shape:
                per_param[key] = DTensor.from_local(
                    value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
                )
