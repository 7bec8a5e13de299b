"""Tiny Qwen3.5 and Qwen3.5-MoE: a ViT with a learned (interpolated) position grid and 2-D RoPE,
and a hybrid decoder whose gated-delta-net (linear-attention) layers sit between full-attention
layers with interleaved 3-D (mRoPE) positions on a quarter of each head.

Layer mix: every fourth layer and the last are full attention, the others linear attention
(tiny: ``[linear, full]``; small: ``[linear x 3, full]``; bench: ``[linear x 3, full, linear,
full]``), so every size has both kinds. The processor is the real ``Qwen3VLProcessor`` (which both
families use) with Qwen2-VL's image processor and Qwen3-VL's chat template (:mod:`~vlalign.models.tiny_archs.qwen3_vl`); an image becomes ``(image_px / patch / merge)^2``
tokens as for every architecture. The MoE family replaces every MLP by ``num_experts`` experts
(``num_experts_per_tok`` per token) plus a gated shared expert, and asks for the router's
auxiliary loss (``output_router_logits``, ``router_aux_loss_coef``) in training.

On a CPU without ``flash-linear-attention`` / ``causal-conv1d`` the linear-attention layers run
the library's own torch fallbacks (``torch_chunk_gated_delta_rule`` for a sequence,
``torch_recurrent_gated_delta_rule`` for a single cached token, ``F.conv1d`` for the short
convolution), in float32 as in any other precision.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vlalign.models.tiny_archs.qwen2 import vision_token_fields
from vlalign.models.tiny_archs.qwen3_vl import QWEN3_VL_TOKENIZER, interleaved_mrope_section
from vlalign.models.tiny_init import sincos_2d
from vlalign.models.tiny_spec import SizeSpec, TinyArch, vocab_rows

FULL_ATTENTION_INTERVAL = 4
"""Every fourth layer is full attention (Qwen3.5's checkpoints); the last one always is here."""


def layer_types(n_layers: int) -> list[str]:
    """``full_attention`` at every :data:`FULL_ATTENTION_INTERVAL`-th layer and at the last, else ``linear_attention``."""
    return [
        "full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 or i == n_layers - 1 else "linear_attention"
        for i in range(n_layers)
    ]


def _text(spec: SizeSpec, tok: PreTrainedTokenizerFast) -> dict:
    """The hybrid decoder's fields: head_dim = hidden / heads, RoPE on a quarter of it, interleaved mRoPE."""
    head_dim = spec.text_hidden // spec.text_heads
    mrope = interleaved_mrope_section(head_dim // 4)  # RoPE on a quarter of each head (partial_rotary_factor)
    return dict(
        vocab_size=vocab_rows(spec, tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=head_dim,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_num_key_heads=spec.text_kv_heads,
        linear_num_value_heads=spec.text_heads,
        layer_types=layer_types(spec.text_layers),
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope,
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.25,
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
        patch_size=spec.patch,
        spatial_merge_size=spec.merge,
        temporal_patch_size=2,
        out_hidden_size=spec.text_hidden,
        num_position_embeddings=side * side,
    )


def _dense_config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> PretrainedConfig:
    return Qwen3_5Config(text_config=_text(spec, tok), vision_config=_vision(spec), **vision_token_fields(tok))


MOE_EXPERTS = 4
"""Routed experts per MoE layer of the tiny MoE model (2 active per token, each half the dense MLP's width)."""


def _moe_config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> PretrainedConfig:
    text = _text(spec, tok)
    del text["intermediate_size"]
    text.update(
        num_experts=MOE_EXPERTS,
        num_experts_per_tok=2,
        moe_intermediate_size=spec.text_intermediate // 2,  # two active experts: the dense MLP's width
        shared_expert_intermediate_size=spec.text_intermediate // 2,
        output_router_logits=True,
        router_aux_loss_coef=0.001,
    )
    return Qwen3_5MoeConfig(text_config=text, vision_config=_vision(spec), **vision_token_fields(tok))


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Qwen3VLProcessor:
    px = spec.image_px * spec.image_px
    common = dict(patch_size=spec.patch, merge_size=spec.merge, temporal_patch_size=2)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=px, max_pixels=px, **common),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": px, "longest_edge": px}, **common),
        chat_template=QWEN3_VL_TOKENIZER.chat_template,
    )


def _repair(model: PreTrainedModel, spec: SizeSpec) -> list[str]:
    """Start the vision tower's learned position grid as 2-D sine-cosine codes (as SigLIP's and CLIP's)."""
    done: list[str] = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("pos_embed.weight") and "visual" in name and param.ndim == 2:
                side = math.isqrt(param.shape[0])
                if side * side == param.shape[0] and param.shape[1] % 4 == 0:
                    param.copy_(sincos_2d(side, param.shape[1]))
                    done.append(name)
    return done


ARCHS = (
    TinyArch("qwen3_5", QWEN3_VL_TOKENIZER, _dense_config, _processor, repair=_repair),
    TinyArch("qwen3_5_moe", QWEN3_VL_TOKENIZER, _moe_config, _processor, repair=_repair),
)
