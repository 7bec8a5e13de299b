"""Tiny LLaVA: a CLIP vision tower, a two-layer projector and a Llama decoder."""

from __future__ import annotations

from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaProcessor, PreTrainedTokenizerFast

from vlalign.models.tiny_spec import SizeSpec, TinyArch, llama_text
from vlalign.models.tiny_tokenizer import SPECS


def clip_vision(spec: SizeSpec) -> CLIPVisionConfig:
    """A CLIP vision tower at ``spec``: patches of ``patch * merge`` pixels (LLaVA has no token merge)."""
    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=spec.patch * spec.merge,
        projection_dim=spec.vision_hidden,
    )


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> LlavaConfig:
    return LlavaConfig(
        vision_config=clip_vision(spec),
        text_config=llama_text(spec, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> LlavaProcessor:
    px = spec.image_px
    image_processor = CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=spec.patch * spec.merge,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=SPECS["llava"].chat_template,
    )


ARCHS = (TinyArch("llava", SPECS["llava"], _config, _processor),)
