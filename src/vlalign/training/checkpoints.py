"""Checkpoints with exact resume: the trainable parameters of each module, the optimiser and
scheduler states and every process's RNG state, written to a temporary folder and renamed into
place, so a run killed while saving leaves the previous checkpoint intact and never a
half-written one."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"


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

    def load(
        self, path: Path, *, modules: dict[str, torch.nn.Module], optimizer=None, scheduler=None, accelerator=None
    ) -> dict[str, Any]:
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
            raise FileNotFoundError(
                f"{rng_file} is missing: was this checkpoint written with a different number of processes?"
            )
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
