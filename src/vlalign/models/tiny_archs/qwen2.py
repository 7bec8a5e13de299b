"""Tiny Qwen2-VL and Qwen2.5-VL: a ViT with 2-D RoPE and spatial merge, a Qwen2 decoder with 3-D (mRoPE) positions."""

from __future__ import annotations

from transformers import (
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from vlalign.models.tiny_spec import SizeSpec, TinyArch, token_ids, vocab_rows
from vlalign.models.tiny_tokenizer import SPECS


def qwen_text(spec: SizeSpec, tok: PreTrainedTokenizerFast) -> dict:
    """The Qwen2 decoder's fields at ``spec``, with an mRoPE split (t, h, w) summing to head_dim / 2."""
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return dict(
        vocab_size=vocab_rows(spec, tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def vision_token_fields(tok: PreTrainedTokenizerFast) -> dict:
    """The image / video placeholder and vision start / end token ids of a chatml tokenizer."""
    img, vid, vstart, vend = token_ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return dict(image_token_id=img, video_token_id=vid, vision_start_token_id=vstart, vision_end_token_id=vend)


def _qwen2_vl_config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> PretrainedConfig:
    vision = dict(
        depth=spec.vision_layers,
        embed_dim=spec.vision_hidden,
        hidden_size=spec.text_hidden,
        num_heads=spec.vision_heads,
        mlp_ratio=2,
        patch_size=spec.patch,
        spatial_merge_size=spec.merge,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(text_config=qwen_text(spec, tok), vision_config=vision, **vision_token_fields(tok))


def _qwen2_5_vl_config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> PretrainedConfig:
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.text_hidden,
        patch_size=spec.patch,
        spatial_merge_size=spec.merge,
        temporal_patch_size=2,
        window_size=spec.patch * spec.merge * 2,
        fullatt_block_indexes=[spec.vision_layers - 1],
    )
    return Qwen2_5_VLConfig(text_config=qwen_text(spec, tok), vision_config=vision, **vision_token_fields(tok))


def qwen_pixel_processors(spec: SizeSpec) -> tuple[Qwen2VLImageProcessor, Qwen2VLVideoProcessor]:
    """Image and video processors that resize to exactly ``image_px`` square at ``spec``'s patch and merge."""
    px = spec.image_px * spec.image_px
    common = dict(min_pixels=px, max_pixels=px, patch_size=spec.patch, merge_size=spec.merge, temporal_patch_size=2)
    return Qwen2VLImageProcessor(**common), Qwen2VLVideoProcessor(**common)


def _processor(cls: type[ProcessorMixin]):
    def build(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> ProcessorMixin:
        image_processor, video_processor = qwen_pixel_processors(spec)
        return cls(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video_processor,
            chat_template=SPECS["chatml"].chat_template,
        )

    return build


ARCHS = (
    TinyArch("qwen2_vl", SPECS["chatml"], _qwen2_vl_config, _processor(Qwen2VLProcessor)),
    TinyArch("qwen2_5_vl", SPECS["chatml"], _qwen2_5_vl_config, _processor(Qwen2_5_VLProcessor)),
)
