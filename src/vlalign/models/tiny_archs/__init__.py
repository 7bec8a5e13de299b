"""The architectures :func:`vlalign.models.tiny.build_tiny_model` knows, one module per family.

Each module defines ``ARCHS``, a tuple of :class:`~vlalign.models.tiny_spec.TinyArch` records;
:data:`REGISTRY` joins them in the order of :data:`MODULES`. Adding a family: write its module
(config, processor, tokenizer spec, repairs) and add it to :data:`MODULES`.
"""

from __future__ import annotations

from vlalign.models.tiny_archs import (
    gemma3,
    gemma4,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    mistral3,
    mllama,
    paligemma,
    qwen2,
    qwen3_5,
    qwen3_vl,
)
from vlalign.models.tiny_spec import TinyArch

MODULES = (
    qwen2,
    llava,
    idefics3,
    gemma3,
    internvl,
    llava_onevision,
    llava_next,
    qwen3_vl,
    qwen3_5,
    mistral3,
    mllama,
    gemma4,
    paligemma,
)
"""The family modules, in the order their architectures are listed (and tested)."""

REGISTRY: dict[str, TinyArch] = {arch.name: arch for module in MODULES for arch in module.ARCHS}
"""Every tiny architecture by name."""
