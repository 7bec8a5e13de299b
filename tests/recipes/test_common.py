"""Shared recipe pieces: the dtype a trained model loads in."""

from __future__ import annotations

import logging

import torch

from vlalign.recipes.common import trained_weights_dtype


def test_auto_dtype_keeps_float32_master_weights_for_full_fine_tuning(caplog):
    assert trained_weights_dtype("auto", lora=False) == "float32"
    assert trained_weights_dtype("auto", lora=True) == "auto"  # frozen base: bf16 on a capable GPU
    assert trained_weights_dtype("float32", lora=False) == "float32"
    with caplog.at_level(logging.WARNING, logger="vlalign"):
        assert trained_weights_dtype("bfloat16", lora=False) == "bfloat16"  # an explicit choice stands
    assert "updates smaller than the weights' rounding step are lost" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlalign"):
        trained_weights_dtype("bfloat16", lora=True)
    assert caplog.text == ""


def test_why_bf16_weights_lose_small_updates():
    """The docstring's arithmetic: AdamW's first step moves each weight by lr (here 5e-5). A bf16
    weight of 0.0625 = 2**-4 has a rounding step of 2**-4 * 2**-7 = 4.9e-4, so the update (under half
    of it) rounds away; in float32 the weight moves by lr."""
    for dtype, moved in ((torch.bfloat16, 0.0), (torch.float32, 5e-5)):
        w = torch.nn.Parameter(torch.full((4,), 0.0625, dtype=dtype))
        opt = torch.optim.AdamW([w], lr=5e-5, weight_decay=0.0)
        w.grad = torch.ones_like(w)
        opt.step()
        assert torch.allclose((0.0625 - w.detach().float()), torch.full((4,), moved), rtol=1e-3, atol=0.0)
