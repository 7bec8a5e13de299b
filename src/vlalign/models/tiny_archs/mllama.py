"""Tiny Llama-3.2-Vision (``mllama``): a tiled two-stage ViT and a Llama decoder with gated cross-attention layers.

The image never enters the token sequence: the prompt holds one ``<|image|>`` token per image,
and the decoder's cross-attention layers (interleaved with its self-attention layers) attend to
the vision tower's output. Which tokens see which image is the processor's
``cross_attention_mask`` ``(batch, tokens, images, tiles)``: every token from an image's
``<|image|>`` on sees that image's real tiles (the last image: to the end of the sequence, so the
answer sees it too). The image processor cuts an image into up to :data:`MAX_TILES` tiles of
``image_px`` (a square image: one tile and one padding tile, masked); the tower's patch is
``patch * merge`` (as for LLaVA, which has no token merge), so a tile gives
``(image_px / patch / merge)^2`` patch features plus a class token: tiny 4 + 1, small 9 + 1,
bench 256 + 1. The sequence count of :func:`_image_tokens` is therefore 1 at every size.

Layers: ``text_layers`` self-attention layers and ``max(1, text_layers // 3)`` cross-attention
layers spread among them (:func:`cross_layers`; the real 11B model: 32 and 8).

Repairs (:func:`_repair`): the real init sets both gates of every cross-attention layer to zero,
and ``tanh(0) = 0`` makes the decoder ignore the image entirely (its output would not depend on
it, and no cross-attention weight but the gates would get a gradient); they are set to
``pi / 4``, the value the model's own class gives its gated vision layers. The tower's learned
position table is set to 2-D sine-cosine codes (class row zero), as for SigLIP and CLIP towers.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    MllamaConfig,
    MllamaImageProcessor,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from vlalign.models.tiny_init import sincos_2d
from vlalign.models.tiny_spec import SizeSpec, TinyArch, vocab_rows
from vlalign.models.tiny_tokenizer import TokenizerSpec, _parts

MAX_TILES = 2
"""Most tiles an image is cut into (aspect ratios 1x1, 1x2, 2x1)."""

GATE = math.pi / 4
"""Value of the repaired cross-attention gates (``tanh(pi / 4) = 0.66``)."""

MLLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    + _parts("{{ '<|image|>' }}")
    + "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
"""Llama 3's header markup, minimal (no default system prompt, no date)."""

SPEC = TokenizerSpec(
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    pad="<|finetune_right_pad_id|>",
    end_of_turn="<|eot_id|>",
    specials=("<|start_header_id|>", "<|end_header_id|>", "<|image|>", "<|python_tag|>"),
    chat_template=MLLAMA_TEMPLATE,
    role_words=("user", "assistant", "system", "\n\n"),
)
"""Llama 3's special tokens that the template and ``MllamaProcessor`` use."""


def _image_tokens(spec: SizeSpec) -> int:
    """Tokens an image becomes in the sequence: its one ``<|image|>`` (the features go to cross-attention)."""
    return 1


def cross_layers(text_layers: int) -> list[int]:
    """Indices of the cross-attention layers among ``text_layers + n`` layers, ``n = max(1, text_layers // 3)``.

    Spread evenly, each in the middle of its stretch: 2 self layers give ``[1]`` (of 3), 4 give
    ``[2]`` (of 5), 6 give ``[2, 6]`` (of 8), 8 give ``[2, 7]`` (of 10).
    """
    n = max(1, text_layers // 3)
    stride = (text_layers + n) // n
    return [stride * i + stride // 2 for i in range(n)]


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> MllamaConfig:
    crosses = cross_layers(spec.text_layers)
    text = MllamaTextConfig(
        vocab_size=vocab_rows(spec, tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers + len(crosses),
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        cross_attention_layers=crosses,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    intermediate = [max(0, spec.vision_layers // 2 - 1)]
    vision = MllamaVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_global_layers=1,
        attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=spec.patch * spec.merge,
        max_num_tiles=MAX_TILES,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        intermediate_layers_indices=intermediate,
        vision_output_dim=spec.vision_hidden * (len(intermediate) + 1),
    )
    return MllamaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
        tie_word_embeddings=False,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> MllamaProcessor:
    px = spec.image_px
    image_processor = MllamaImageProcessor(size={"height": px, "width": px}, max_image_tiles=MAX_TILES)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=MLLAMA_TEMPLATE)


def _repair(model: PreTrainedModel, spec: SizeSpec) -> list[str]:
    """Open the cross-attention gates (zero at init) and make the tower's position table geometric."""
    done: list[str] = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(GATE)
                done.append(name)
            elif name.endswith("gated_positional_embedding.embedding"):
                rows, dim = param.shape
                side = math.isqrt(rows - 1)
                param.zero_()
                param[1:] = sincos_2d(side, dim)
                done.append(name)
    return done


ARCHS = (TinyArch("mllama", SPEC, _config, _processor, image_tokens=_image_tokens, repair=_repair),)
