"""Config sections, edge builders and steps that every recipe shares: which model, which data, the
distributed guards, the held-out suite of a task list and saving the final model.

The builders here turn config sections into plain arguments for :mod:`vlalign.models.load` and
:mod:`vlalign.data.io`, so that nothing below the recipes ever sees a config object.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vlalign.config import ConfigError, StrictFields
from vlalign.data.io import load_samples_with_report
from vlalign.data.schema import DataError, DataFileNotFoundError
from vlalign.data.sources import registered_sources
from vlalign.eval.suite import Suite, SuiteConfig, build_suite
from vlalign.eval.tasks import DESCRIBE, task_of
from vlalign.models.load import LoraSpec, load_model_and_processor, save_model_and_processor
from vlalign.models.tiny import resolve_model
from vlalign.shapes.embedded import resolve_data
from vlalign.training import Run, check_supported
from vlalign.training.checkpoints import disk_full, full_state_dict, is_sharded, write_error
from vlalign.training.options import check_options

logger = logging.getLogger("vlalign")


@dataclass
class ModelConfig(StrictFields):
    """The policy model: where it comes from and how it trains."""

    name_or_path: str = "tiny:gemma3:small"
    """A local folder, a hub name, or tiny:<arch>:<size> (built offline; the demo model is tiny:gemma3:small)."""
    dtype: str = "auto"
    """Weights dtype: float32, bfloat16, float16, or auto: float32 when every weight trains (bf16
    compute comes from train.mixed_precision; bf16 weights would round away AdamW updates smaller
    than 1/512 to 1/256 of a weight), and with LoRA bf16 on GPUs that support it (the adapters stay
    float32), float32 on CPUs."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:1 ..."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager, flash_attention_2, flex_attention."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    use_lora: bool = False
    """Train LoRA adapters (see the lora section) instead of every weight."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA options (used when use_lora is true)."""
    freeze_vision: bool = False
    """Full fine-tuning only: keep the vision tower frozen."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run (off unless you trust the model's authors)."""
    tiny_seed: int = 0
    """Seed of the random initialisation when name_or_path is tiny:<arch>:<size>."""
    quantization: str = "none"
    """none, or nf4 (QLoRA, with use_lora only; needs bitsandbytes: pip install 'vlalign[qlora]'): the
    language model's linear layers load in 4-bit NF4 with double quantisation and compute in
    model.dtype; the vision tower, projector and LM head stay in full precision. The saved adapter
    loads on the full-precision base."""

    def validate(self, prefix: str = "model") -> None:
        """Refuse unusable values (called by :class:`~vlalign.training.Run` before the model loads)."""
        check_options(
            prefix,
            [
                ("name_or_path", bool(self.name_or_path), "must name a model"),
                ("quantization", self.quantization in ("none", "nf4"), "must be none or nf4"),
                ("quantization", self.quantization == "none" or self.use_lora, "nf4 (QLoRA) needs use_lora: true"),
            ],
            values=self,
        )
        if self.quantization == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{prefix}.quantization=nf4 needs the bitsandbytes package: pip install 'vlalign[qlora]'")
        if self.use_lora:
            lora = self.lora
            check_options(
                f"{prefix}.lora",
                [
                    ("r", lora.r > 0, "must be > 0"),
                    ("alpha", lora.alpha > 0, "must be > 0"),
                    ("dropout", 0 <= lora.dropout < 1, "must be in [0, 1)"),
                ],
                values=lora,
            )


