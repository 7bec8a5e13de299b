"""What every tiny-model builder shares: the size classes and the record of one architecture.

:data:`SIZES` holds the dimensions of each size class (``tiny``, ``small``, ``bench``,
``bench-vocab``), shared by every architecture; :class:`TinyArch` is what an architecture's
module in :mod:`vlalign.models.tiny_archs` provides to :func:`vlalign.models.tiny.build_tiny_model`
(its config, its processor, its tokenizer's special tokens and chat template, and any repair its
random init needs). The small config helpers (:func:`vocab_rows`, :func:`token_ids`,
:func:`llama_text`) are shared by the architectures that use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from vlalign.models.tiny_tokenizer import TokenizerSpec

QWEN_VOCAB_SIZE = 151_936
"""Rows of Qwen2-VL's / Qwen2.5-VL's embedding and LM head (the ``bench-vocab`` size's vocabulary)."""


@dataclass(frozen=True)
class SizeSpec:
    """Dimensions of one size class (shared by every architecture)."""

    image_px: int
    """Side of the square image the processor resizes to."""
    patch: int
    """Vision patch size in pixels."""
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    merge: int = 2
    """Spatial merge (Qwen), pixel-shuffle scale (Idefics3) or pooling kernel (Gemma3); LLaVA,
    which has no token merge, uses ``patch * merge`` as its patch, so that every architecture
    turns an image into ``(image_px / patch / merge) ** 2`` tokens."""
    vocab_size: int | None = None
    """Rows of the token embedding and the LM head; None: the tokenizer's size. A larger value
    leaves rows no token maps to, as in real checkpoints (Qwen2-VL: 151,936 rows, 151,665 tokens)."""
    text_mlp: int = 2
    """The language model's MLP width as a multiple of its hidden size."""

    @property
    def text_intermediate(self) -> int:
        return self.text_hidden * self.text_mlp

    @property
    def vision_intermediate(self) -> int:
        return self.vision_hidden * 2


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        image_px=32,
        patch=8,
        vision_hidden=64,
        vision_layers=2,
        vision_heads=2,
        text_hidden=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
    ),
    "small": SizeSpec(
        image_px=96,
        patch=32,
        vision_hidden=128,
        vision_layers=2,
        vision_heads=4,
        text_hidden=256,
        text_layers=4,
        text_heads=4,
        text_kv_heads=2,
        merge=1,
    ),
    "bench": SizeSpec(
        image_px=448,
        patch=14,
        vision_hidden=256,
        vision_layers=4,
        vision_heads=4,
        text_hidden=512,
        text_layers=6,
        text_heads=8,
        text_kv_heads=4,
    ),
    "bench-vocab": SizeSpec(
        image_px=448,
        patch=14,
        vision_hidden=256,
        vision_layers=4,
        vision_heads=4,
        text_hidden=512,
        text_layers=8,
        text_heads=8,
        text_kv_heads=2,
        vocab_size=QWEN_VOCAB_SIZE,
        text_mlp=5,
    ),
}
"""Size classes. Every architecture turns an image into ``(image_px / patch / merge)^2`` tokens:
tiny 4, small 9, bench and bench-vocab 256 (why ``small`` is what it is: ``docs/notes/tiny-models.md``)."""


def merged_tokens(spec: SizeSpec) -> int:
    """``(image_px / patch / merge)^2``: the image tokens of one image at ``spec`` (the common rule)."""
    side = spec.image_px // spec.patch
    return side * side // (spec.merge * spec.merge)


@dataclass(frozen=True)
class TinyArch:
    """One architecture the tiny-model builder knows (registered in :mod:`vlalign.models.tiny_archs`)."""

    name: str
    """The name in ``tiny:<name>:<size>`` (the config's ``model_type`` where it can be)."""
    tokenizer: TokenizerSpec
    """Special tokens, end of turn and chat template of the family's tokenizer."""
    config: Callable[[SizeSpec, PreTrainedTokenizerFast, int], PretrainedConfig]
    """``config(spec, tokenizer, image_tokens)``: the real ``transformers`` config."""
    processor: Callable[[SizeSpec, PreTrainedTokenizerFast, int], ProcessorMixin]
    """``processor(spec, tokenizer, image_tokens)``: the real processor class (chat template set)."""
    image_tokens: Callable[[SizeSpec], int] = merged_tokens
    """Placeholder tokens one image becomes at a size."""
    repair: Callable[[PreTrainedModel, SizeSpec], list[str]] | None = None
    """Extra re-initialisation after the generic repairs (returns the names it changed)."""


def vocab_rows(spec: SizeSpec, tok: PreTrainedTokenizerFast) -> int:
    """Rows of the embedding and LM head: the size's ``vocab_size``, at least the tokenizer's size."""
    if spec.vocab_size is None:
        return len(tok)
    if spec.vocab_size < len(tok):
        raise ValueError(f"vocab_size {spec.vocab_size} is smaller than the tokenizer's {len(tok)} tokens")
    return spec.vocab_size


def token_ids(tok: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    """The ids of ``tokens`` in ``tok``."""
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def llama_text(spec: SizeSpec, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    """A Llama language model at ``spec`` (LLaVA, Idefics3 and others built on Llama)."""
    return LlamaConfig(
        vocab_size=vocab_rows(spec, tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
