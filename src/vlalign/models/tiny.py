"""Offline builders of small, randomly initialised models of real LVLM architectures.

``build_tiny_model(arch, size, out_dir, seed=...)`` writes a folder that the ordinary loader
(:func:`vlalign.models.load.load_model_and_processor`) reopens with ``HF_HUB_OFFLINE=1``: the real
``transformers`` config and model classes (random init), the real processor class with its
real image processor, a byte-level BPE tokenizer trained on a registered corpus (by default the
shapes world's vocabulary; :mod:`vlalign.models.tiny_tokenizer`), a chat template and a
generation config whose stop tokens include the end-of-turn token. ``tiny:<arch>:<size>`` names
such a model wherever a model path goes (:func:`resolve_model` builds it once into the cache).

Architectures: ``qwen2_vl``, ``qwen2_5_vl``, ``llava`` (CLIP vision tower + Llama),
``idefics3`` (SmolVLM's architecture: SigLIP-style tower, pixel shuffle, Llama) and ``gemma3``
(SigLIP + Gemma3 text). Sizes:

===============  ===========================================================================
``tiny``         0.5-0.7M parameters, 32 px images, 4 image tokens: unit tests (builds in ~0.1 s).
``small``        the demo model, 3.2-3.8M parameters: 96 px images, 32 px patches, 9 image
                 tokens; it learns the shapes world in minutes of fine-tuning on two CPU cores.
``bench``        17-19M parameters, 448 px images, 256 image tokens: compute dominates a step.
``bench-vocab``  ``bench``'s images with Qwen's real vocabulary size (151,936 embedding and
                 LM-head rows; the tokenizer knows ~1k of them) and a deeper, narrower-headed
                 language model (8 layers, 4 queries per key head, MLP 5x): the full-vocabulary
                 logits weigh in a step as they do in real models (``docs/performance.md``).
===============  ===========================================================================

Random inits that would leave a model degenerate are repaired: Gemma3's zero multimodal
projection (:func:`~vlalign.models.tiny_init.repair_degenerate_init`; the tests check that each model's output depends on
its image), and the learned position embeddings of SigLIP and CLIP towers, which start as 2-D
sine-cosine patterns (:func:`~vlalign.models.tiny_init.sincos_2d`) so that the tower sees the image's geometry from the
first step. Measurements behind these choices: ``docs/notes/tiny-models.md``.

Building is deterministic (same arch, size and seed give byte-identical weights) and cached: a
second build of the same (arch, size, seed, builder version) into a folder whose
``vlalign_tiny.json`` stamp says so returns at once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    SiglipVisionConfig,
)

from vlalign.models.tiny_init import geometric_position_init, repair_degenerate_init
from vlalign.models.tiny_tokenizer import (
    DEFAULT_CORPUS,
    FAMILY_OF_ARCH,
    SPECS,
    corpus_sentences,
    generation_config,
    train_tokenizer,
)

ARCHITECTURES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3", "gemma3")
"""Architectures :func:`build_tiny_model` knows."""

BUILDER_VERSION = 3
"""Bumped whenever a build's output changes, so that stale cached folders are rebuilt."""

STAMP_FILE = "vlalign_tiny.json"


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


def image_tokens(arch: str, size: str) -> int:
    """Number of image tokens one image becomes in the built model (placeholder tokens only)."""
    spec = SIZES[size]
    side = spec.image_px // spec.patch
    return side * side // (spec.merge * spec.merge)


# ----------------------------------------------------------------------------------- configs


