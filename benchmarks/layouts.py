"""Benchmark: DPO and GRPO steps in every layout, on a small and a real vocabulary, in one run.

For a DPO step (4 prompts x 2 completions) and a GRPO step (2 prompts x 8 completions), on the
``bench`` model (a ~1k-token vocabulary) and ``bench-vocab`` (Qwen's 151,936 rows), each
configuration runs one training step: the policy's forward + backward through
:func:`vlalign.models.logprobs.completion_logprobs` and the loss, plus, for DPO with an online
reference, the reference's forward (no gradient; after the policy's forward, while its
activations are held, as in ``vlalign dpo``). Configurations:

- ``naive``: one row per completion, the image repeated (what TRL does), full logits, online
  reference. The baseline of the ratios.
- ``old-default``: the shared-prefix rows (one per prompt), full logits, online reference: the
  default before issue 23.
- ``default``: the shared-prefix rows, ``logits_mode="auto"`` (chunked on ``bench-vocab``, full on
  ``bench``), cached reference log-probs (``reference.strategy=auto`` picks the cache for a run
  of more than one pass over its data): no reference forward in the step.
- ``packed``: ``default`` with every prompt of the batch in one row (``pack_length``).

GRPO has no reference forward here (its default KL coefficient is 0), so ``default`` differs from
``old-default`` by the LM-head path alone.

Reported per configuration: the median step time over ``--reps`` alternating repetitions (every
configuration once per round, so a load change on the shared machine hits them all alike), the
peak activation memory, the useful-token fraction of the policy's rows (tokens / slots) and the
ratios to ``naive``. Peak activation memory is the step's high-water mark of the memory torch
allocates on the device, minus parameters and gradients, measured by torch's memory profiler
(``torch.profiler.profile(profile_memory=True)``, its per-category timeline): gradients are
freed before each step (``zero_grad(set_to_none=True)``, torch's default), so a gradient
produced by the backward becomes ``.grad`` and counts as steady state, not as activation. The
profiled step is the warm-up (profiling slows it; it is not timed).

Run: ``python benchmarks/layouts.py [--reps 3] [--threads 1] [--gradient-checkpointing]``
(a table, then one JSON line with the ratios). ``--clock process`` times the process's CPU time
instead of the wall clock: on a CPU shared with other jobs, the step's own cost.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import vlalign.shapes  # noqa: F401  (registers the corpus the tiny tokenizers learn)
from logprobs import Workload, _loss, _workloads  # benchmarks/logprobs.py, next to this file
from vlalign.data.collate import pad_token_id_of
from vlalign.losses import dpo_loss
from vlalign.losses.preference import PreferenceLogps
from vlalign.models.load import load_model_and_processor
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.tiny import SIZES, build_tiny_model


@dataclass(frozen=True)
class Setup:
    """One configuration of the step."""

    name: str
    mode: str
    logits_mode: str
    cached_reference: bool
    pack: bool


SETUPS = (
    Setup("naive", "naive", "full", False, False),
    Setup("old-default", "shared", "full", False, False),
    Setup("default", "shared", "auto", True, False),
    Setup("packed", "shared", "auto", True, True),
)
ONE_ROW = 1 << 30
"""``pack_length`` that puts every prompt of a batch in one row."""


def _kwargs(setup: Setup, pad: int) -> dict[str, Any]:
    pack = ONE_ROW if setup.pack else None
    return {"mode": setup.mode, "logits_mode": setup.logits_mode, "pad_token_id": pad, "pack_length": pack}


def _reference_sums(model: torch.nn.Module, work: Workload, pad: int) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(model, work.prompts, work.completions, pad_token_id=pad, mode="naive").sums


def _dpo(result: Any, ref_sums: torch.Tensor) -> torch.Tensor:
    sums, ref = result.by_prompt(result.sums), result.by_prompt(ref_sums)  # (B, 2)
    logps = PreferenceLogps(
        chosen_logps=sums[:, 0], rejected_logps=sums[:, 1], ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1]
    )
    return dpo_loss(logps, beta=0.1).losses.mean()


def _step(model: torch.nn.Module, work: Workload, setup: Setup, pad: int, cached: torch.Tensor) -> Any:
    """One training step; returns the policy's result."""
    kwargs = _kwargs(setup, pad)
    result = completion_logprobs(model, work.prompts, work.completions, **kwargs)
    if work.k != 2:
        _loss(result, work).backward()
        return result
    if setup.cached_reference:
        ref_sums = cached
    else:
        with torch.no_grad():
            ref_sums = completion_logprobs(model, work.prompts, work.completions, **kwargs).sums
    _dpo(result, ref_sums).backward()
    return result


