"""How much memory a device has free, and whether a frozen reference copy fits beside the policy.

The defaults that depend on memory (``logits_mode="auto"`` on CUDA,
:func:`vlalign.models.head_logprobs.auto_logits_mode`; ``reference.strategy=auto``,
:func:`reference_copy_problem`) are pure functions of sizes; this module measures the sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ADAMW_STATE_PER_PARAMETER = 2
"""AdamW keeps two moments per trainable parameter, each in the parameter's dtype (torch's
``AdamW``, what :func:`vlalign.training.run.build_optimizer` builds)."""


def cuda_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device for new tensors: the driver's free memory (``mem_get_info``)
    plus what torch's caching allocator holds reserved but unused (torch reuses it first)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def system_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The system memory available to a new allocation without swapping (Linux ``MemAvailable``:
    free memory plus the page cache the kernel can drop); None where it cannot be read."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_bytes(device: torch.device) -> int | None:
    """Free memory where ``device``'s tensors live: CUDA's free memory, else the system's available memory."""
    if device.type == "cuda":
        return cuda_free_bytes(device)
    return system_available_bytes() if device.type == "cpu" else None


def parameter_bytes(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Bytes of ``model``'s parameters (parameter count x bytes per element), each shared tensor once."""
    seen: dict[int, int] = {}
    for param in model.parameters():
        if not trainable_only or param.requires_grad:
            seen[id(param)] = param.numel() * param.element_size()
    return sum(seen.values())


def training_state_bytes(model: nn.Module) -> int:
    """What training adds to the policy's weights: a gradient and AdamW's two moments per trainable parameter."""
    return (1 + ADAMW_STATE_PER_PARAMETER) * parameter_bytes(model, trainable_only=True)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def reference_copy_problem(
    copy_bytes: int, state_bytes: int, free: int | None, where: str = "the device"
) -> str | None:
    """Why a frozen reference copy does not fit (None when it does, or when the free memory is unknown).

    The copy (``copy_bytes``, every parameter of the policy) must fit in ``free`` bytes beside the
    training state the policy still allocates (``state_bytes``: its gradients and AdamW's moments,
    :func:`training_state_bytes`); the policy's weights are already resident, so not counted again.
    """
    if free is None or copy_bytes + state_bytes <= free:
        return None
    return (
        f"a reference copy ({_gb(copy_bytes)}) and the policy's gradients and optimiser state "
        f"({_gb(state_bytes)}) need {_gb(copy_bytes + state_bytes)}, more than the {_gb(free)} free on {where}"
    )
