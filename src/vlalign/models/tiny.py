"""Offline builders of small, randomly initialised models of real LVLM architectures.

``build_tiny_model(arch, size, out_dir, seed=...)`` writes a folder that the ordinary loader
(:func:`vlalign.models.load.load_model_and_processor`) reopens with ``HF_HUB_OFFLINE=1``: the real
``transformers`` config and model classes (random init), the real processor class with its
real image processor, a byte-level BPE tokenizer trained on a registered corpus (by default the
shapes world's vocabulary; :mod:`vlalign.models.tiny_tokenizer`), a chat template and a
generation config whose stop tokens include the end-of-turn token. ``tiny:<arch>:<size>`` names
such a model wherever a model path goes (:func:`resolve_model` builds it once into the cache).

Architectures: one module per family in :mod:`vlalign.models.tiny_archs` (``qwen2_vl``,
``qwen2_5_vl``, ``llava``, ``idefics3``, ``gemma3`` ...; :data:`ARCHITECTURES` lists them all).
Sizes (:data:`vlalign.models.tiny_spec.SIZES`):

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import AutoModelForImageTextToText, PretrainedConfig, PreTrainedTokenizerFast, ProcessorMixin

from vlalign.models.tiny_archs import REGISTRY
from vlalign.models.tiny_init import geometric_position_init, repair_degenerate_init
from vlalign.models.tiny_spec import QWEN_VOCAB_SIZE, SIZES, SizeSpec, TinyArch
from vlalign.models.tiny_tokenizer import (
    DEFAULT_CORPUS,
    TokenizerSpec,
    corpus_sentences,
    generation_config,
    train_tokenizer,
)

__all__ = [
    "ARCHITECTURES",
    "BUILDER_VERSION",
    "QWEN_VOCAB_SIZE",
    "SIZES",
    "STAMP_FILE",
    "SizeSpec",
    "build_tiny_model",
    "cache_dir",
    "cache_lock",
    "image_tokens",
    "make_config",
    "make_processor",
    "resolve_model",
    "tokenizer_spec",
]

ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)
"""Architectures :func:`build_tiny_model` knows (:mod:`vlalign.models.tiny_archs`)."""

BUILDER_VERSION = 4
"""Bumped whenever a build's output changes, so that stale cached folders are rebuilt (4: the ChatML
template of Qwen2-VL / Qwen2.5-VL renders video parts; every model's weights as in 3)."""

STAMP_FILE = "vlalign_tiny.json"


def _arch(arch: str) -> TinyArch:
    if arch not in REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    return REGISTRY[arch]


def image_tokens(arch: str, size: str) -> int:
    """Number of image tokens one image becomes in the built model (placeholder tokens only)."""
    return _arch(arch).image_tokens(SIZES[size])


def tokenizer_spec(arch: str) -> TokenizerSpec:
    """The special tokens, end of turn and chat template of ``arch``'s tokenizer."""
    return _arch(arch).tokenizer


def make_config(arch: str, size: str, tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The real ``transformers`` config of ``arch`` at ``size`` for tokenizer ``tok``."""
    entry = _arch(arch)
    return entry.config(SIZES[size], tok, entry.image_tokens(SIZES[size]))


def make_processor(arch: str, size: str, tok: PreTrainedTokenizerFast) -> ProcessorMixin:
    """The real processor class of ``arch`` with its real image processor, set for ``size``."""
    entry = _arch(arch)
    return entry.processor(SIZES[size], tok, entry.image_tokens(SIZES[size]))


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
    entry = _arch(arch)
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
    tok = train_tokenizer(entry.tokenizer, sentences)
    processor = make_processor(arch, size, tok)
    config = make_config(arch, size, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        repair_degenerate_init(model, std=1.0 / math.sqrt(SIZES[size].vision_hidden))
        geometric_position_init(model)
        if entry.repair is not None:
            entry.repair(model, SIZES[size])
    model.generation_config = generation_config(tok, entry.tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    stamp_path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------- the cache and tiny:<arch>:<size>

TINY_PREFIX = "tiny:"


def cache_dir() -> Path:
    """Where built models and the embedded datasets live: ``$VLALIGN_CACHE``, else ``~/.cache/vlalign``."""
    return Path(os.environ.get("VLALIGN_CACHE") or Path.home() / ".cache" / "vlalign")


def cache_lock(name: str) -> FileLock:
    """An inter-process lock on the cache entry ``name`` (a file ``<cache>/<name>.lock``): two runs
    that build the same model or world at once wait for each other instead of writing one folder
    together."""
    path = cache_dir() / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


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
    name = f"{arch}-{size}-seed{seed}"
    with cache_lock(f"models/{name}"):
        return str(build_tiny_model(arch, size, cache_dir() / "models" / name, seed=seed))
