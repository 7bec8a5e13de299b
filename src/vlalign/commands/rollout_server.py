"""``vlalign rollout-server``: a vLLM engine on the rollout devices, for trainers on others (docs/vllm.md).

Example (GPU 0 generates, GPUs 1-3 train)::

    CUDA_VISIBLE_DEVICES=0 vlalign rollout-server --model=/models/qwen2.5-vl-7b --port=8000
    CUDA_VISIBLE_DEVICES=1,2,3 accelerate launch --num_processes=3 -m vlalign.cli grpo --config my.yaml \\
        --model.name_or_path=/models/qwen2.5-vl-7b --rollout.engine=vllm --rollout.vllm_server=http://localhost:8000

The trainer checks at start-up that the server answers and serves its model, pushes the policy's
weights after every update, and sends each rollout's prompts (``/generate``); the server needs vLLM,
the trainer does not. It serves until ``POST /close`` or Ctrl-C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vlalign.config import StrictFields
from vlalign.errors import UserError
from vlalign.models.tiny import resolve_model


@dataclass
class Config(StrictFields):
    """The model to serve, where, and the vLLM engine's memory settings."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model",)

    model: str = ""
    """The policy's starting model (a folder, or tiny:<arch>:<size>); the trainer's model.name_or_path
    must name the same folder (its rollout.vllm_server check compares them)."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface; the server has no authentication)."""
    port: int = 8000
    """Port to listen on."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """The engine's precision (the trainer's weights are converted to it when they arrive)."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory vLLM may take (weights + KV cache); the GPU is the server's alone."""
    max_model_len: int = 4096
    """Longest prompt + completion, in tokens (sizes vLLM's KV cache)."""
    tensor_parallel: int = 1
    """GPUs the engine spans (tensor parallel)."""
    tiny_seed: int = 0
    """Seed of a tiny:<arch>:<size> model (as the trainer's model.tiny_seed)."""
    verbose: bool = False
    """Print one line per HTTP request."""


def check_config(cfg: Config) -> None:
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise UserError(f"gpu_memory_utilization must be in (0, 1], got {cfg.gpu_memory_utilization}")
    if not 0 <= cfg.port < 65536:
        raise UserError(f"port must be in [0, 65535], got {cfg.port}")


def run(cfg: Config) -> int:
    """Start the engine on the model's folder and serve it until closed."""
    from vlalign.models.rollout_server import RolloutServer, serve
    from vlalign.models.vllm_engine import VLLMEngine, VLLMOptions, unsupported_reason

    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"needs vLLM ({exc.__class__.__name__}: {exc}); install it where the server runs (GPU: pip install "
            "vllm; CPU test environment: make test-vllm)"
        ) from None
    path = resolve_model(cfg.model, seed=cfg.tiny_seed)
    reason = unsupported_reason(path)
    if reason:
        raise UserError(f"vLLM cannot load {path}: {reason}")
    options = VLLMOptions(
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel,
    )
    engine = VLLMEngine(path, None, dtype=getattr(torch, cfg.dtype), options=options)
    state = RolloutServer(engine, model_id=cfg.model, root=path, max_model_len=cfg.max_model_len)
    serve(state, host=cfg.host, port=cfg.port, verbose=cfg.verbose)
    return 0
