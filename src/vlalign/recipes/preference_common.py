"""What the offline preference recipes (``vlalign dpo``, ``vlalign kto``, iterative DPO) share.

The loops themselves live in :mod:`vlalign.recipes.dpo` and :mod:`vlalign.recipes.kto`; this
module holds the pieces around them:

* the ``reference`` config section and :func:`build_reference` (frozen copy, adapter-disabled,
  precomputed on disk, or another model given by ``--ref-model``), built from the weights the
  policy starts with, before any checkpoint is restored;
* data checks beyond the loader's (:func:`check_pairs`): a pair whose chosen text equals its
  rejected text teaches nothing, so it is an error naming the row, or a counted skip with
  ``data.skip_bad_rows``; image-conditioned pairs (``rejected_images``, from
  ``vlalign pairs --method=corrupt``) are the exception, trained by the ``mdpo`` term;
* global means for data parallelism and gradient accumulation (:class:`MetricSums`): every
  per-example mean divides by the number of examples of the whole optimiser step over all
  processes, summed before any backward pass;
* the evaluation suite on the model in memory (:func:`run_suite`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlalign.config import StrictFields, to_dict
from vlalign.data.chat import response_affixes
from vlalign.data.io import load_samples_with_report
from vlalign.data.schema import DataError, PreferenceSample, data_error, verify_image
from vlalign.eval.suite import build_suite, evaluate
from vlalign.models.load import load_model_and_processor, same_tokenizer
from vlalign.models.logprobs import Mode
from vlalign.models.memory import free_bytes, parameter_bytes, reference_copy_problem, training_state_bytes
from vlalign.models.reference import (
    FrozenCopyReference,
    PrecomputedReference,
    ReferencePolicy,
    make_reference,
)
from vlalign.models.tiny import resolve_model
from vlalign.recipes.common import DataConfig, ModelConfig, process_model_config, resolve_data_option
from vlalign.training import Run, union_of_keys
from vlalign.training.distributed import sharding_of
from vlalign.training.trackers import log_samples, samples_from_records

logger = logging.getLogger("vlalign")

REJECTED_IMAGES = "rejected_images"
"""Meta column of image-conditioned pairs: the images the (same) rejected text is conditioned on."""


@dataclass
class ReferenceConfig(StrictFields):
    """The reference policy of the implicit rewards r(y) = log pi(y|x) - log pi_ref(y|x)."""

    strategy: Literal["auto", "copy", "adapter", "precomputed"] = "auto"
    """auto (precomputed when the run passes over its data more than once and the recipe can cache
    every reference log-prob it needs, as DPO can; else adapter for LoRA, copy otherwise), copy (a
    frozen copy in memory), adapter (the LoRA policy with its adapter switched off), precomputed
    (log-probs computed once before training and cached on disk; no reference model in memory
    while training)."""
    cache_dir: str = ""
    """precomputed: folder of the cached log-probs ('' = <output_dir>/reference_cache). Entries are
    keyed by the reference weights, each sample's content (images included) and its completions."""


# ----------------------------------------------------------------------------- model and reference


def planned_passes(train: Any, num_samples: int, num_processes: int = 1) -> float:
    """Passes over ``num_samples`` training samples that the run's plan makes (0 when unknown)."""
    if train.max_steps <= 0:
        return float(train.epochs)
    per_step = train.batch_size * train.grad_accum * num_processes
    return train.max_steps * per_step / num_samples if num_samples > 0 else 0.0


def resolved_strategy(strategy: str, *, lora: bool, ref_model: str, passes: float = 0.0) -> str:
    """The reference strategy that ``strategy`` means for this run (auto resolved, combinations checked).

    ``auto`` caches the reference log-probs (``precomputed``) when the run passes over its data
    more than once (``passes`` > 1: each sample's reference forward then runs once instead of once
    per pass, and the reference model is freed before training); otherwise a copy, or the
    adapter-disabled policy for LoRA. ``passes`` = 0: the caller cannot use a cache (auto as before).
    """
    if strategy == "auto":
        if passes > 1.0:
            return "precomputed"
        return "copy" if ref_model or not lora else "adapter"
    if strategy == "adapter" and ref_model:
        raise ValueError(
            "reference.strategy=adapter uses the policy's own base weights; it cannot be combined "
            "with --ref-model (use copy or precomputed)"
        )
    if strategy == "adapter" and not lora:
        raise ValueError("reference.strategy=adapter needs LoRA (--model.use_lora=true); use copy or precomputed")
    return strategy


