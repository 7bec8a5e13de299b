"""Tiny Mistral 3 (Mistral Small 3.1's layout): a Pixtral tower with 2-D RoPE, a patch merger and a Mistral decoder.

The Pixtral image processor keeps an image's aspect ratio and never enlarges it: an image whose
longest side is at least ``image_px`` is resized to fit ``image_px``, and each side is rounded up
to a multiple of ``patch * merge``, so images of different sizes give different token counts in
one batch (``image_sizes`` carries each image's size to the model). An ``h x w`` grid of merged
patches becomes ``h`` rows of ``w`` ``[IMG]`` tokens, each row closed by ``[IMG_BREAK]`` and the
last by ``[IMG_END]``: ``h * (w + 1)`` tokens in the sequence, of which ``h * w`` are image
features. A square image at least ``image_px`` wide therefore becomes ``s * (s + 1)`` tokens with
``s = image_px / patch / merge`` (:func:`_image_tokens`: tiny 6, small 12, bench 272).

The chat markup is Mistral's: ``<s>[INST]question[IMG]...[/INST]answer</s>``. No repair is needed
beyond the generic ones (the merger and the projector start random, the tower has no learned
position table).
"""

from __future__ import annotations

from transformers import (
    Mistral3Config,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
)

from vlalign.models.tiny_spec import SizeSpec, TinyArch, vocab_rows
from vlalign.models.tiny_tokenizer import TokenizerSpec, _parts

MISTRAL3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' }}" + _parts("") + "{{ '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST]' }}" + _parts("{{ '[IMG]' }}") + "{{ '[/INST]' }}"
    "{%- else -%}" + _parts("") + "{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
"""Mistral's markup, minimal: ``[INST]`` ... ``[/INST]`` around a user turn, the answer closed by ``</s>``; the
generation prompt adds nothing (the assistant's text follows ``[/INST]`` directly)."""

SPEC = TokenizerSpec(
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    end_of_turn="</s>",
    specials=("[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
    chat_template=MISTRAL3_TEMPLATE,
    role_words=(),
)
"""Mistral 3's tokenizer: ``<s>`` / ``</s>``, the instruction markers and Pixtral's three image tokens."""


def _image_tokens(spec: SizeSpec) -> int:
    """Tokens a square image at least ``image_px`` wide becomes: ``s`` rows of ``s`` ``[IMG]`` and one break / end."""
    side = spec.image_px // spec.patch // spec.merge
    return side * (side + 1)


def _config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Mistral3Config:
    text = MistralConfig(
        vocab_size=vocab_rows(spec, tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=spec.text_hidden // spec.text_heads,
        max_position_embeddings=4096,
        sliding_window=None,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = PixtralVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=spec.patch,
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
    )
    return Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=spec.merge,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _processor(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> PixtralProcessor:
    image_processor = PixtralImageProcessor(
        size={"longest_edge": spec.image_px}, patch_size={"height": spec.patch, "width": spec.patch}
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=spec.patch,
        spatial_merge_size=spec.merge,
        chat_template=MISTRAL3_TEMPLATE,
    )


ARCHS = (TinyArch("mistral3", SPEC, _config, _processor, image_tokens=_image_tokens),)
