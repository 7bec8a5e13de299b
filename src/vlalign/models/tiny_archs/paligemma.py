"""Tiny PaliGemma 2: a SigLIP tower, a linear projection and a Gemma2 decoder, as a prefix-LM.

PaliGemma reads ``[image tokens | <bos> prefix \\n]`` with bidirectional attention (the image
and the prefix see each other) and writes the suffix causally; the processor builds that layout
itself (it inserts ``<bos>`` after the image tokens and ``\\n`` after the prefix) and marks
suffix tokens with ``token_type_ids`` 1 (prefix 0), which the model turns into its prefix-LM
mask. The processor refuses text without images. Positions start at 1.

The real checkpoints have no chat template; vlalign's collators render prompts through one, so
the tiny model carries a minimal one that writes what PaliGemma expects: a user turn is its
images (``<image>`` each) then its text, the generation prompt of a first turn is empty (the
processor adds the ``\\n``), and an assistant turn is ``\\n`` + text + ``<eos>`` (PaliGemma's suffix ends with eos, so
``<eos>`` is the end of turn). Multi-turn conversations render, but PaliGemma was never trained
on them.

The processor adds PaliGemma's 1,024 location and 128 segmentation tokens to the tokenizer
(``<loc0000>``...), so the embedding has ~1,150 rows more than the trained vocabulary. The
decoder is Gemma2's: alternating sliding-window and global layers, attention-logit and final-logit
soft-capping; its attention supports ``eager`` (and flex), not ``sdpa``.
"""

from __future__ import annotations

from transformers import (
    Gemma2Config,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
)

from vlalign.models.tiny_archs.gemma3 import siglip_vision
from vlalign.models.tiny_spec import SizeSpec, TinyArch, vocab_rows
from vlalign.models.tiny_tokenizer import TokenizerSpec

PALIGEMMA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ eos_token }}"
    "{%- elif message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages | selectattr('role', 'equalto', 'assistant') | list -%}{{ '\\n' }}"
    "{%- endif -%}"
)
"""A user turn: its images, then its text; an assistant turn: ``\\n`` text ``<eos>``. The generation
prompt is empty on a first turn (the processor ends the prefix with ``\\n``), ``\\n`` after an earlier
answer (so that a conversation's later turns read as its rendering does)."""

SPEC = TokenizerSpec(
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    end_of_turn="<eos>",
    specials=("<image>",),
    chat_template=PALIGEMMA_TEMPLATE,
    named={"image_token": "<image>"},
    role_words=("\n",),
    add_bos=False,
)
"""PaliGemma's tokens; the processor places ``<bos>`` itself (after the image tokens)."""


def _patch(spec: SizeSpec) -> int:
    """SigLIP's patch: no token merge, so ``patch * merge`` gives the common token count (as LLaVA)."""
    return spec.patch * spec.merge


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> PaliGemmaConfig:
    head_dim = spec.text_hidden // spec.text_heads
    rows = vocab_rows(spec, tok)  # the processor has added PaliGemma's location / segmentation tokens by now
    text = Gemma2Config(
        vocab_size=rows,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=512,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = siglip_vision(spec, _patch(spec))
    return PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vocab_size=rows,
        projection_dim=spec.text_hidden,
        hidden_size=spec.text_hidden,
        tie_word_embeddings=True,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> PaliGemmaProcessor:
    px = spec.image_px
    image_processor = SiglipImageProcessor(size={"height": px, "width": px}, image_seq_length=n_tokens)
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=PALIGEMMA_TEMPLATE)


ARCHS = (TinyArch("paligemma", SPEC, _config, _processor),)
