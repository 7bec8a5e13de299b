"""Initialisation repairs for the random-init tiny models of :mod:`vlalign.models.tiny`.

Random inits that would leave a model degenerate are repaired: Gemma3's zero multimodal
projection (:func:`repair_degenerate_init`), and the learned position embeddings of SigLIP and
CLIP towers, which start as 2-D sine-cosine patterns (:func:`sincos_2d`,
:func:`geometric_position_init`). Measurements behind these choices: ``docs/notes/tiny-models.md``.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel


def repair_degenerate_init(model: PreTrainedModel, *, std: float) -> list[str]:
    """Re-initialise weight matrices a random init leaves at zero; return their names.

    Gemma3 zeroes ``multi_modal_projector.mm_input_projection_weight`` (its real checkpoints
    are trained); at zero the language model never sees the image. Any other 2-D weight left
    all-zero (an architecture could add one) is treated the same way. Biases and norm scales
    (1-D) are meant to start at zero and are left alone.
    """
    repaired: list[str] = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and not bool(param.any()):
                param.normal_(0.0, std)
                repaired.append(name)
    return repaired


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """``(side * side, dim)`` 2-D sine-cosine position codes, row-major (x fastest), values in [-1, 1].

    A quarter of the channels each hold ``sin(x w_k)``, ``cos(x w_k)``, ``sin(y w_k)`` and
    ``cos(y w_k)`` with ``w_k = 10000^(-k / (dim / 4))`` (the 2-D form of the Transformer's codes).
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine codes need a dimension divisible by 4, not {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    ys, xs = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    x, y = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega  # (side^2, dim/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def geometric_position_init(model: PreTrainedModel) -> list[str]:
    """Set learned vision position embeddings (SigLIP / CLIP) to :func:`sincos_2d`; return their names.

    A table of ``side^2`` rows is all patches; one of ``side^2 + 1`` rows (CLIP) starts with the
    class token's row, which is set to zero.
    """
    done: list[str] = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("position_embedding.weight") or "vision" not in name or param.ndim != 2:
                continue
            rows, dim = param.shape
            side = math.isqrt(rows)
            extra = rows - side * side
            if extra not in (0, 1) or dim % 4:
                continue
            param.zero_()
            param[extra:] = sincos_2d(side, dim)
            done.append(name)
    return done
