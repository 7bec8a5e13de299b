"""Tiny InternVL (InternVL3's ``-hf`` layout): an InternViT tower, pixel shuffle, an MLP projector and a Qwen2 decoder.

An image becomes ``<img>``, ``image_seq_length`` ``<IMG_CONTEXT>`` tokens per tile, ``</img>``.
The image processor (``GotOcr2ImageProcessor``) tiles an image whose aspect ratio is far from
square into up to :data:`MAX_TILES` tiles of ``image_px`` plus a thumbnail; a square image stays
one tile, so the shapes world's images become ``(image_px / patch / merge)^2`` context tokens
(tiny 4, small 9, bench 256; :func:`_image_tokens` adds the two delimiters) and a wide image
becomes 3 tiles (2 + thumbnail). The pixel-shuffle scale is ``1 / merge`` (``small``, merge 1:
no shuffle). The processor also takes videos: each frame becomes one tile's tokens
(``Frame1: <img>...</img>``), its frames travel in ``pixel_values`` with the images'.

Repairs: InternViT's learned position table starts at zero (:func:`_repair` sets 2-D sine-cosine
codes, class row zero); its class token, also zero, is redrawn by the generic repair.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from vlalign.models.tiny_init import sincos_2d
from vlalign.models.tiny_spec import SizeSpec, TinyArch, merged_tokens, vocab_rows
from vlalign.models.tiny_tokenizer import TokenizerSpec

MAX_TILES = 2
"""Most tiles an image is cut into (besides the thumbnail); a square image is never cut."""


def chatml_template(image: str, video: str) -> str:
    """ChatML (no default system prompt) writing ``image`` per image part and ``video`` per video part."""
    parts = (
        (
            "{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}{{ IMAGE }}"
            "{%- elif part['type'] == 'video' -%}{{ VIDEO }}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}"
        )
        .replace("IMAGE", repr(image))
        .replace("VIDEO", repr(video))
    )
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}" + parts + "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


INTERNVL_TEMPLATE = chatml_template("<IMG_CONTEXT>\n", "<video>\n")
"""ChatML as InternVL3 writes it: ``<IMG_CONTEXT>\\n`` per image, ``<video>\\n`` per video (expanded by
the processor)."""

TOKENIZER = TokenizerSpec(
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    end_of_turn="<|im_end|>",
    specials=("<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
    chat_template=INTERNVL_TEMPLATE,
    named={
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
    role_words=("system\n", "user\n", "assistant\n"),
)
"""InternVL's tokenizer: ChatML plus the image delimiters and context token its processor reads."""


def qwen2_text(spec: SizeSpec, tok: PreTrainedTokenizerFast) -> Qwen2Config:
    """A Qwen2 language model at ``spec`` (1-D RoPE; InternVL3 and LLaVA-OneVision build on it)."""
    return Qwen2Config(
        vocab_size=vocab_rows(spec, tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _image_tokens(spec: SizeSpec) -> int:
    """``<img>``, one tile's context tokens (the common rule), ``</img>``: tiny 6, small 11, bench 258."""
    return merged_tokens(spec) + 2


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> InternVLConfig:
    vision = InternVLVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=spec.patch,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=qwen2_text(spec, tok),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=merged_tokens(spec),
        downsample_ratio=1.0 / spec.merge,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> InternVLProcessor:
    size = {"height": spec.image_px, "width": spec.image_px}
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES)
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=merged_tokens(spec),
        chat_template=INTERNVL_TEMPLATE,
    )


def _repair(model: PreTrainedModel, spec: SizeSpec) -> list[str]:
    """Set InternViT's zero-initialised position table ``(1, 1 + side^2, D)`` to 2-D sine-cosine codes."""
    done: list[str] = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("vision_tower.embeddings.position_embeddings"):
                continue
            side = math.isqrt(param.shape[1] - 1)
            param.zero_()
            param[0, 1:] = sincos_2d(side, param.shape[2])
            done.append(name)
    return done


ARCHS = (TinyArch("internvl", TOKENIZER, _config, _processor, image_tokens=_image_tokens, repair=_repair),)
