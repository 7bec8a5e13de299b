"""Tiny LLaVA-NeXT (LLaVA-1.6): LLaVA's CLIP tower, projector and Llama decoder with any-resolution tiles.

Every image is processed "anyres", as LLaVA-OneVision's single images
(:mod:`vlalign.models.tiny_archs.llava_onevision`): a base tile of the whole image plus the tiles
of the best grid among :func:`~vlalign.models.tiny_archs.llava_onevision.pinpoints`, stacked in
``pixel_values`` ``(images, 1 + tiles, C, H, W)`` with ``image_sizes`` ``(images, 2)``; the tiles'
features are un-padded and each row ends with ``image_newline``. CLIP's class token is dropped
(``default`` feature selection), so a square image is ``n + n + sqrt(n)`` ``<image>`` tokens, ``n =
(image_px / patch / merge)^2``: tiny 10, small 21, bench 528. Unlike OneVision, an image keeps its
tiles when its prompt holds several images. No video.
"""

from __future__ import annotations

from transformers import (
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

from vlalign.models.tiny_archs.llava import clip_vision
from vlalign.models.tiny_archs.llava_onevision import image_tokens_anyres, pinpoints
from vlalign.models.tiny_spec import SizeSpec, TinyArch, llama_text, merged_tokens
from vlalign.models.tiny_tokenizer import SPECS


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> LlavaNextConfig:
    return LlavaNextConfig(
        vision_config=clip_vision(spec),
        text_config=llama_text(spec, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=merged_tokens(spec),
        image_grid_pinpoints=pinpoints(spec),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> LlavaNextProcessor:
    px = spec.image_px
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": px}, crop_size={"height": px, "width": px}, image_grid_pinpoints=pinpoints(spec)
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=spec.patch * spec.merge,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=SPECS["llava"].chat_template,
    )


ARCHS = (TinyArch("llava_next", SPECS["llava"], _config, _processor, image_tokens=image_tokens_anyres),)
