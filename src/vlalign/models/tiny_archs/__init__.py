"""The architectures :func:`vlalign.models.tiny.build_tiny_model` knows, one module per family.

Each module defines ``ARCHS``, a tuple of :class:`~vlalign.models.tiny_spec.TinyArch` records;
:data:`REGISTRY` joins them in the order of :data:`MODULES`. Adding a family: write its module
(config, processor, tokenizer spec, repairs) and add it to :data:`MODULES`.
"""

from __future__ import annotations

from vlalign.models.tiny_archs import gemma3, idefics3, llava, qwen2
from vlalign.models.tiny_spec import TinyArch

MODULES = (qwen2, llava, idefics3, gemma3)
"""The family modules, in the order their architectures are listed (and tested)."""

REGISTRY: dict[str, TinyArch] = {arch.name: arch for module in MODULES for arch in module.ARCHS}
"""Every tiny architecture by name."""
