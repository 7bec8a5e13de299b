"""Tiny LLaVA-OneVision: a SigLIP tower, a two-layer projector, any-resolution tiles and a Qwen2 decoder.

One image in a prompt is processed "anyres": the whole image resized to ``image_px`` (the base
tile) plus the tiles of the best grid among :func:`pinpoints` (``1 x 1``, ``1 x 2``, ``2 x 1``
tiles of ``image_px``), stacked in ``pixel_values`` ``(images, 1 + tiles, C, H, W)`` (zero tiles pad
a batch) with ``image_sizes`` ``(images, 2)`` and ``batch_num_images`` ``(prompts,)``. The tiles'
features are un-padded to the image's aspect ratio and each row of them ends with the learned
``image_newline``, so the number of ``<image>`` tokens depends on the image's size: ``n`` (base)
``+ n + sqrt(n)`` for a square image, ``n = (image_px / patch / merge)^2`` (the patch is
``patch * merge``, as LLaVA: no token merge): tiny 10, small 21, bench 528 (:func:`image_tokens_anyres`);
a wide 2:1 image gets ``1 x 2`` tiles. A prompt with several images gets no tiles: ``n + 1``
tokens per image. Videos: ``<video>`` per video part; each frame's features are pooled 2 x 2, so
a frame is ``ceil(sqrt(n) / 2)^2`` tokens and a video one newline more.
"""

from __future__ import annotations

import math

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from vlalign.models.tiny_archs.internvl import chatml_template, qwen2_text
from vlalign.models.tiny_spec import SizeSpec, TinyArch, merged_tokens
from vlalign.models.tiny_tokenizer import TokenizerSpec

ONEVISION_TEMPLATE = chatml_template("<image>\n", "<video>\n")
"""ChatML with ``<image>\\n`` per image and ``<video>\\n`` per video (expanded by the processor)."""

TOKENIZER = TokenizerSpec(
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    end_of_turn="<|im_end|>",
    specials=("<|im_start|>", "<image>", "<video>"),
    chat_template=ONEVISION_TEMPLATE,
    named={"image_token": "<image>", "video_token": "<video>"},
    role_words=("system\n", "user\n", "assistant\n"),
)
"""LLaVA-OneVision's tokenizer (Qwen2's ChatML with ``<image>`` and ``<video>``)."""

VISION_ASPECT_RATIO = "anyres_max_9"
"""Features of more than 9 tiles' worth are interpolated down (never reached by :func:`pinpoints`)."""


def pinpoints(spec: SizeSpec) -> list[list[int]]:
    """The tile grids an image may be resized to: 1 x 1, 1 x 2 and 2 x 1 tiles of ``image_px``."""
    px = spec.image_px
    return [[px, px], [px, 2 * px], [2 * px, px]]


def image_tokens_anyres(spec: SizeSpec) -> int:
    """Tokens of one square image alone in its prompt: base ``n``, one tile ``n``, ``sqrt(n)`` newlines."""
    n = merged_tokens(spec)
    return 2 * n + math.isqrt(n)


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=spec.patch * spec.merge,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=qwen2_text(spec, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints(spec),
        vision_aspect_ratio=VISION_ASPECT_RATIO,
        tie_word_embeddings=False,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> LlavaOnevisionProcessor:
    size = {"height": spec.image_px, "width": spec.image_px}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints(spec)),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=merged_tokens(spec),
        vision_feature_select_strategy="full",
        vision_aspect_ratio=VISION_ASPECT_RATIO,
        chat_template=ONEVISION_TEMPLATE,
    )


ARCHS = (TinyArch("llava_onevision", TOKENIZER, _config, _processor, image_tokens=image_tokens_anyres),)
