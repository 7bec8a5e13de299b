"""Benchmark: shared-prefix versus naive completion log-probs, one forward + backward.

On the ``bench`` tiny model (448 px images = 256 image tokens per prompt, a short question,
completions of about 32 tokens), times one training step's forward and backward of

(a) a batch of preference pairs (k = 2 completions per prompt; the DPO loss), and
(b) a batch of GRPO groups (k = G = 8 completions per prompt; the PPO-clip surrogate with group
    advantages),

computed ``shared`` (one packed row per prompt, each image encoded once) and ``naive`` (one row
per completion, image repeated), side by side in one run: repetitions alternate between the two
modes and the median is reported. It prints a table (time, speed-up, peak step memory, tokens
processed, largest per-token log-prob difference) and ends with ONE JSON line holding
``pair_speedup``, ``group_speedup``, ``pair_peak_mem_ratio``, ``group_peak_mem_ratio`` and
``max_abs_logprob_diff``.

Peak memory, isolated per variant and per step: large allocations are served by ``mmap`` (the
allocator's mmap threshold is fixed at 64 KiB, so freed tensors go back to the system at once),
and before every step the kernel's high-water mark of the resident set is reset
(``/proc/self/clear_refs``); the step's peak is ``VmHWM`` after the step minus ``VmRSS`` before
it. The reported figure is the largest over the repetitions. Where ``clear_refs`` cannot be
written, each (mode, workload) runs in a fresh subprocess and its whole-process peak (model and
start-up included, so the ratios are closer to 1) is reported instead (``--isolate``).

On a GPU (``--device cuda``): the model and batches live on the device, every timed step is bracketed by
``torch.cuda.synchronize()``, and a step's peak is ``torch.cuda.max_memory_allocated()`` during the step
minus the memory allocated before it (the caching allocator's counters, reset before every step; with
``--isolate``, each child's whole-process peak of allocated GPU memory). ``--dtype bfloat16`` loads the
weights in bf16 (log-probs are still computed in float32 from the bf16 logits); the shared/naive log-prob
difference then holds the rounding of bf16. On one H100 (torch 2.11, transformers 5.24, defaults, median of
5; 2026-11-27): bfloat16 pair / group speed-ups 1.72x / 2.63x, peak-memory ratios 0.52 / 0.17, largest
log-prob difference 7.8e-3; float32 1.73x / 2.98x, 0.52 / 0.17, 9.5e-7. The tiny model leaves the GPU
mostly idle (a step takes 50 to 150 ms; fixed per-kernel costs weigh more), which is likely why the
speed-ups are smaller there than on a CPU.

Threads: one by default. On a shared 2-core machine, two intra-op threads stall on each other
whenever another process holds a core, and the stall is paid per operator, so it taxes the shared
mode (fewer FLOPs, as many operators) far more than the naive one: measured here with another job
running, 2 threads gave pair / group speed-ups of 1.37x / 2.99x where 1 thread gave 1.97x / 5.36x
in the same conditions. On a quiet machine, compare with ``--threads 2``.

Run: ``make bench`` or ``python benchmarks/logprobs.py [--arch qwen2_vl] [--reps 5] [--threads 2]``;
on a GPU ``python benchmarks/logprobs.py --device cuda [--dtype bfloat16]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

import vlalign.shapes  # noqa: F401  (registers the tokenizer corpus a fresh bench-model build needs)
from vlalign.data.collate import encode_prompts, pad_token_id_of
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.losses import dpo_loss, ppo_clip_loss
from vlalign.losses.advantages import grpo_advantages
from vlalign.losses.preference import PreferenceLogps
from vlalign.models.load import load_model_and_processor
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.tiny import build_tiny_model, image_tokens

MODES = ("shared", "naive")
QUESTIONS = [
    "Describe the image.",
    "How many shapes are there?",
    "Is there a red circle in the image?",
    "What colour is the square?",
]


# ------------------------------------------------------------------------------ memory probes


def _fix_malloc() -> bool:
    """Serve allocations >= 64 KiB by mmap so that freed tensors leave the resident set at once."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _on_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