@dataclass
class DataConfig(StrictFields):
    """Training and held-out data."""

    train: str = "shapes:train.jsonl"
    """Training file or folder: JSONL, Parquet, a saved HF dataset, or shapes:<file> (the embedded world)."""
    eval: str = "shapes:validation.jsonl"
    """Held-out file in the same format as train ('' for none)."""
    image_root: str = ""
    """Folder that relative image paths start from ('' means the data file's folder)."""
    max_length: int = 1024
    """Longest prompt + completion in tokens; longer samples are dropped or rejected (never truncated through an image)."""
    on_overlong: Literal["drop", "raise"] = "drop"
    """What to do with a sample longer than max_length: drop it (and count it) or stop with an error."""
    skip_bad_rows: bool = False
    """Skip (and count) rows with missing columns, unreadable images or empty text instead of stopping."""
    limit: int = 0
    """Use at most this many rows of each file (0: all)."""
    eval_limit: int = 256
    """Use at most this many held-out rows for the periodic evaluation (0: all)."""

    def validate(self, prefix: str = "data") -> None:
        """Refuse unusable values (called by :class:`~vlalign.training.Run` before the model loads)."""
        check_options(
            prefix,
            [
                ("max_length", self.max_length > 0, "must be > 0"),
                ("on_overlong", self.on_overlong in ("drop", "raise"), "must be drop or raise"),
                ("limit", self.limit >= 0, "must be >= 0 (0: all rows)"),
                ("eval_limit", self.eval_limit >= 0, "must be >= 0 (0: all rows)"),
            ],
            values=self,
        )

    def check_files(self, prefix: str = "data") -> None:
        """Refuse a data file that is not there, naming its option (called by
        :class:`~vlalign.training.Run` after the option values, before the model loads)."""
        for name in ("train", "eval"):
            path = getattr(self, name)
            named = any(path.startswith(source) for source in registered_sources())
            if path and path != "auto" and not named and not Path(path).exists():
                raise DataFileNotFoundError(f"{prefix}.{name}: no file or folder {path!r}")


def trained_weights_dtype(dtype: str, *, lora: bool) -> str:
    """The dtype to load a model in that trains: ``auto`` is float32 when every weight trains.

    Without float32 master weights, an AdamW step changes a bf16 weight only when the update is
    at least half its rounding step (2**-9 to 2**-8 of the weight): at a learning rate of 5e-5 most
    updates of weights above 0.03 would vanish. Frozen base weights (LoRA) may stay in bf16.
    """
    if dtype == "auto" and not lora:
        return "float32"
    if dtype in ("bfloat16", "bf16", "float16", "fp16") and not lora:
        logger.warning(
            "model.dtype=%s with every weight training: AdamW updates smaller than the weights' "
            "rounding step are lost; float32 weights with train.mixed_precision=bf16 keep them",
            dtype,
        )
    return dtype


def load_policy(cfg: ModelConfig, *, lora: bool | None = None) -> tuple[torch.nn.Module, Any]:
    """The model and processor that ``cfg`` describes, in :func:`trained_weights_dtype`."""
    use_lora = cfg.use_lora if lora is None else lora
    return load_model_and_processor(
        resolve_model(cfg.name_or_path, seed=cfg.tiny_seed),
        dtype=trained_weights_dtype(cfg.dtype, lora=use_lora),
        device=cfg.device,
        attn_implementation=cfg.attn_implementation or None,
        gradient_checkpointing=cfg.gradient_checkpointing,
        lora=cfg.lora if use_lora else None,
        freeze_vision=cfg.freeze_vision,
        trust_remote_code=cfg.trust_remote_code,
        quantization=cfg.quantization if use_lora else "none",
    )


def load_split(
    path: str, kind: str, cfg: DataConfig, *, limit: int | None = None, numeric_columns: Sequence[str] = ()
) -> list[Any]:
    """Samples of ``kind`` from ``path`` with the data section's validation options; logs skips.
    ``numeric_columns`` are columns a loss reads: each row must hold a finite number there."""
    if not path:
        return []
    resolved = resolve_data_option(path, cfg)
    cap = limit if limit is not None else (cfg.limit or None)
    samples, report = load_samples_with_report(
        resolved,
        kind,
        image_root=cfg.image_root or None,
        skip_bad_rows=cfg.skip_bad_rows,
        limit=cap,
        numeric_columns=numeric_columns,
    )
    if not samples:
        raise DataError(f"{path}: no usable {kind} rows ({report.summary()})")
    return samples