def _ids(tok: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _vocab_size(spec: SizeSpec, tok: PreTrainedTokenizerFast) -> int:
    """Rows of the embedding and LM head: the size's ``vocab_size``, at least the tokenizer's size."""
    if spec.vocab_size is None:
        return len(tok)
    if spec.vocab_size < len(tok):
        raise ValueError(f"vocab_size {spec.vocab_size} is smaller than the tokenizer's {len(tok)} tokens")
    return spec.vocab_size


def _llama_text(spec: SizeSpec, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=_vocab_size(spec, tok),
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


def _qwen_config(arch: str, spec: SizeSpec, tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # (t, h, w), sums to head_dim/2
    text = dict(
        vocab_size=_vocab_size(spec, tok),
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
    img, vid, vstart, vend = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    common = dict(image_token_id=img, video_token_id=vid, vision_start_token_id=vstart, vision_end_token_id=vend)
    if arch == "qwen2_vl":
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
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
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
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)


def _llava_config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=spec.patch * spec.merge,
        projection_dim=spec.vision_hidden,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=_llama_text(spec, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _idefics3_config(spec: SizeSpec, tok: PreTrainedTokenizerFast) -> Idefics3Config:
    vision = Idefics3VisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=spec.patch,
    )
    text = _llama_text(spec, tok)
    return Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=spec.merge,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _gemma3_config(spec: SizeSpec, tok: PreTrainedTokenizerFast, n_tokens: int) -> Gemma3Config:
    head_dim = spec.text_hidden // spec.text_heads
    layer_types = ["sliding_attention"] * (spec.text_layers - 1) + ["full_attention"]
    text = Gemma3TextConfig(
        vocab_size=_vocab_size(spec, tok),
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
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_px,
        patch_size=spec.patch,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=n_tokens,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        tie_word_embeddings=True,
    )


def make_config(arch: str, size: str, tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The real ``transformers`` config of ``arch`` at ``size`` for tokenizer ``tok``."""
    spec = SIZES[size]
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen_config(arch, spec, tok)
    if arch == "llava":
        return _llava_config(spec, tok, image_tokens(arch, size))
    if arch == "idefics3":
        return _idefics3_config(spec, tok)
    if arch == "gemma3":
        return _gemma3_config(spec, tok, image_tokens(arch, size))
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


# -------------------------------------------------------------------------------- processors


def make_processor(arch: str, size: str, tok: PreTrainedTokenizerFast) -> ProcessorMixin:
    """The real processor class of ``arch`` with its real image processor, set for ``size``."""
    spec = SIZES[size]
    px = spec.image_px
    template = SPECS[FAMILY_OF_ARCH[arch]].chat_template
    n_tokens = image_tokens(arch, size)
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        image_processor = Qwen2VLImageProcessor(
            min_pixels=px * px, max_pixels=px * px, patch_size=spec.patch, merge_size=spec.merge, temporal_patch_size=2
        )
        video_processor = Qwen2VLVideoProcessor(
            min_pixels=px * px, max_pixels=px * px, patch_size=spec.patch, merge_size=spec.merge, temporal_patch_size=2
        )
        cls = Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor
        return cls(
            image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=template
        )
    if arch == "llava":
        image_processor = CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=spec.patch * spec.merge,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if arch == "idefics3":
        image_processor = Idefics3ImageProcessor(
            do_image_splitting=False, size={"longest_edge": px}, max_image_size={"longest_edge": px}
        )
        return Idefics3Processor(
            image_processor=image_processor, tokenizer=tok, image_seq_len=n_tokens, chat_template=template
        )
    if arch == "gemma3":
        image_processor = Gemma3ImageProcessor(size={"height": px, "width": px}, do_pan_and_scan=False)
        return Gemma3Processor(
            image_processor=image_processor, tokenizer=tok, image_seq_length=n_tokens, chat_template=template
        )
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


# ------------------------------------------------------------------------------------ models


def _stamp(arch: str, size: str, seed: int, corpus_name: str) -> dict[str, Any]:
    spec = asdict(SIZES[size])
    for name in ("vocab_size", "text_mlp"):  # left out at their defaults: older sizes keep their stamps
        if spec[name] == SizeSpec.__dataclass_fields__[name].default:
            del spec[name]
    stamp = {"arch": arch, "size": size, "seed": seed, "builder_version": BUILDER_VERSION, "spec": spec}
    return stamp if corpus_name == DEFAULT_CORPUS else {**stamp, "corpus": corpus_name}


def build_tiny_model(
    arch: str, size: str, out_dir: str | Path, *, seed: int = 0, corpus_name: str = DEFAULT_CORPUS
) -> Path:
    """Build a random-init ``arch`` model of ``size`` with processor and tokenizer into ``out_dir``.

    The tokenizer is trained on the registered corpus ``corpus_name``
    (:func:`vlalign.models.tiny_tokenizer.corpus_sentences`). Returns ``out_dir`` as a :class:`~pathlib.Path`. Reuses the folder when its stamp says it
    already holds the same (arch, size, seed) from this builder version; otherwise (re)writes
    it. Deterministic: the global torch RNG is left untouched and the weights depend only on
    the arguments.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    out = Path(out_dir)
    stamp = _stamp(arch, size, seed, corpus_name)
    stamp_path = out / STAMP_FILE
    if stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return out
        except json.JSONDecodeError:
            pass
    sentences = corpus_sentences(corpus_name)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(FAMILY_OF_ARCH[arch], sentences)
    processor = make_processor(arch, size, tok)
    config = make_config(arch, size, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        repair_degenerate_init(model, std=1.0 / math.sqrt(SIZES[size].vision_hidden))
        geometric_position_init(model)
    model.generation_config = generation_config(tok, arch)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    stamp_path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------- the cache and tiny:<arch>:<size>

TINY_PREFIX = "tiny:"


def cache_dir() -> Path:
    """Where built models and the embedded datasets live: ``$VLALIGN_CACHE``, else ``~/.cache/vlalign``."""
    return Path(os.environ.get("VLALIGN_CACHE") or Path.home() / ".cache" / "vlalign")


def resolve_model(name_or_path: str, *, seed: int = 0) -> str:
    """A loadable model source: ``tiny:<arch>:<size>`` is built (once) and its folder returned."""
    if not name_or_path.startswith(TINY_PREFIX):
        return name_or_path
    parts = name_or_path[len(TINY_PREFIX) :].split(":")
    if len(parts) != 2 or parts[0] not in ARCHITECTURES or parts[1] not in SIZES:
        raise ValueError(
            f"model {name_or_path!r}: expected tiny:<arch>:<size> with arch in {', '.join(ARCHITECTURES)} "
            f"and size in {', '.join(SIZES)}"
        )
    arch, size = parts
    return str(build_tiny_model(arch, size, cache_dir() / "models" / f"{arch}-{size}-seed{seed}", seed=seed))
