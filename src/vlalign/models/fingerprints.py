"""Fingerprints of what a cached reference log-prob was computed from: the model and the sample.

:func:`model_fingerprint` hashes a model's class, config and weights (PEFT's wrappers stripped with
``base_only``, so the adapter-disabled policy fingerprints like its base); :func:`prompt_content_hash`
hashes a prompt as the model sees it (token ids and image tensors) and :func:`sample_content_hash`
a raw sample (its conversation and decoded pixels). :class:`vlalign.models.reference.PrecomputedReference`
keys its cache by them, so a changed model or image never reads a stale entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlalign.data.collate import EncodedPrompts
from vlalign.data.schema import ImageLike, load_image
from vlalign.models.arch import unwrap


def _normalise_name(name: str) -> str:
    """Parameter name with PEFT's wrappers removed (so a base model and its LoRA-wrapped self agree)."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def _is_adapter(name: str) -> bool:
    return "lora_" in name or ".modules_to_save." in name


def model_fingerprint(model: nn.Module, *, base_only: bool = False) -> str:
    """A hash of the model's class, config and every parameter and buffer (names, dtypes, shapes, bytes).

    ``base_only`` skips LoRA weights and PEFT's trainable module copies and strips PEFT's name
    wrappers, so the adapter-disabled model fingerprints like the plain base model. Hashing reads
    every weight once (about a second per GB).
    """
    inner = unwrap(model)
    digest = hashlib.blake2b(digest_size=20)
    config = getattr(inner, "config", None)
    digest.update(type(inner).__name__.encode())
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    tensors = [(n, t) for n, t in model.state_dict().items() if not (base_only and _is_adapter(n))]
    for name, tensor in sorted(((_normalise_name(n) if base_only else n, t) for n, t in tensors), key=lambda x: x[0]):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prompt_content_hash(prompts: EncodedPrompts, i: int) -> str:
    """Hash of prompt ``i`` as the model sees it: token ids, per-token fields and its image tensors.

    The image tensors are the processor's output for this prompt's images, so a changed image
    (or a changed image processor) gives a different hash.
    """
    digest = hashlib.blake2b(digest_size=20)
    digest.update(torch.tensor(prompts.input_ids[i], dtype=torch.long).numpy().tobytes())
    for key in sorted(prompts.token_fields):
        digest.update(key.encode() + torch.tensor(prompts.token_fields[key][i], dtype=torch.long).numpy().tobytes())
    for key in sorted(prompts.vision):
        part = prompts.vision[key][prompts.vision_rows[key][i]].detach().to("cpu").contiguous()
        digest.update(f"{key}|{part.dtype}|{tuple(part.shape)}".encode())
        digest.update(part.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sample_content_hash(prompt: Any, images: Sequence[ImageLike]) -> str:
    """Hash of a raw sample: its conversation (as JSON) and its images' decoded pixels."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps(prompt, sort_keys=True, default=str).encode())
    for image in images:
        img = load_image(image)
        digest.update(f"{img.mode}|{img.size}".encode())
        digest.update(img.tobytes())
    return digest.hexdigest()
