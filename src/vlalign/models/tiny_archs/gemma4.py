"""Tiny Gemma 4: its own vision tower (2-D position tables, k x k pooling) and a Gemma 4 decoder.

What the tiny model keeps of the real family (transformers' ``models/gemma4``; the class
``AutoModelForImageTextToText`` maps ``"gemma4"`` to is ``Gemma4ForConditionalGeneration``):

- sliding-window and global layers (the last layer global), the global ones with their own head
  width (``global_head_dim``, twice the sliding layers' here as in the real models) and
  proportional RoPE;
- per-layer input embeddings (PLE, as in E2B / E4B) at a small width;
- ``use_bidirectional_attention="vision"`` (as in the larger checkpoints): image tokens attend to
  each other in both directions, on sliding-window layers only (the global layers stay causal);
- no audio tower (``audio_config=None``), no mixture of experts, no KV sharing between layers.

Images: the real image processor resizes an image, keeping its aspect ratio, to the largest size
whose patch count fits ``max_soft_tokens * k^2`` with sides divisible by ``k * patch`` (``k`` the
pooling kernel), and pads the patches to that budget. The smallest budget it accepts is 70 soft
tokens, so a square image becomes 8 x 8 = 64 tokens at ``tiny`` and ``small`` (not 4 and 9 as in
the other families) and 16 x 16 = 256 at ``bench`` (budget 280). The patch is chosen so that a
square image is resized to exactly ``image_px``.

The chat markup is Gemma 4's: ``<|turn>user ... <turn|>``, the model's turn ``<|turn>model``, an
image written as ``<|image|>`` and expanded by the processor to ``<|image>`` + soft tokens +
``<image|>``. The processor requires its audio feature extractor and video processor (and the
tokenizer's audio tokens) even for images: they are built with their defaults.

The random init sets the vision tower's two position tables (x and y) to all ones, so that every
patch gets the same position; :func:`repair` sets them to the two halves of a 2-D sine-cosine
code (:func:`axis_codes`).
"""

from __future__ import annotations

import math

import torch
from transformers import (
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ImageProcessor,
    Gemma4Processor,
    Gemma4TextConfig,
    Gemma4VideoProcessor,
    Gemma4VisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from vlalign.models.tiny_spec import SizeSpec, TinyArch, token_ids, vocab_rows
from vlalign.models.tiny_tokenizer import TokenizerSpec

GEMMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)
"""Gemma 4's chat markup, minimal (no default system prompt, no thinking channel)."""

_NAMED = {
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}

SPEC = TokenizerSpec(
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    end_of_turn="<turn|>",
    specials=("<|turn>", "<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio>", "<audio|>", "<|audio|>"),
    chat_template=GEMMA4_TEMPLATE,
    named=dict(_NAMED),
    role_words=("user\n", "model\n", "system\n"),
    add_bos=True,
)
"""Gemma 4's special tokens (``<|video|>`` too, which the processor would otherwise add itself)."""

POOLING = 2
"""The vision pooling kernel ``k`` (3 in the real models; 2 keeps the tiny towers small)."""


def soft_tokens_budget(spec: SizeSpec) -> int:
    """The image processor's ``max_soft_tokens``: 70 (its smallest) below ``bench``, 280 from 448 px."""
    return 280 if spec.image_px >= 448 else 70


def _side_tokens(spec: SizeSpec) -> int:
    """Soft tokens along the side of a square image: the largest ``s`` with ``s^2 <= budget``."""
    return math.isqrt(soft_tokens_budget(spec))


def _patch(spec: SizeSpec) -> int:
    """The patch that resizes a square image to exactly ``image_px`` (``image_px = side * k * patch``)."""
    patch, rest = divmod(spec.image_px, _side_tokens(spec) * POOLING)
    if rest or patch < 1:
        raise ValueError(f"Gemma 4: image_px {spec.image_px} is not a multiple of {_side_tokens(spec) * POOLING}")
    return patch


def image_tokens(spec: SizeSpec) -> int:
    """Soft tokens of a square image: 64 at ``tiny`` / ``small``, 256 at ``bench``."""
    return _side_tokens(spec) ** 2


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Gemma4Config:
    head_dim = spec.text_hidden // spec.text_heads
    rows = vocab_rows(spec, tok)
    text = Gemma4TextConfig(
        vocab_size=rows,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=head_dim,
        global_head_dim=2 * head_dim,
        sliding_window=512,
        layer_types=["sliding_attention"] * (spec.text_layers - 1) + ["full_attention"],
        max_position_embeddings=4096,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=rows,
        use_bidirectional_attention="vision",
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = Gemma4VisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        num_key_value_heads=spec.vision_heads,
        head_dim=spec.vision_hidden // spec.vision_heads,
        pooling_kernel_size=POOLING,
        patch_size=_patch(spec),
        position_embedding_size=soft_tokens_budget(spec) * POOLING,  # the longest side a resize can give
    )
    boi, eoi, image, video, boa, eoa, audio = token_ids(
        tok, "<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio>", "<audio|>", "<|audio|>"
    )
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=boi,
        eoi_token_id=eoi,
        image_token_id=image,
        video_token_id=video,
        boa_token_id=boa,
        eoa_token_index=eoa,
        audio_token_id=audio,
        tie_word_embeddings=True,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Gemma4Processor:
    pixels = dict(patch_size=_patch(spec), pooling_kernel_size=POOLING, max_soft_tokens=soft_tokens_budget(spec))
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(**pixels),
        chat_template=GEMMA4_TEMPLATE,
        image_seq_length=n_tokens,
    )


def axis_codes(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, dim)`` x and y tables whose sum at ``(x, y)`` is :func:`~vlalign.models.tiny_init.sincos_2d`'s row.

    The x table holds ``[sin(x w), cos(x w), 0, 0]`` and the y table ``[0, 0, sin(y w), cos(y w)]``
    (quarters of the channels, ``w_k = 10000^(-k / (dim / 4))``).
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine codes need a dimension divisible by 4, not {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * omega  # (n, dim/4)
    zeros = torch.zeros(n, 2 * quarter, dtype=torch.float64)
    waves = torch.cat([angle.sin(), angle.cos()], dim=1)
    return torch.cat([waves, zeros], dim=1).float(), torch.cat([zeros, waves], dim=1).float()


def repair(model: PreTrainedModel, spec: SizeSpec) -> None:
    """Set the vision tower's x / y position tables (all ones at init) to :func:`axis_codes`."""
    table = model.model.vision_tower.patch_embedder.position_embedding_table  # (2, n, dim)
    x, y = axis_codes(table.shape[1], table.shape[2])
    with torch.no_grad():
        table[0].copy_(x)
        table[1].copy_(y)


ARCHS = (TinyArch("gemma4", SPEC, _config, _processor, image_tokens=image_tokens, repair=repair),)
