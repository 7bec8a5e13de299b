"""Tiny Idefics3 (SmolVLM's architecture): a SigLIP-style tower, pixel shuffle and a Llama decoder."""

from __future__ import annotations

from transformers import (
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    PreTrainedTokenizerFast,
)

from vlalign.models.tiny_spec import SizeSpec, TinyArch, llama_text
from vlalign.models.tiny_tokenizer import SPECS


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Idefics3Config:
    vision = Idefics3VisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=spec.patch,
    )
    return Idefics3Config(
        vision_config=vision,
        text_config=llama_text(spec, tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=spec.merge,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Idefics3Processor:
    px = spec.image_px
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": px}, max_image_size={"longest_edge": px}
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=n_tokens,
        chat_template=SPECS["idefics3"].chat_template,
    )


ARCHS = (TinyArch("idefics3", SPECS["idefics3"], _config, _processor),)