def build_reference(
    cfg: ReferenceConfig,
    policy: nn.Module,
    processor: Any,
    *,
    model_cfg: ModelConfig,
    ref_model: str,
    run: Run,
    mode: Mode,
    pad_token_id: int,
    num_samples: int = 0,
) -> ReferencePolicy:
    """The reference policy (build it BEFORE training starts and before a checkpoint is restored).

    ``ref_model`` (a folder, hub name or ``tiny:...``) replaces the starting policy as the
    reference; it must tokenize like the policy, since rewards compare the same token ids.
    ``num_samples`` (training samples; 0 = this recipe cannot cache every reference log-prob it
    needs) lets ``auto`` pick the cache when the run passes over them more than once. The
    strategy and the reason are printed and recorded in ``run.json`` (``reference``).
    """
    passes = planned_passes(run.cfg, num_samples, run.num_processes) if num_samples else 0.0
    strategy = resolved_strategy(cfg.strategy, lora=model_cfg.use_lora, ref_model=ref_model, passes=passes)
    why = "set by reference.strategy" if cfg.strategy != "auto" else f"auto: {passes:.2f} planned passes over the data"
    sharded = sharding_of(run)
    if cfg.strategy == "auto" and num_samples and strategy == "copy" and sharded:  # no whole copy per process
        strategy, why = "precomputed", f"auto: the policy is sharded ({sharded}): no whole copy on every process"
    copy_policy = True  # a frozen copy scores the precomputed cache, unless it would not fit in memory
    if cfg.strategy == "auto" and num_samples and not (ref_model or model_cfg.use_lora or sharded):
        device = next(policy.parameters()).device
        state = training_state_bytes(policy)
        if problem := reference_copy_problem(parameter_bytes(policy), state, free_bytes(device), str(device)):
            why = f"auto: {problem}" if strategy == "copy" else f"{why}; {problem}"
            strategy, copy_policy = "precomputed", False
    run.print(f"reference: {strategy} ({why})")
    if getattr(run, "record", None) is not None:
        run.record["reference"] = {"strategy": strategy, "reason": why}
    if ref_model:
        other, other_processor = load_model_and_processor(
            resolve_model(ref_model, seed=model_cfg.tiny_seed),
            dtype=model_cfg.dtype,
            device=process_model_config(model_cfg, run).device,
            attn_implementation=model_cfg.attn_implementation or None,
        )
        if not same_tokenizer(processor, other_processor):
            raise ValueError(
                f"--ref-model {ref_model!r} has another tokenizer than the policy; the reference must "
                "score the same token ids (use a model of the same family)"
            )
        source: ReferencePolicy = FrozenCopyReference(other, mode=mode, pad_token_id=pad_token_id)
        del other
        if strategy == "copy":
            return source
        return PrecomputedReference(source, _cache_dir(cfg, run))
    if strategy == "precomputed":
        return make_reference(
            "precomputed",
            policy,
            cache_dir=_cache_dir(cfg, run),
            mode=mode,
            pad_token_id=pad_token_id,
            copy_policy=copy_policy,
        )
    return make_reference(strategy, policy, mode=mode, pad_token_id=pad_token_id)  # type: ignore[arg-type]


def _cache_dir(cfg: ReferenceConfig, run: Run) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else run.run_dir / "reference_cache"


def reference_module(reference: ReferencePolicy) -> nn.Module | None:
    """The reference as a separate model in memory (for the suite's KL), or None (adapter, cache)."""
    if isinstance(reference, FrozenCopyReference):
        return reference.model
    if isinstance(reference, PrecomputedReference) and isinstance(reference.source, FrozenCopyReference):
        return reference.source.model
    return None


def finish_precompute(reference: ReferencePolicy, run: Run) -> None:
    """After the main process filled the cache: every process drops the source model (frees memory)."""
    run.accelerator.wait_for_everyone()
    if isinstance(reference, PrecomputedReference):
        reference.reload()  # re-read the shards the main process wrote
        reference.release_source()


# ----------------------------------------------------------------------------- data