class _CudaPeak:
    """Per-step peak of GPU memory allocated by the caching allocator, above its level before the step."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.before = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)

    def stop(self) -> float:
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - self.before) / 2**20


# ---------------------------------------------------------------------------------- the data


def _image(seed: int, px: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (px, px), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y, s = (int(v) for v in torch.randint(0, px - px // 4, (3,), generator=g))
        colour = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g))
        draw.ellipse((x, y, x + px // 8 + s // 4, y + px // 8 + s // 4), fill=colour)
    return img


def _completions(processor: Any, n_prompts: int, k: int, length: int, seed: int) -> list[list[list[int]]]:
    """Random in-vocabulary token ids, ``length`` +/- 4 tokens, each ending with the end-of-turn ids."""
    from vlalign.data.collate import end_of_turn_ids, tokenizer_of

    tok = tokenizer_of(processor)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    eot = end_of_turn_ids(processor)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_prompts):
        group = []
        for _ in range(k):
            n = length + int(torch.randint(-4, 5, (1,), generator=g))
            ids = torch.randint(0, len(vocab), (n - len(eot),), generator=g).tolist()
            group.append([vocab[i] for i in ids] + eot)
        out.append(group)
    return out


@dataclass
class Workload:
    name: str
    prompts: Any
    completions: list[list[list[int]]]
    k: int


def _workloads(processor: Any, args: argparse.Namespace, px: int) -> list[Workload]:
    out = []
    for name, n_prompts, k in (("pairs", args.pair_batch, 2), ("groups", args.group_batch, args.group_size)):
        samples = [
            PromptSample(id=f"{name}{i}", images=[_image(i, px)], prompt=user_prompt(QUESTIONS[i % 4]))
            for i in range(n_prompts)
        ]
        prompts = encode_prompts(processor, samples)
        out.append(Workload(name, prompts, _completions(processor, n_prompts, k, args.completion_tokens, seed=k), k))
    return out


# ---------------------------------------------------------------------------------- one step


def _loss(result: Any, work: Workload) -> torch.Tensor:
    if work.k == 2:
        sums = result.by_prompt(result.sums)  # (B, 2)
        zeros = torch.zeros_like(sums[:, 0])
        logps = PreferenceLogps(
            chosen_logps=sums[:, 0], rejected_logps=sums[:, 1], ref_chosen_logps=zeros, ref_rejected_logps=zeros
        )
        return dpo_loss(logps, beta=0.1).losses.mean()
    rewards = torch.arange(len(result), dtype=torch.float32, device=result.logps.device) % 3
    adv = grpo_advantages(rewards, group_size=work.k)
    out = ppo_clip_loss(result.logps, result.logps.detach(), adv, result.mask)
    return out.losses.sum() / result.mask.sum()


def _step(model: torch.nn.Module, work: Workload, mode: str, pad: int) -> tuple[float, float, Any]:
    gc.collect()
    model.zero_grad(set_to_none=True)
    gc.collect()
    device = next(model.parameters()).device
    cuda = _CudaPeak(str(device)) if _on_cuda(device) else None
    if cuda is not None:
        cuda.start()  # synchronizes: the timer starts with the GPU idle
    else:
        before = _status_kib("VmRSS")
        reset = _reset_peak()
    start = time.perf_counter()
    result = completion_logprobs(
        model,
        work.prompts,
        work.completions,
        mode=mode,  # type: ignore[arg-type]
        pad_token_id=pad,
    )
    _loss(result, work).backward()
    if cuda is not None:
        peak = cuda.stop()  # synchronizes: the timer stops when the backward has run
        elapsed = time.perf_counter() - start
    else:
        elapsed = time.perf_counter() - start
        peak = (_status_kib("VmHWM") - before) / 1024 if reset else float("nan")
    return elapsed, peak, result.detach()


def _measure(model: torch.nn.Module, work: Workload, modes: tuple[str, ...], reps: int, pad: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, list[float]] = {m: [] for m in modes}
    results: dict[str, Any] = {}
    for m in modes:  # warm-up
        _, _, results[m] = _step(model, work, m, pad)
    for _ in range(reps):
        for m in modes:
            t, p, _ = _step(model, work, m, pad)
            times[m].append(t)
            peaks[m].append(p)
    out: dict[str, Any] = {}
    for m in modes:
        out[m] = {
            "time_s": statistics.median(times[m]),
            "times_s": times[m],
            "peak_mb": max(peaks[m]),
            "tokens": results[m].num_tokens,
            "slots": results[m].num_slots,
        }
    if len(modes) == 2:
        a, b = results["shared"], results["naive"]
        out["max_abs_logprob_diff"] = float((a.logps - b.logps).abs().max())
    out["logps"] = {m: results[m].logps for m in modes}
    return out


# ---------------------------------------------------------------------------------- drivers


def _setup(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, list[Workload]]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    folder = build_tiny_model(args.arch, "bench", Path(args.model_dir) / f"{args.arch}-bench")
    model, processor = load_model_and_processor(
        folder,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    model.train()
    from vlalign.models.tiny import SIZES

    return model, processor, _workloads(processor, args, SIZES["bench"].image_px)


def _child(args: argparse.Namespace) -> None:
    """One (mode, workload) in a fresh process (``--isolate``): prints one JSON line with its figures."""
    _fix_malloc()
    model, processor, works = _setup(args)
    pad = pad_token_id_of(processor)
    work = next(w for w in works if w.name == args.workload)
    res = _measure(model, work, (args.only,), args.reps, pad)
    if _on_cuda(args.device):
        res[args.only]["peak_mb"] = torch.cuda.max_memory_allocated(args.device) / 2**20  # never reset here
    else:
        res[args.only]["peak_mb"] = _status_kib("VmHWM") / 1024
    res[args.only]["logps"] = res.pop("logps")[args.only].tolist()
    print(json.dumps(res[args.only]))


def _isolated(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in ("pairs", "groups"):
        out[name] = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--only", mode, "--workload", name]
            cmd += [a for a in sys.argv[1:] if a != "--isolate"]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out[name][mode] = json.loads(done.stdout.strip().splitlines()[-1])
        a, b = (torch.tensor(out[name][m].pop("logps")) for m in MODES)
        out[name]["max_abs_logprob_diff"] = float((a - b).abs().max())
    return out


def _table(results: dict[str, dict[str, Any]], args: argparse.Namespace, how_memory: str) -> str:
    lines = [
        f"vlalign log-prob benchmark: {args.arch} 'bench' ({image_tokens(args.arch, 'bench')} image tokens/prompt), "
        f"device={_device_name(args.device)}, dtype={args.dtype}, attention={args.attn}, "
        f"gradient checkpointing={'on' if args.gradient_checkpointing else 'off'}, "
        f"threads={args.threads}, median of {args.reps}, forward+backward; peak memory: {how_memory}",
        f"{'workload':<22}{'mode':<8}{'time (s)':>10}{'speed-up':>10}{'peak MB':>10}{'mem ratio':>10}"
        f"{'tokens':>8}{'slots':>8}{'max |dlogp|':>13}",
    ]
    for name, res in results.items():
        batch = args.pair_batch if name == "pairs" else args.group_batch
        k = 2 if name == "pairs" else args.group_size
        label = f"{name} ({batch} x k={k})"
        for m in MODES:
            r = res[m]
            speed = res["naive"]["time_s"] / r["time_s"]
            mem = r["peak_mb"] / res["naive"]["peak_mb"]
            diff = f"{res['max_abs_logprob_diff']:.2e}" if m == "shared" else ""
            lines.append(
                f"{label:<22}{m:<8}{r['time_s']:>10.3f}{speed:>9.2f}x{r['peak_mb']:>10.0f}{mem:>10.2f}"
                f"{r['tokens']:>8}{r['slots']:>8}{diff:>13}"
            )
            label = ""
    return "\n".join(lines)


def _device_name(device: str) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if _on_cuda(device) else device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2_vl")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--pair-batch", type=int, default=4, help="prompts per preference batch (k = 2)")
    parser.add_argument("--group-batch", type=int, default=2, help="prompts per GRPO batch")
    parser.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (see the module doc)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "vlalign-bench-models"))
    parser.add_argument("--isolate", action="store_true", help="each mode in a fresh process (whole-process peaks)")
    parser.add_argument("--only", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=("pairs", "groups"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if _on_cuda(args.device) and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    if args.only:
        _child(args)
        return
    cuda = _on_cuda(args.device)  # on a GPU the caching allocator's counters need neither probe
    if args.isolate or not (cuda or (_fix_malloc() and _reset_peak())):
        results = _isolated(args)
        how = (
            "whole-process peak of allocated GPU memory" if cuda else "whole-process peak RSS"
        ) + " (model included), one fresh process per mode and workload"
    else:
        model, processor, works = _setup(args)
        pad = pad_token_id_of(processor)
        results = {}
        for work in works:
            results[work.name] = _measure(model, work, MODES, args.reps, pad)
            results[work.name].pop("logps")
        how = (
            "per-step peak of allocated GPU memory above its level before the step"
            if cuda
            else "per-step high-water mark of the resident set above its level before the step"
        )
    print(_table(results, args, how))
    summary = {
        "pair_speedup": results["pairs"]["naive"]["time_s"] / results["pairs"]["shared"]["time_s"],
        "group_speedup": results["groups"]["naive"]["time_s"] / results["groups"]["shared"]["time_s"],
        "pair_peak_mem_ratio": results["pairs"]["shared"]["peak_mb"] / results["pairs"]["naive"]["peak_mb"],
        "group_peak_mem_ratio": results["groups"]["shared"]["peak_mb"] / results["groups"]["naive"]["peak_mb"],
        "max_abs_logprob_diff": max(results[n]["max_abs_logprob_diff"] for n in results),
    }
    line: dict[str, Any] = {k: round(v, 4) if k != "max_abs_logprob_diff" else v for k, v in summary.items()}
    print(json.dumps({**line, "device": str(args.device), "dtype": args.dtype}))


if __name__ == "__main__":
    main()
