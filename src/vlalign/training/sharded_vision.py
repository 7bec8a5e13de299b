"""Every process runs a sharded vision tower the same number of times, images or not (FSDP2).

A sharded module gathers its weights from every process in its forward (an all-gather per FSDP
unit) and reduce-scatters its gradients in its backward. A forward whose prompts hold no image
never runs the vision tower; if another process's forward at the same point has images, that
process waits in the vision tower's all-gathers for a partner that is already gathering the
decoder layers: a hang (NCCL), or gloo's "Received data size doesn't match expected size". The
root unit's gradients (FSDP2 reduce-scatters only the parameters that got one) mismatch the same
way.

:func:`vision_parity` makes "the vision tower runs exactly once per call of the language model"
true on every process, so the processes' collectives match whenever their language-model calls
do (which the loops already guarantee: every process runs the same micro-batches):

* a forward pre-hook on the vision tower notes that it ran;
* a forward pre-hook on the language model, when the vision tower has not run since the language
  model's previous call and the weights are sharded (some parameter of the language model is still
  a DTensor: inside :func:`vlalign.training.distributed.whole_weights` every forward is local and
  nothing is added), runs the model's ``get_image_features`` on one blank image (made once by the
  processor's image processor) and adds ``0 * sum(features)`` to the language model's
  ``inputs_embeds``. The features are finite, so the sum is exactly zero and the embeddings are
  unchanged bit for bit; the gradients the term gives the vision tower and projector are exact
  zeros, which is what a process without images holds, so the averaged gradient is the one of the
  global batch. It runs where the real images would have run (before the decoder layers), so
  the order of the collectives is the same as on an image-bearing process, forward and backward.

The cost: one vision-tower forward (and backward) on a small image per language-model call without
images, only under FSDP. DDP needs no forward (its all-reduce is over gradients only):
:func:`vlalign.training.distributed.vision_touch` covers it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from vlalign.models.load import ModelLoadError, find_parts

logger = logging.getLogger(__name__)

BLANK_SIZE = 56
"""Side in pixels of the blank image (the smallest Qwen2-VL accepts: 4 x 4 patches of 14)."""


def blank_image_inputs(processor: Any) -> dict[str, Tensor]:
    """The image processor's tensors for one black ``BLANK_SIZE`` square image (``pixel_values``
    and whatever else the model's ``get_image_features`` takes: ``image_grid_thw``, ...)."""
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(images=[Image.new("RGB", (BLANK_SIZE, BLANK_SIZE))], return_tensors="pt")
    return {k: v for k, v in dict(out).items() if isinstance(v, Tensor)}


def _float_tensors(value: Any) -> list[Tensor]:
    """Every floating-point tensor in ``value`` (a tensor, a model output, a tuple, list or dict of them)."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _float_tensors(v)]
    return []


UNUSED_FIELDS = ("last_hidden_state", "hidden_states", "attentions")
"""Fields of a ``get_image_features`` output the model does not feed to its language model when the
output has ``pooler_output`` (transformers 5's convention: the projected features there, plus
extras such as Qwen3-VL's ``deepstack_features``). Summing them would give gradients to parameters
an image never reaches (LLaVA-OneVision's ``post_layernorm``: it reads an earlier layer)."""


def used_features(output: Any) -> Any:
    """The part of a ``get_image_features`` output that reaches the language model."""
    if isinstance(output, dict) and output.get("pooler_output") is not None:
        return {k: v for k, v in output.items() if k not in UNUSED_FIELDS}
    return output


class VisionParity:
    """The hooks' state for one model: whether the vision tower ran since the language model's
    last call, the blank image's inputs, and the zero term waiting for the language model."""

    def __init__(self, model: nn.Module, language: nn.Module, vision: nn.Module, inputs: dict[str, Tensor]) -> None:
        self.features = next(m for m in model.modules() if callable(getattr(m, "get_image_features", None)))
        """The module whose ``get_image_features`` runs the vision tower and projector."""
        accepted = inspect.signature(self.features.get_image_features).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
        self.inputs = {k: v for k, v in inputs.items() if takes_all or k in accepted}
        self.language, self.vision = language, vision
        self.ran = False
        """Whether the vision tower ran since the language model's last call."""
        self.dummies = 0
        """How many blank-image forwards ran (for tests and logs)."""

    def sharded(self) -> bool:
        return any(isinstance(p, DTensor) for p in self.language.parameters())

    def blank_features(self) -> Tensor:
        """``0 * sum`` of the vision features of the blank image (exactly zero, on the model's graph)."""
        ref = next(self.vision.parameters())
        device = ref.device if not isinstance(ref, DTensor) else ref.to_local().device
        inputs = {
            k: v.to(device=device, dtype=ref.dtype if v.is_floating_point() else v.dtype)
            for k, v in self.inputs.items()
        }
        self.dummies += 1
        tensors = _float_tensors(used_features(self.features.get_image_features(**inputs)))
        return sum((t.float().sum() for t in tensors), torch.zeros((), device=device)) * 0.0

    def on_vision(self, module: nn.Module, args: tuple) -> None:
        self.ran = True

    def on_language(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ran, self.ran = self.ran, False
        embeds = kwargs.get("inputs_embeds")
        if ran or embeds is None or not self.sharded():
            return None
        zero = self.blank_features()
        self.ran = False  # the blank forward does not count for the next call
        return args, {**kwargs, "inputs_embeds": embeds + zero.to(embeds.dtype)}


def vision_parity(models: list[nn.Module], processor: Any) -> list[VisionParity]:
    """Register :class:`VisionParity`'s hooks on each of ``models`` (an image-text model, a PEFT
    model or a wrapper holding one: a reward model, a critic) that has a vision tower, once per
    language model (PPO's shared critic holds the policy's). Returns the registered states."""
    inputs = blank_image_inputs(processor)
    found: dict[int, VisionParity] = {}
    for model in models:
        try:
            parts = find_parts(model)
        except ModelLoadError:  # not an image-text model (a value head): nothing to keep in step
            continue
        language = model.get_submodule(parts.language)
        if parts.vision is None or id(language) in found:
            continue
        if not any(callable(getattr(m, "get_image_features", None)) for m in model.modules()):
            logger.warning(
                "%s has no get_image_features: under FSDP every micro-batch of every process must hold an "
                "image (a text-only one would leave the other processes waiting in the vision tower)",
                type(model).__name__,
            )
            continue
        vision = model.get_submodule(parts.vision)
        parity = found[id(language)] = VisionParity(model, language, vision, inputs)
        vision.register_forward_pre_hook(parity.on_vision)
        language.register_forward_pre_hook(parity.on_language, with_kwargs=True)
    return list(found.values())
