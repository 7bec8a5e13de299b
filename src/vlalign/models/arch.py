"""What the log-prob engine knows about a model: the wrappers around it and its architecture.

:func:`unwrap` reaches the Hugging Face model inside data-parallel and PEFT wrappers (LoRA layers
stay in place); :data:`ARCHITECTURES` lists the ``config.model_type`` values the packed
(prefix-shared) layout of :mod:`vlalign.models.packing` is verified on, with what each one needs
(:class:`ArchSupport`); :func:`sharing_unsupported` says why a model must be scored the naive
way (one row per completion) instead, or None when it can share its prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ArchSupport:
    """What the packed layout must know about an architecture."""

    mrope: bool = False
    """3-row multimodal RoPE positions from the model's ``get_rope_index`` (Qwen2-VL family)."""
    bidirectional_images: str | None = None
    """Per-token field marking image tokens (value 1) that attend to each other in both directions."""
    dict_masks: bool = False
    """The forward accepts ``{"full_attention": m, "sliding_attention": m}`` for sliding-window layers."""


ARCHITECTURES: dict[str, ArchSupport] = {
    "qwen2_vl": ArchSupport(mrope=True, dict_masks=True),
    "qwen2_5_vl": ArchSupport(mrope=True, dict_masks=True),
    "llava": ArchSupport(),
    "idefics3": ArchSupport(),
    "gemma3": ArchSupport(bidirectional_images="token_type_ids", dict_masks=True),
}
"""``config.model_type`` of the architectures the packed layout is verified on."""

_DENSE_ATTENTION = ("sdpa", "eager")


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside data-parallel wrappers (``DistributedDataParallel`` and friends); PEFT stays."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
        model = model.module
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside data-parallel and PEFT wrappers (LoRA layers stay in place)."""
    inner = unwrap_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def attention_implementation(model: nn.Module) -> str:
    """The language model's attention implementation (``"sdpa"``, ``"eager"``, ``"flex_attention"``...)."""
    config = unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", "eager"))


def sharing_unsupported(model: nn.Module) -> str | None:
    """Why the packed layout cannot be used with ``model``, or None when it can."""
    model_type = getattr(unwrap(model).config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return (
            f"prefix sharing is not verified for model_type {model_type!r} (verified: {sorted(ARCHITECTURES)}); "
            "computing log-probs the naive way (prompt and image repeated per completion)"
        )
    attn = attention_implementation(model)
    if attn not in _DENSE_ATTENTION and attn != "flex_attention":
        return (
            f"attention implementation {attn!r} cannot take a block mask (a completion must see the shared "
            "prompt); computing log-probs the naive way. Load the model with attn_implementation='sdpa' "
            "(or 'flex_attention' on GPUs) to share prompts"
        )
    return None


def text_config(model: nn.Module) -> Any:
    """The language model's config (the text config of a composite vision-language config)."""
    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def image_token_id(model: nn.Module) -> int | None:
    """The id of the image placeholder token (``image_token_id`` / ``image_token_index``), or None."""
    config = unwrap(model).config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
