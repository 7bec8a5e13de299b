"""Tiny Gemma3: a SigLIP tower, average pooling and a Gemma3 decoder with sliding-window and global layers."""

from __future__ import annotations

from transformers import (
    Gemma3Config,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from vlalign.models.tiny_spec import SizeSpec, TinyArch, vocab_rows
from vlalign.models.tiny_tokenizer import SPECS


def siglip_vision(spec: SizeSpec, patch: int) -> SiglipVisionConfig:
    """A SigLIP vision tower at ``spec`` with ``patch``-pixel patches and no pooling head."""
    return SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=patch,
        vision_use_head=False,
    )


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Gemma3Config:
    head_dim = spec.text_hidden // spec.text_heads
    layer_types = ["sliding_attention"] * (spec.text_layers - 1) + ["full_attention"]
    text = Gemma3TextConfig(
        vocab_size=vocab_rows(spec, tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=512,
        layer_types=layer_types,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = siglip_vision(spec, spec.patch)
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=n_tokens,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        tie_word_embeddings=True,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Gemma3Processor:
    px = spec.image_px
    image_processor = Gemma3ImageProcessor(size={"height": px, "width": px}, do_pan_and_scan=False)
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=n_tokens,
        chat_template=SPECS["gemma3"].chat_template,
    )


ARCHS = (TinyArch("gemma3", SPECS["gemma3"], _config, _processor),)