def load_pairs_split(
    path: str,
    cfg: DataConfig,
    *,
    image_conditioned_ok: bool,
    limit: int | None = None,
    numeric_columns: Sequence[str] = (),
) -> tuple[list[PreferenceSample], dict[str, int]]:
    """Preference samples of ``path`` (the loader's checks, then :func:`check_pairs`); returns them and
    the rows skipped per reason (with ``data.skip_bad_rows``), the loader's and ours together.
    ``numeric_columns`` are columns a loss reads (HSA-DPO's severity...): each row must hold a
    finite number there, checked at load time so that ``data.skip_bad_rows`` can skip the row."""
    resolved = resolve_data_option(path, cfg)
    cap = limit if limit is not None else (cfg.limit or None)
    samples, report = load_samples_with_report(
        resolved,
        "preference",
        image_root=cfg.image_root or None,
        skip_bad_rows=cfg.skip_bad_rows,
        limit=cap,
        numeric_columns=numeric_columns,
    )
    base = Path(cfg.image_root) if cfg.image_root else (resolved if resolved.is_dir() else resolved.parent)
    kept, skipped = check_pairs(
        samples,
        image_root=base,
        image_conditioned_ok=image_conditioned_ok,  # type: ignore[arg-type]
        skip_bad_rows=cfg.skip_bad_rows,
        source=path,
    )
    for reason, n in report.skipped.items():
        skipped[reason] = skipped.get(reason, 0) + n
    if not kept:
        raise DataError(f"{path}: no usable preference pairs ({report.summary()}; skipped {skipped})")
    return kept, skipped


def check_pairs(
    samples: Sequence[PreferenceSample],
    *,
    image_root: Path,
    image_conditioned_ok: bool,
    skip_bad_rows: bool,
    source: str = "data",
) -> tuple[list[PreferenceSample], dict[str, int]]:
    """Refuse (or skip and count) pairs that cannot teach a preference; resolve ``rejected_images``.

    A pair whose rejected text equals its chosen text (or one of ``rejected_extra`` does) has a
    zero DPO margin whatever the weights: a :class:`DataError` naming the sample, or a skip counted
    under ``"chosen equals rejected"``. Image-conditioned pairs (same text, ``rejected_images`` in
    the row) are kept when ``image_conditioned_ok`` (the ``mdpo`` term uses those images).
    """
    kept: list[PreferenceSample] = []
    skipped: dict[str, int] = {}
    for sample in samples:
        try:
            kept.append(_check_pair(sample, image_root, image_conditioned_ok, source))
        except DataError as exc:
            if not skip_bad_rows:
                raise
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
    if skipped:
        logger.warning("%s: skipped %s", source, ", ".join(f"{n} pairs ({r})" for r, n in skipped.items()))
    return kept, skipped


def _check_pair(
    sample: PreferenceSample, image_root: Path, image_conditioned_ok: bool, source: str
) -> PreferenceSample:
    where = f"{source}: sample {sample.id!r}"
    conditioned = sample.meta.get(REJECTED_IMAGES)
    if conditioned is not None:
        if not isinstance(conditioned, list) or len(conditioned) != len(sample.images):
            raise data_error(
                "bad rejected_images",
                f"{where}: '{REJECTED_IMAGES}' must list one image per image of the row ({len(sample.images)})",
            )
        meta = dict(sample.meta)
        meta[REJECTED_IMAGES] = [
            str(image_root / p) if isinstance(p, str) and not os.path.isabs(p) else p for p in conditioned
        ]
        for k, image in enumerate(meta[REJECTED_IMAGES]):
            if not isinstance(image, (str, bytes)):
                raise data_error(
                    "bad rejected_images", f"{where}: '{REJECTED_IMAGES}[{k}]' is {image!r:.60}, not a path"
                )
            verify_image(image, where=f"{where} '{REJECTED_IMAGES}[{k}]'")
        sample = dataclasses.replace(sample, meta=meta)
    same = [
        k for k, text in enumerate([sample.rejected, *sample.rejected_extra]) if text.strip() == sample.chosen.strip()
    ]
    if same and not (conditioned is not None and image_conditioned_ok):
        which = "rejected" if same[0] == 0 else f"rejected_extra[{same[0] - 1}]"
        hint = (
            "it is an image-conditioned pair (rejected_images): train it with the mdpo loss"
            if conditioned is not None
            else "fix or drop the row, or set data.skip_bad_rows=true to skip such rows"
        )
        raise data_error(
            "chosen equals rejected",
            f"{where}: '{which}' is the same text as 'chosen', so the pair carries no preference; {hint}",
        )
    return sample


def numeric_column(samples: Sequence[Any], column: str, *, needed_by: str) -> Tensor:
    """``meta[column]`` of every sample as a float64 ``(B,)`` tensor; a missing or bad value names the sample."""
    values = []
    for s in samples:
        value = s.meta.get(column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(
                f"sample {s.id!r}: {needed_by} reads the numeric column {column!r}, but the row has "
                f"{value!r}, not a finite number; fix the column (or point the option at another one)"
            )
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float64)