def _profiled_peak_mb(model: torch.nn.Module, work: Workload, setup: Setup, pad: int, cached: torch.Tensor) -> float:
    """Peak of (allocated - parameters - gradients - optimiser state) over the step, in MiB."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category, MemoryProfileTimeline

    model.zero_grad(set_to_none=True)
    gc.collect()
    device = next(model.parameters()).device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        _step(model, work, setup, pad, cached)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(str(device))
    steady = [_CATEGORY_TO_INDEX[c] + 1 for c in (Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE)]
    return max((sum(row) - sum(row[i] for i in steady) for row in sizes), default=0) / 2**20


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
"""``--clock``: wall-clock time (the default), or the CPU time of this process (on a CPU shared with
other jobs, what the step itself costs, whatever share of the cores the scheduler gives it)."""


def _timed(
    model: torch.nn.Module, work: Workload, setup: Setup, pad: int, cached: torch.Tensor, clock: str = "wall"
) -> tuple[float, Any]:
    model.zero_grad(set_to_none=True)
    gc.collect()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = CLOCKS[clock]()
    result = _step(model, work, setup, pad, cached)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return CLOCKS[clock]() - start, result


def _measure(model: torch.nn.Module, work: Workload, reps: int, pad: int, clock: str = "wall") -> dict[str, Any]:
    cached = _reference_sums(model, work, pad)
    out: dict[str, Any] = {}
    for s in SETUPS:
        peak = _profiled_peak_mb(model, work, s, pad, cached)
        out[s.name] = {"peak_mb": peak, "times_s": []}
    for _ in range(reps):
        for s in SETUPS:
            elapsed, result = _timed(model, work, s, pad, cached, clock)
            row = out[s.name]
            row["times_s"].append(elapsed)
            row.update(
                useful=result.num_tokens / result.num_slots,
                ran=f"{result.mode}/{result.logits_mode}",
                logps=result.logps.detach(),
            )
    for s in SETUPS:
        row = out[s.name]
        row["time_s"] = statistics.median(row["times_s"])
        row["max_abs_logprob_diff"] = float((row["logps"] - out["naive"]["logps"]).abs().max())
    for s in SETUPS:
        del out[s.name]["logps"]
    return out


def _table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"vlalign layouts benchmark: {args.arch}, device={args.device}, dtype={args.dtype}, threads={args.threads}, "
        f"{args.clock} time, median of {args.reps} alternating repetitions, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; peak = activation memory (torch memory profiler: "
        "allocated minus parameters and gradients); ratios to naive",
        f"{'model':<13}{'workload':<12}{'config':<13}{'ran':<16}{'time (s)':>9}{'x naive':>9}{'speed-up':>9}"
        f"{'peak MB':>9}{'x naive':>9}{'useful':>8}{'max|dlogp|':>12}",
    ]
    for key, res in results.items():
        size, name = key.split("/")
        base = res["naive"]
        label_m, label_w = size, name
        for s in SETUPS:
            r = res[s.name]
            lines.append(
                f"{label_m:<13}{label_w:<12}{s.name:<13}{r['ran']:<16}{r['time_s']:>9.2f}"
                f"{r['time_s'] / base['time_s']:>9.2f}{base['time_s'] / r['time_s']:>9.2f}{r['peak_mb']:>9.0f}"
                f"{r['peak_mb'] / base['peak_mb']:>9.2f}{r['useful']:>8.3f}{r['max_abs_logprob_diff']:>12.1e}"
            )
            label_m = label_w = ""
    return "\n".join(lines)


def _summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, res in results.items():
        old, new = res["old-default"], res["default"]
        out[key] = {
            s.name: {
                "time_s": round(res[s.name]["time_s"], 3),
                "peak_mb": round(res[s.name]["peak_mb"], 1),
                "useful_token_fraction": round(res[s.name]["useful"], 4),
            }
            for s in SETUPS
        }
        out[key]["default_speedup_vs_old_default"] = round(old["time_s"] / new["time_s"], 3)
        out[key]["default_peak_vs_old_default"] = round(new["peak_mb"] / old["peak_mb"], 3)
        out[key]["packed_peak_vs_old_default"] = round(res["packed"]["peak_mb"] / old["peak_mb"], 3)
        out[key]["packed_speedup_vs_old_default"] = round(old["time_s"] / res["packed"]["time_s"], 3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2_vl")
    parser.add_argument("--sizes", default="bench,bench-vocab", help="comma-separated model sizes")
    parser.add_argument("--pair-batch", type=int, default=4, help="prompts per preference batch (k = 2)")
    parser.add_argument("--group-batch", type=int, default=2, help="prompts per GRPO batch")
    parser.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="step time: wall or process CPU time")
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "vlalign-bench-models"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = {}
    for size in args.sizes.split(","):
        folder = build_tiny_model(args.arch, size, Path(args.model_dir) / f"{args.arch}-{size}")
        model, processor = load_model_and_processor(
            folder,
            device=args.device,
            dtype=args.dtype,
            attn_implementation="sdpa",
            gradient_checkpointing=args.gradient_checkpointing,
        )
        model.train()
        pad = pad_token_id_of(processor)
        for work in _workloads(processor, args, SIZES[size].image_px):
            label = f"DPO {args.pair_batch}x2" if work.k == 2 else f"GRPO {args.group_batch}x{work.k}"
            results[f"{size}/{label}"] = _measure(model, work, args.reps, pad, args.clock)
            print(f"done: {size} {label}", flush=True)
        del model
        gc.collect()
    print(_table(results, args))
    print(
        json.dumps(
            {
                **_summary(results),
                "device": args.device,
                "dtype": args.dtype,
                "threads": args.threads,
                "clock": args.clock,
            }
        )
    )


if __name__ == "__main__":
    main()
