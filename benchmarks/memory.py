"""Benchmark: the chunked LM head against the full logits, on a small and a real vocabulary.

For a DPO step (preference pairs, k = 2) and a GRPO step (groups of G = 8), on the ``bench``
model (a ~1k-token vocabulary) and the ``bench-vocab`` model (Qwen's 151,936 rows), one
forward + backward of :func:`vlalign.models.logprobs.completion_logprobs` (shared prefixes, the
default) with ``logits_mode="full"`` (the kept logits, a float32 log-softmax: the path before
chunking) and ``logits_mode="chunked"`` (what ``"auto"`` picks on a CPU from 32,768 rows, and on
a GPU when the full logits would not fit; the head applied a block of vocabulary rows at a time,
no ``(tokens, vocabulary)`` tensor kept). Repetitions alternate between the two paths;
the median time and the largest peak are reported, with the ratios chunked / full.

Peak activation memory: the per-step high-water mark of the resident set above its level before
the step (``VmHWM`` after ``/proc/self/clear_refs``, allocations >= 64 KiB served by ``mmap``:
the method of ``benchmarks/logprobs.py``). Gradient buffers are allocated before the first timed
step and zeroed, not freed, between steps (``--free-grads`` frees them, as
``zero_grad(set_to_none=True)`` does), so the steady state holds weights and gradients and the
peak above it is the step's activations and temporaries. On a GPU (``--device cuda``) the
caching allocator's counters are used instead.

Caveat: with gradient buffers allocated before the step (the default here), autograd allocates
each parameter's new gradient before adding it to ``.grad``, so the LM head's and the embedding's
``(vocabulary, hidden)`` gradients appear as temporaries in both paths (297 MiB each on
``bench-vocab``); with ``--free-grads`` they become ``.grad`` but the resident set then counts them.
``benchmarks/layouts.py`` measures activation memory with torch's memory profiler instead
(allocated minus parameters and gradients) and is the benchmark of ``docs/performance.md``.

Run: ``python benchmarks/memory.py [--reps 3] [--threads 1] [--arch qwen2_vl]`` (one JSON line
at the end: the ratios per model and workload).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import vlalign.shapes  # noqa: F401  (registers the corpus the tiny tokenizers learn)
from logprobs import (  # benchmarks/logprobs.py, next to this file
    Workload,
    _CudaPeak,
    _fix_malloc,
    _loss,
    _on_cuda,
    _reset_peak,
    _status_kib,
    _workloads,
)
from vlalign.data.collate import pad_token_id_of
from vlalign.models.load import load_model_and_processor
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.tiny import SIZES, build_tiny_model

PATHS = ("full", "chunked")


def _step(model: torch.nn.Module, work: Workload, path: str, pad: int, free_grads: bool) -> tuple[float, float, Any]:
    model.zero_grad(set_to_none=free_grads)
    gc.collect()
    device = next(model.parameters()).device
    cuda = _CudaPeak(str(device)) if _on_cuda(device) else None
    if cuda is not None:
        cuda.start()
    else:
        before = _status_kib("VmRSS")
        _reset_peak()
    start = time.perf_counter()
    result = completion_logprobs(model, work.prompts, work.completions, pad_token_id=pad, logits_mode=path)  # type: ignore[arg-type]
    _loss(result, work).backward()
    if cuda is not None:
        peak = cuda.stop()
        elapsed = time.perf_counter() - start
    else:
        elapsed = time.perf_counter() - start
        peak = (_status_kib("VmHWM") - before) / 1024
    return elapsed, peak, result.detach()


def _measure(model: torch.nn.Module, work: Workload, reps: int, pad: int, free_grads: bool) -> dict[str, Any]:
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    peaks: dict[str, list[float]] = {p: [] for p in PATHS}
    results = {p: _step(model, work, p, pad, free_grads)[2] for p in PATHS}  # warm-up (allocates the grads)
    for _ in range(reps):
        for p in PATHS:
            t, m, _ = _step(model, work, p, pad, free_grads)
            times[p].append(t)
            peaks[p].append(m)
    out: dict[str, Any] = {
        p: {"time_s": statistics.median(times[p]), "times_s": times[p], "peak_mb": max(peaks[p])} for p in PATHS
    }
    out["ran"] = {p: results[p].logits_mode for p in PATHS}
    out["max_abs_logprob_diff"] = float((results["full"].logps - results["chunked"].logps).abs().max())
    out["tokens"] = int(results["full"].mask.sum())
    return out


def _model(args: argparse.Namespace, size: str) -> tuple[torch.nn.Module, Any, list[Workload]]:
    folder = build_tiny_model(args.arch, size, Path(args.model_dir) / f"{args.arch}-{size}")
    model, processor = load_model_and_processor(
        folder,
        device=args.device,
        dtype=args.dtype,
        attn_implementation="sdpa",
        gradient_checkpointing=args.gradient_checkpointing,
    )
    model.train()
    return model, processor, _workloads(processor, args, SIZES[size].image_px)


def _table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"vlalign LM-head benchmark: {args.arch}, device={args.device}, dtype={args.dtype}, threads={args.threads}, "
        f"median of {args.reps} (alternating), forward+backward, shared prefixes, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; peak = step high-water mark above "
        f"the steady state ({'gradients freed' if args.free_grads else 'weights + gradients'})",
        f"{'model':<13}{'workload':<18}{'path':<9}{'time (s)':>10}{'chunked/full':>14}{'peak MB':>10}"
        f"{'chunked/full':>14}{'tokens':>8}{'max |dlogp|':>13}",
    ]
    for key, res in results.items():
        size, name = key.split("/")
        k = 2 if name == "pairs" else args.group_size
        batch = args.pair_batch if name == "pairs" else args.group_batch
        label_m, label_w = size, f"{'DPO' if k == 2 else 'GRPO'} {batch}x{k}"
        for p in PATHS:
            r = res[p]
            t_ratio = f"{r['time_s'] / res['full']['time_s']:.2f}" if p == "chunked" else ""
            m_ratio = f"{r['peak_mb'] / res['full']['peak_mb']:.2f}" if p == "chunked" else ""
            diff = f"{res['max_abs_logprob_diff']:.1e}" if p == "chunked" else ""
            lines.append(
                f"{label_m:<13}{label_w:<18}{res['ran'][p]:<9}{r['time_s']:>10.3f}{t_ratio:>14}{r['peak_mb']:>10.0f}"
                f"{m_ratio:>14}{res['tokens'] if p == 'full' else '':>8}{diff:>13}"
            )
            label_m = label_w = ""
    return "\n".join(lines)


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
    parser.add_argument("--free-grads", action="store_true", help="free gradients between steps (set_to_none)")
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "vlalign-bench-models"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if not _on_cuda(args.device) and not (_fix_malloc() and _reset_peak()):
        parser.error("per-step peaks need /proc/self/clear_refs and glibc's mallopt (Linux)")
    results: dict[str, dict[str, Any]] = {}
    for size in args.sizes.split(","):
        model, processor, works = _model(args, size)
        pad = pad_token_id_of(processor)
        for work in works:
            results[f"{size}/{work.name}"] = _measure(model, work, args.reps, pad, args.free_grads)
        del model, works
        gc.collect()
    print(_table(results, args))
    summary = {
        key: {
            "time_ratio": round(r["chunked"]["time_s"] / r["full"]["time_s"], 3),
            "speedup": round(r["full"]["time_s"] / r["chunked"]["time_s"], 3),
            "peak_mem_ratio": round(r["chunked"]["peak_mb"] / r["full"]["peak_mb"], 3),
            "max_abs_logprob_diff": r["max_abs_logprob_diff"],
        }
        for key, r in results.items()
    }
    print(json.dumps({**summary, "device": args.device, "dtype": args.dtype, "threads": args.threads}))


if __name__ == "__main__":
    main()