def process_shard(items: Sequence[Any], run: Run) -> list[Any]:
    """This process's share of ``items`` (every ``num_processes``-th, from its rank)."""
    return list(items[run.process_index :: run.num_processes])


def chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def response_affixes_of(processor: Any, response_tokens: str) -> tuple[str, str] | None:
    """The ``affixes`` of :func:`~vlalign.data.collate.encode_completions` for a recipe's ``response_tokens``:
    None for "vlalign" (the text and the end-of-turn token), TRL's ``(lead, tail)`` for "trl"
    (:func:`~vlalign.data.chat.response_affixes`: everything the chat template writes after the prompt)."""
    if response_tokens not in ("vlalign", "trl"):
        raise ValueError(f"response_tokens must be 'vlalign' or 'trl', not {response_tokens!r}")
    return response_affixes(processor) if response_tokens == "trl" else None


# ----------------------------------------------------------------------------- global means


class MetricSums:
    """Sums of per-example metrics over micro-batches, turned into global means at the end.

    ``add(metrics, n)`` takes batch means of ``n`` examples; :meth:`means` sums over processes and
    divides by the global count, so a 2-process step reports what a 1-process step would.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, Tensor] = {}

    def add(self, metrics: dict[str, Tensor], n: int) -> None:
        for key, value in metrics.items():
            v = value.detach().to(self.device, torch.float64) * n
            self.sums[key] = self.sums[key] + v if key in self.sums else v

    def means(self, run: Run, total: Tensor) -> dict[str, Tensor]:
        """Global means (a metric some process lacks, having had no examples, counts 0 there)."""
        names = union_of_keys(run, list(self.sums))  # every process must join the same all-reduces
        out = {}
        for key in names:
            local = self.sums.get(key, torch.zeros((), dtype=torch.float64, device=self.device))
            out[key] = run.accelerator.reduce(local, reduction="sum") / total.to(torch.float64)
        return out


# ----------------------------------------------------------------------------- the end of a run


def run_suite(
    model: nn.Module,
    processor: Any,
    suite_cfg: Any,
    *,
    run: Run,
    reference: nn.Module | None,
    progress: bool,
    step: int,
    filename: str = "suite_eval.json",
) -> dict[str, float]:
    """The evaluation suite on the model in memory (main process; others wait): ``suite/...`` metrics.

    Writes every answer and metric to ``<run_dir>/<filename>`` (for reports and galleries) and sends
    the first held-out descriptions to the run's trackers at ``step`` (``suite/samples``, :func:`log_samples`).
    """
    metrics: dict[str, float] = {}
    if run.accelerator.is_main_process:
        suite = build_suite(suite_cfg)
        result = evaluate(run.accelerator.unwrap_model(model), processor, suite, reference=reference, progress=progress)
        metrics = {f"suite/{k}": float(v) for k, v in result.metrics.items()}
        payload = {"metrics": result.metrics, "suite": to_dict(suite_cfg), "records": result.records}
        (run.run_dir / filename).write_text(json.dumps(payload, indent=1) + "\n")
        log_samples(run.accelerator, step, samples_from_records(result.records), name="suite/samples")
    run.accelerator.wait_for_everyone()
    return metrics


def evaluation(
    run: Run,
    model: nn.Module,
    processor: Any,
    *,
    heldout: Callable[[], dict[str, float]] | None,
    suite: Any,
    eval_suite: str,
    reference: nn.Module | None,
    progress: bool,
    step: int | None = None,
) -> dict[str, float]:
    """The evaluations of a preference run: the held-out metrics (``heldout()``; None without a held-out
    split), then the suite on the model in memory. During training (at step ``step``) the suite runs
    when ``eval_suite`` is "every" (answers in ``suite_eval_step<step>.json``); at the end (``step``
    None) unless it is "none"."""
    metrics = heldout() if heldout is not None else {}
    if step is not None and eval_suite == "every":
        metrics.update(
            run_suite(
                model,
                processor,
                suite,
                run=run,
                reference=reference,
                progress=False,
                step=step,
                filename=f"suite_eval_step{step}.json",
            )
        )
    elif step is None and eval_suite != "none":
        metrics.update(
            run_suite(model, processor, suite, run=run, reference=reference, progress=progress, step=run.total)
        )
    return metrics