def resolve_data_option(path: str, cfg: DataConfig) -> Path:
    """The file or folder a data option names (``shapes:<file>`` resolved); a missing one is a
    :class:`~vlalign.data.schema.DataFileNotFoundError` naming the option and the path."""
    resolved = Path(resolve_data(path))
    if not resolved.exists():
        option = "data.train" if path == cfg.train else "data.eval" if path == cfg.eval else "data"
        raise DataFileNotFoundError(f"{option}: data file {path!r} does not exist (resolved to {resolved})")
    return resolved


# ----------------------------------------------------------------------------- distributed runs


def guard_distributed(
    run: Run, cfg: ModelConfig, *, micro_batches_per_step: int, hint: str = "train.grad_accum=1"
) -> ModelConfig:
    """The guards every recipe applies before loading its model: refuse set-ups the loop does not
    support (:func:`vlalign.training.check_supported`: several backward passes per optimiser step
    under DeepSpeed), and return the model config of this process (:func:`process_model_config`)."""
    check_supported(run, micro_batches_per_step=micro_batches_per_step, hint=hint)
    return process_model_config(cfg, run)


def process_model_config(cfg: ModelConfig, run: Run) -> ModelConfig:
    """``cfg`` with ``device: auto`` replaced by this process's device (each rank loads onto its own GPU)."""
    if cfg.device == "auto":
        return dataclasses.replace(cfg, device=str(run.device))
    return cfg


# ----------------------------------------------------------------------------- evaluation and saving


def task_suite(cfg: SuiteConfig, tasks: Sequence[str]) -> Suite | None:
    """The evaluation suite of ``cfg`` restricted to held-out and compositional prompts of ``tasks``,
    with POPE only when ``describe`` is one of them (None when nothing is left to evaluate)."""
    if not cfg.parts or not tasks:
        return None
    suite = build_suite(cfg)
    keep = set(tasks)
    suite.heldout = [s for s in suite.heldout if task_of(s) in keep]
    suite.compositional = [s for s in suite.compositional if task_of(s) in keep]
    if DESCRIBE not in keep:
        suite.pope = {}
    return suite if len(suite) else None


def save_final_model(run: Run, model: torch.nn.Module, processor: Any, mode: str) -> Path | None:
    """The trained model in Hugging Face format at ``<run_dir>/model`` (main process; others wait).
    An FSDP2-sharded model is first gathered whole by every process (:func:`full_state_dict`), then
    written by the main process: a full folder, or the adapter of a PEFT model."""
    out = None
    unwrapped = run.accelerator.unwrap_model(model)
    state = full_state_dict(unwrapped) if is_sharded(unwrapped) else None
    if run.accelerator.is_main_process:
        folder = run.run_dir / "model"
        try:
            out = _save_model(unwrapped, processor, folder, mode, state)
        except OSError as exc:  # a full disk above all: one line naming the folder
            raise write_error(folder, exc, "the model") from exc
        except RuntimeError as exc:  # safetensors / torch report a full disk as a RuntimeError
            if not disk_full(folder, exc):
                raise
            raise write_error(folder, exc, "the model") from exc
        run.print(f"saved the model to {out}")
    run.accelerator.wait_for_everyone()
    return out


def _save_model(model: torch.nn.Module, processor: Any, folder: Path, mode: str, state: dict | None) -> Path:
    """:func:`save_model_and_processor`, or, with the gathered ``state`` of a sharded model, its
    ``save_pretrained(state_dict=state)`` ("merged" would need a whole copy: refused)."""
    if state is None:
        return save_model_and_processor(model, processor, folder, mode=mode)
    if mode == "merged":
        raise ConfigError(
            "--save=merged is not supported for a sharded (FSDP) model: save the adapter and merge it later"
        )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state)
    processor.save_pretrained(folder)
    return folder
