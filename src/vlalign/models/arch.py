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

from torch import Tensor, nn


@dataclass(frozen=True)
class ArchSupport:
    """What the packed layout must know about an architecture."""

    mrope: bool = False
    """3-row multimodal RoPE positions from the model's ``get_rope_index`` (Qwen2-VL family)."""
    bidirectional_images: str | None = None
    """Per-token field marking image tokens (value 1) that attend to each other in both directions."""
    dict_masks: bool = False
    """The forward accepts ``{"full_attention": m, "sliding_attention": m}`` for sliding-window layers."""
    bidirectional_when: tuple[str, Any] | None = None
    """``(text-config attribute, value)``: image blocks are bidirectional only when the attribute has
    that value (Gemma 4: ``use_bidirectional_attention == "vision"``); None: always."""
    bidirectional_sliding_only: bool = False
    """Image blocks open on sliding-window layers only; global layers stay causal (Gemma 4)."""
    bidirectional_prompt: bool = False
    """Prefix-LM: the whole prompt (image and text) is one bidirectional block, each completion
    attends to it and causally to itself (PaliGemma)."""
    cache_sharing: bool = False
    """Share prompts through the model's cache instead of a packed row (a prompt pass, then the
    completions continue from its cache): layers a block mask cannot describe, such as Qwen3.5's
    linear attention (:mod:`vlalign.models.prefix_cache`)."""


ARCHITECTURES: dict[str, ArchSupport] = {
    "qwen2_vl": ArchSupport(mrope=True, dict_masks=True),
    "qwen2_5_vl": ArchSupport(mrope=True, dict_masks=True),
    "llava": ArchSupport(),
    "idefics3": ArchSupport(),
    "internvl": ArchSupport(),  # tiles: each prompt's pixel_values rows (data.collate)
    "llava_onevision": ArchSupport(),  # any-res: image_sizes and batch_num_images per prompt
    "llava_next": ArchSupport(),  # any-res: image_sizes per prompt
    "mistral3": ArchSupport(),
    "mllama": ArchSupport(),  # cross-attention mask per packed token: vlalign.data.batch.TOKEN_SPAN_KEYS
    "gemma3": ArchSupport(bidirectional_images="token_type_ids", dict_masks=True),
    "gemma4": ArchSupport(
        bidirectional_images="mm_token_type_ids",
        dict_masks=True,
        bidirectional_when=("use_bidirectional_attention", "vision"),
        bidirectional_sliding_only=True,
    ),
    "paligemma": ArchSupport(bidirectional_prompt=True),
    "qwen3_vl": ArchSupport(mrope=True),
    "qwen3_vl_moe": ArchSupport(mrope=True),
    "qwen3_5": ArchSupport(mrope=True, cache_sharing=True),
    "qwen3_5_moe": ArchSupport(mrope=True, cache_sharing=True),
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


def cache_sharing(model: nn.Module) -> bool:
    """Whether ``model`` shares its prompts through its cache (:attr:`ArchSupport.cache_sharing`)."""
    support = ARCHITECTURES.get(getattr(unwrap(model).config, "model_type", None))
    return support is not None and support.cache_sharing


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


ONE_BASED_POSITIONS = frozenset({"paligemma"})
"""``config.model_type`` of the architectures whose positions start at 1 (the model's own default)."""


def position_base(model: nn.Module) -> int:
    """The position of a sequence's first token: 1 for :data:`ONE_BASED_POSITIONS`, else 0."""
    return 1 if getattr(unwrap(model).config, "model_type", None) in ONE_BASED_POSITIONS else 0


def cache_of(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` in newer ``transformers``, else ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def left_padded_positions(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, vision: dict[str, Tensor]
) -> tuple[Tensor, Tensor | None]:
    """Positions of left-padded prompt rows ``(B, P)`` (``(3, B, P)`` with multimodal RoPE) and the
    multimodal RoPE offset of each row (None without it): the model's own ``get_rope_index`` for the
    Qwen2-VL family, else positions counted from the first real token (from 1 for PaliGemma)."""
    rope = next((m for m in model.modules() if hasattr(type(m), "get_rope_index")), None)
    if rope is not None and "mm_token_type_ids" in vision:
        grid = {k: vision[k] for k in ("image_grid_thw", "video_grid_thw") if k in vision}
        return rope.get_rope_index(
            input_ids, mm_token_type_ids=vision["mm_token_type_ids"], attention_mask=attention_mask, **grid
        )
    return (attention_mask.cumsum(-1) - 1).clamp(min=0) + position_base(model), None


def image_token_id(model: nn.Module) -> int | None:
    """The id of the image placeholder token (``image_token_id`` / ``image_token_index``), or None."""
    config = unwrap(model).config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
