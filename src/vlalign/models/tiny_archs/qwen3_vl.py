"""Tiny Qwen3-VL and Qwen3-VL-MoE: a ViT with learned + 2-D rotary positions and DeepStack mergers, a Qwen3 decoder.

Qwen3-VL differs from Qwen2-VL where the engine can see it: its multimodal RoPE is *interleaved*
(the frequencies alternate t, h, w instead of three contiguous blocks: ``mrope_section`` counts
each axis' share), its vision tower hands features of several of its layers to the first decoder
layers (DeepStack: added to the hidden states at the image-token positions, found from
``input_ids``), and a video becomes one ``<t seconds><|vision_start|> frame tokens <|vision_end|>``
group per pair of frames (timestamps written by the processor). The MoE variant swaps the decoder's
MLPs for a few small routed experts (4 experts, top-2 here).

Image tokens follow the common rule (``(image_px / patch / merge)^2``: 4, 9, 256): the vision tower
takes any patch size and merge. The chat template here writes ``<|video_pad|>`` alone for a
video part (the processor wraps each frame pair in vision start / end tokens with its timestamp).
"""

from __future__ import annotations

from transformers import (
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vlalign.models.tiny_archs.qwen2 import vision_token_fields
from vlalign.models.tiny_spec import SizeSpec, TinyArch, vocab_rows
from vlalign.models.tiny_tokenizer import SPECS, TokenizerSpec

QWEN3_VL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|video_pad|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""ChatML with image parts as in Qwen2-VL and video parts as a bare ``<|video_pad|>``."""

QWEN3_VL_TOKENIZER = TokenizerSpec(
    bos=None,
    eos=SPECS["chatml"].eos,
    pad=SPECS["chatml"].pad,
    end_of_turn=SPECS["chatml"].end_of_turn,
    specials=SPECS["chatml"].specials,
    chat_template=QWEN3_VL_TEMPLATE,
    role_words=SPECS["chatml"].role_words,
)
"""ChatML's special tokens, with :data:`QWEN3_VL_TEMPLATE` (which renders video parts)."""

N_EXPERTS = 4
"""Routed experts per MoE layer of the tiny Qwen3-VL-MoE."""
TOP_K = 2
"""Experts each token is routed to."""


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """``[t, h, w]`` frequency counts for interleaved mRoPE, summing to ``head_dim / 2``.

    Interleaving gives frequency ``i`` to h when ``i % 3 == 1`` and ``i < 3 h``, to w when
    ``i % 3 == 2`` and ``i < 3 w``, to t otherwise; Qwen3-VL's 64 frequencies are split
    ``[24, 20, 20]`` (h and w each 5/16 of them), kept here: 16 -> ``[6, 5, 5]``, 32 -> ``[12, 10, 10]``.
    """
    half = head_dim // 2
    hw = half * 5 // 16
    return [half - 2 * hw, hw, hw]


def _text(spec: SizeSpec, tok: PreTrainedTokenizerFast) -> dict:
    head_dim = spec.text_hidden // spec.text_heads
    return dict(
        vocab_size=vocab_rows(spec, tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": interleaved_mrope_section(head_dim),
            "mrope_interleaved": True,
        },
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _vision(spec: SizeSpec) -> dict:
    side = spec.image_px // spec.patch
    return dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.text_hidden,
        patch_size=spec.patch,
        spatial_merge_size=spec.merge,
        temporal_patch_size=2,
        num_position_embeddings=side * side,
        # DeepStack: the first min(3, depth) vision layers feed the first decoder layers
        deepstack_visual_indexes=list(range(min(3, spec.vision_layers, spec.text_layers))),
    )


def _qwen3_vl_config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> PretrainedConfig:
    return Qwen3VLConfig(text_config=_text(spec, tok), vision_config=_vision(spec), **vision_token_fields(tok))


def _qwen3_vl_moe_config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> PretrainedConfig:
    text = dict(
        _text(spec, tok),
        num_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=spec.text_hidden // 2,
        decoder_sparse_step=1,
        tie_word_embeddings=False,
    )
    return Qwen3VLMoeConfig(text_config=text, vision_config=_vision(spec), **vision_token_fields(tok))


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Qwen3VLProcessor:
    px = spec.image_px * spec.image_px
    image_processor = Qwen2VLImageProcessor(
        min_pixels=px, max_pixels=px, patch_size=spec.patch, merge_size=spec.merge, temporal_patch_size=2
    )
    # A video's frames are resized to about image_px square: the pixel budget counts every frame
    # (2 to 8 frames at image_px), frames are used as given (no resampling by fps).
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 2 * px, "longest_edge": 8 * px},
        patch_size=spec.patch,
        merge_size=spec.merge,
        temporal_patch_size=2,
        do_sample_frames=False,
        cap_pixels_per_frame=False,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=QWEN3_VL_TEMPLATE
    )


ARCHS = (
    TinyArch("qwen3_vl", QWEN3_VL_TOKENIZER, _qwen3_vl_config, _processor),
    TinyArch("qwen3_vl_moe", QWEN3_VL_TOKENIZER, _qwen3_vl_moe_config, _processor),
)
