"""Rollout throughput of the two engines: vlalign's decode loop (hf) and vLLM, on one tiny model.

The GRPO shape: P prompts with their images, G sampled completions each (temperature 1), up to
``--max-new`` tokens. Each engine generates the same prompts ``--reps`` times after one warm-up; the
table gives the best repetition's completions/s and generated tokens/s. Needs vLLM (the CPU test
environment of ``make test-vllm``, or vLLM's GPU build):

    .venv-vllm/bin/python benchmarks/rollout_engines.py                 # bench size, G = 8, CPU
    .venv-vllm/bin/python benchmarks/rollout_engines.py --server        # + a rollout-server row
    python benchmarks/rollout_engines.py --device cuda --dtype bfloat16 --size bench-vocab

On a CPU at tiny sizes vLLM is not expected to win (no paged-attention or CUDA-graph gains); the
numbers that matter come from a GPU (benchmarks/gpu_check.sh runs this there).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch


def _prompts(count: int) -> list[Any]:
    from PIL import Image, ImageDraw

    from vlalign.data.schema import PromptSample, user_prompt

    out = []
    for i in range(count):
        img = Image.new("RGB", (64, 64), (250, 250, 250))
        ImageDraw.Draw(img).ellipse((8 + i % 5, 8, 40, 40 + i % 7), fill=(40 * i % 255, 90, 200))
        out.append(PromptSample(f"b{i}", [img], user_prompt("Describe the image.")))
    return out


def _time(fn: Any, reps: int) -> tuple[float, Any]:
    fn()  # warm-up
    best, result = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _start_server(path: str, args: argparse.Namespace) -> tuple[Any, str]:
    """``vlalign rollout-server`` on ``path`` in a subprocess (same Python), once it answers: (process, URL)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vlalign.cli", "rollout-server", f"--model={path}", f"--port={port}"]
    cmd += [f"--dtype={args.dtype}", f"--gpu_memory_utilization={args.gpu_memory}", "--max_model_len=2048"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the rollout server exited with status {proc.returncode}: {' '.join(cmd)}") from None
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2_vl")
    parser.add_argument("--size", default="bench")
    parser.add_argument("--prompts", type=int, default=4, help="P, prompts per rollout")
    parser.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gpu-memory", type=float, default=0.3, help="vLLM's gpu_memory_utilization")
    parser.add_argument("--server", action="store_true", help="add a row: vLLM behind vlalign rollout-server")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import vlalign.shapes  # noqa: F401  (registers the tokenizer corpus of the tiny models)
    from vlalign.models.generate import generate
    from vlalign.models.load import load_model_and_processor
    from vlalign.models.tiny import resolve_model
    from vlalign.models.vllm_engine import VLLMEngine, VLLMOptions

    path = resolve_model(f"tiny:{args.arch}:{args.size}")
    model, processor = load_model_and_processor(path, dtype=args.dtype, device=args.device)
    prompts = _prompts(args.prompts)
    kw = {"n": args.group_size, "temperature": 1.0, "max_new_tokens": args.max_new, "seed": 0}
    kw["batch_size"] = args.prompts
    options = VLLMOptions(gpu_memory_utilization=args.gpu_memory, max_model_len=2048)
    engine = VLLMEngine(path, processor, dtype=getattr(torch, args.dtype), options=options)
    engine.load_weights(model)
    engines = [
        ("hf", lambda: generate(model, processor, prompts, **kw)),
        ("vllm", lambda: engine.generate(model, prompts, **kw)),
    ]
    server = None
    if args.server:
        from vlalign.models.vllm_client import ServerEngine

        server, url = _start_server(path, args)
        client = ServerEngine(url, path, processor)
        client.load_weights(model)
        engines.append(("server", lambda: client.generate(model, prompts, **kw)))
    rows = []
    for name, fn in engines:
        seconds, gens = _time(fn, args.reps)
        completions = args.prompts * args.group_size
        rows.append((name, seconds, completions / seconds, gens.new_tokens / seconds, gens.new_tokens))
    if server is not None:
        server.terminate()
        server.wait(timeout=60)
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"rollout engines: tiny:{args.arch}:{args.size} {args.dtype} on {device}; P={args.prompts} G={args.group_size}"
    )
    print(f"{'engine':8s} {'seconds':>8s} {'completions/s':>14s} {'tokens/s':>10s} {'tokens':>7s}")
    for name, seconds, cps, tps, tokens in rows:
        print(f"{name:8s} {seconds:8.3f} {cps:14.1f} {tps:10.0f} {tokens:7d}")


if __name__ == "__main__":
    main()
