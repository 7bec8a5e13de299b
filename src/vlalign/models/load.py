"""Loading and saving Hugging Face image-text-to-text models with their processors.

:func:`load_model_and_processor` opens any model that ``AutoModelForImageTextToText`` knows
(tested on Qwen2-VL, Qwen2.5-VL, LLaVA, Idefics3 / SmolVLM and Gemma3) from a local folder, a
folder holding a PEFT adapter, or a hub name, and applies the training set-up: dtype, device,
attention implementation, gradient checkpointing, which parts train, and LoRA through PEFT.

Which parts are which is found from the module tree (:func:`find_parts`), not hard-coded per
model: the language model is the submodule named ``language_model`` or ``text_model``; the
vision tower ``visual``, ``vision_tower`` or ``vision_model``; the multimodal projector
``multi_modal_projector``, ``connector`` or Qwen's ``visual.merger``. LoRA's ``"auto"`` targets
are every ``nn.Linear`` of the language model (attention and MLP projections), plus those of
the vision tower when ``freeze_vision=False``; the projector is trained in full, or frozen, by
option (it is not always an ``nn.Linear``: Gemma3's is a bare weight matrix).

A hub name without network fails fast: with ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE``)
the local cache is checked at once; otherwise one metadata query to the hub, bounded by a short
timeout (name lookup included), runs first. Either way the error says the hub is unreachable
and suggests a local folder.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from torch import nn
from transformers import AutoProcessor, PreTrainedModel

from vlalign.config import StrictFields
from vlalign.data.chat import tokenizer_of
from vlalign.errors import UserError
from vlalign.models.load_checks import from_pretrained, missing_pieces
from vlalign.models.quantization import is_quantized, keep_training_layout, report_kernel_notice

LANGUAGE_NAMES = ("language_model", "text_model")
VISION_NAMES = ("visual", "vision_tower", "vision_model")
PROJECTOR_NAMES = (
    "multi_modal_projector",
    "connector",
    "merger",
    "mm_projector",
    "deepstack_merger_list",
    "embed_vision",
)
"""Projectors from vision to text features; ``deepstack_merger_list``: Qwen3-VL's DeepStack mergers."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(UserError, RuntimeError):
    """A model or processor cannot be loaded; the message says why and what to do."""


@dataclass
class LoraSpec(StrictFields):
    """How to wrap a model with LoRA adapters (PEFT)."""

    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scaling numerator: adapters are scaled by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = "auto"
    """``"auto"`` (every linear layer of the language model, and of the vision tower unless
    ``freeze_vision``), a PEFT regular expression, or a list of module names / suffixes."""
    freeze_vision: bool = True
    """Keep the vision tower frozen (True) or adapt it with LoRA too (False)."""
    train_projector: bool = False
    """Train the multimodal projector in full (saved with the adapter) or keep it frozen."""


@dataclass
class ModelParts:
    """Qualified module names of a model's parts (``None`` when the model has no such part)."""

    language: str
    vision: str | None
    projectors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------- the parts


def find_parts(model: nn.Module) -> ModelParts:
    """Locate the language model, vision tower and projector(s) of an image-text-to-text model."""
    names = [n for n, _ in model.named_modules() if n]

    def first(candidates: tuple[str, ...]) -> str | None:
        found = [n for n in names if n.rsplit(".", 1)[-1] in candidates]
        return min(found, key=lambda n: n.count("."), default=None)

    language = first(LANGUAGE_NAMES)
    if language is None:
        raise ModelLoadError(
            f"cannot find the language model in {type(model).__name__} (no submodule named one of "
            f"{LANGUAGE_NAMES}); pass LoraSpec.target_modules explicitly"
        )
    projectors = [n for n in names if n.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
    projectors = [p for p in projectors if not any(p.startswith(q + ".") for q in projectors)]
    lists = {n: m for n, m in model.named_modules() if n in projectors and isinstance(m, nn.ModuleList)}
    # a list of projectors (Qwen3-VL's DeepStack mergers) is its members: PEFT saves modules, not lists
    projectors = [q for p in projectors for q in ([f"{p}.{i}" for i in range(len(lists[p]))] if p in lists else [p])]
    return ModelParts(language=language, vision=first(VISION_NAMES), projectors=projectors)


def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def auto_target_modules(model: nn.Module, *, include_vision: bool) -> str:
    """PEFT regex of the linear layers LoRA adapts: language model (and vision tower), no projector.

    Built from the exact names of the ``nn.Linear`` modules, with layer numbers generalised to
    ``\\d+`` (so the regex stays short), e.g.
    ``model\\.language_model\\.layers\\.\\d+\\.self_attn\\.q_proj``. Convolutions (patch embeddings)
    and the projector are never targeted.
    """
    parts = find_parts(model)
    prefixes = [parts.language] + ([parts.vision] if include_vision and parts.vision else [])
    patterns: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not any(_under(name, p) for p in prefixes):
            continue
        if any(_under(name, p) for p in parts.projectors) or "patch_embed" in name:  # Gemma 4's is linear
            continue
        pattern = r"\.".join(r"\d+" if piece.isdigit() else re.escape(piece) for piece in name.split("."))
        if pattern not in patterns:
            patterns.append(pattern)
    if not patterns:
        raise ModelLoadError(f"no linear layers found under {prefixes}; pass LoraSpec.target_modules explicitly")
    return "^(?:" + "|".join(patterns) + ")$"


def apply_lora(model: PreTrainedModel, spec: LoraSpec) -> nn.Module:
    """Wrap ``model`` in a PEFT ``PeftModel`` with LoRA adapters as ``spec`` says."""
    targets = spec.target_modules
    if targets == "auto":
        targets = auto_target_modules(model, include_vision=not spec.freeze_vision)
    modules_to_save = find_parts(model).projectors if spec.train_projector else None
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        bias="none",
    )
    return get_peft_model(model, config)


def set_trainable(model: nn.Module, *, freeze_vision: bool, freeze_projector: bool = False) -> None:
    """For full fine-tuning: every parameter trains except the vision tower / projector if frozen."""
    parts = find_parts(model)
    for name, param in model.named_parameters():
        in_projector = any(_under(name, p) for p in parts.projectors)
        in_vision = _under(name, parts.vision) and not in_projector
        param.requires_grad_(not ((freeze_vision and in_vision) or (freeze_projector and in_projector)))


# ------------------------------------------------------------------------------ hub handling


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_check(repo_id: str, endpoint: str | None = None, *, timeout: float = 3.0) -> str | None:
    """Ask the hub about ``repo_id`` within ``timeout`` seconds; ``None`` if it answered usably.

    Otherwise returns why not (no answer in time, a refused connection, a failed name lookup,
    an HTTP error, no such repository). A gated or private repository counts as an answer: the
    download that follows reports the access problem itself. The whole query, name lookup
    included, runs in a thread joined with ``timeout``, so it cannot hang.
    """
    outcome: list[str | None] = []

    def query() -> None:
        try:
            HfApi(endpoint=endpoint or hub_endpoint()).model_info(repo_id, timeout=timeout)
            outcome.append(None)
        except GatedRepoError:
            outcome.append(None)
        except Exception as exc:  # network errors come from httpx, HTTP errors from huggingface_hub
            outcome.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    thread = threading.Thread(target=query, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _cached(repo_id: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id, an unreadable cache: treat as not cached
        return False


def _looks_like_path(name: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def resolve_source(name_or_path: str | os.PathLike, *, probe_timeout: float = 3.0) -> tuple[str, bool]:
    """``(source, local_files_only)`` for a local folder or a hub name; fails fast without network."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{text!r} is a file; pass the folder that holds config.json")
        return str(path), True
    if _looks_like_path(text):
        raise ModelLoadError(f"model folder {text!r} does not exist")
    advice = (
        f"pass a local folder instead (one written by `save_model_and_processor`, by "
        f"`vlalign.models.tiny.build_tiny_model`, or by `hf download {text} --local-dir DIR` on a "
        "machine with network)"
    )
    if hub_offline():
        if _cached(text):
            return text, True
        raise ModelLoadError(
            f"{text!r} is not a local folder, and the Hugging Face Hub is switched off (HF_HUB_OFFLINE / "
            f"TRANSFORMERS_OFFLINE is set) and the model is not in the local cache; {advice}, or unset HF_HUB_OFFLINE"
        )
    problem = hub_check(text, timeout=probe_timeout)
    if problem is not None:
        if _cached(text):
            return text, True
        raise ModelLoadError(
            f"{text!r} is not a local folder, the Hugging Face Hub at {hub_endpoint()} is unreachable or "
            f"does not serve it ({problem}), and it is not in the local cache; {advice}"
        )
    return text, False


# ----------------------------------------------------------------------------------- loading


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``"auto"``: bfloat16 on a GPU that supports it, float32 otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of 'auto', {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> str:
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def load_model_and_processor(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = "auto",
    attn_implementation: str | None = "sdpa",
    gradient_checkpointing: bool = False,
    lora: LoraSpec | None = None,
    freeze_vision: bool = False,
    trust_remote_code: bool = False,
    adapter_trainable: bool = True,
    probe_timeout: float = 3.0,
    quantization: str = "none",
) -> tuple[nn.Module, Any]:
    """Load an image-text-to-text model and its processor, set up for training.

    ``name_or_path``: a local folder (a full model, or a PEFT adapter folder whose
    ``adapter_config.json`` names its base model), or a hub name. ``device="auto"`` picks CUDA
    when available; ``None`` leaves the model on the CPU for accelerate to place.
    ``freeze_vision`` freezes the vision tower for full fine-tuning (``lora=None``); with LoRA,
    ``lora.freeze_vision`` decides. An adapter folder loads with its adapter trainable when
    ``adapter_trainable``, and then ``lora`` must be None. ``quantization="nf4"`` (QLoRA, with
    ``lora`` only) loads the language model's linear layers in 4-bit NF4 (:func:`nf4_config`).
    """
    source, local_only = resolve_source(name_or_path, probe_timeout=probe_timeout)
    adapter_dir = Path(source) / "adapter_config.json" if local_only else None
    if adapter_dir is not None and adapter_dir.is_file() and not (Path(source) / "config.json").is_file():
        return _load_adapter(
            source,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
            trainable=adapter_trainable,
            lora=lora,
            probe_timeout=probe_timeout,
        )
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype, dev),
        "trust_remote_code": trust_remote_code,
        "local_files_only": local_only,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization != "none":
        kwargs.update(quantization_config=nf4_config(quantization, kwargs["dtype"], lora), device_map={"": dev})
    try:
        processor = AutoProcessor.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
        model = from_pretrained(source, kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load an image-text-to-text model from {source!r}: {exc}") from exc
    except SafetensorError as exc:  # a truncated or corrupt weights file
        raise ModelLoadError(
            f"cannot read the weights of {source!r} ({exc}): a *.safetensors file there is truncated or corrupt"
        ) from exc
    if quantization != "none":  # placed by device_map; frozen, norms and embeddings in float32 (PEFT)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_training_layout(model)
        device = None
    missing = missing_pieces(model, processor)
    if missing:
        raise ModelLoadError(f"{source!r} cannot be trained by vlalign; it lacks " + "; ".join(missing))
    return _set_up(model, dev if device is not None else None, gradient_checkpointing, lora, freeze_vision), processor


# Kept in full precision under nf4 (as LLaVA's QLoRA does): vision tower, projector(s), LM head;
# transformers matches each as a regex at a module-name boundary.
NF4_SKIPPED = (r"(?:.*\.)?(?:" + "|".join((*VISION_NAMES, *PROJECTOR_NAMES, "lm_head")) + ")",)


def nf4_config(quantization: str, compute_dtype: torch.dtype, lora: LoraSpec | None) -> Any:
    """transformers' ``BitsAndBytesConfig`` for a QLoRA base: NF4 weights with double quantisation
    (the QLoRA paper's set-up), matmuls in ``compute_dtype``, :data:`NF4_SKIPPED` left unquantized.
    Refuses anything but ``"nf4"``, a model without LoRA (4-bit weights cannot train) and a
    missing ``bitsandbytes``."""
    if quantization != "nf4":
        raise ModelLoadError(f"quantization={quantization!r} is not one of 'none', 'nf4'")
    if lora is None:
        raise ModelLoadError("quantization='nf4' (QLoRA) needs LoRA: 4-bit weights cannot train (set use_lora)")
    try:
        import bitsandbytes  # noqa: F401  (transformers imports it too; checked here for a one-line error)
    except ImportError as exc:
        raise ModelLoadError("quantization='nf4' needs the bitsandbytes package: pip install 'vlalign[qlora]'") from exc
    report_kernel_notice()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(NF4_SKIPPED),
    )


def _set_up(
    model: nn.Module, device: str | None, checkpointing: bool, lora: LoraSpec | None, freeze_vision: bool
) -> nn.Module:
    if device is not None:
        model.to(device)
    if checkpointing:
        enable_checkpointing(model)
    if lora is not None:
        return apply_lora(model, lora)
    set_trainable(model, freeze_vision=freeze_vision)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing, non-reentrant, KV cache off.

    transformers 5.x renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable`` (the old name warns); either is used, whichever exists.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any submodule runs with activation checkpointing."""
    return any(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())


def _load_adapter(folder: str, *, trainable: bool, lora: LoraSpec | None, **kwargs: Any) -> tuple[nn.Module, Any]:
    if lora is not None:
        raise ModelLoadError(f"{folder!r} already holds a LoRA adapter; load it with lora=None")
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(
            f"{folder}/adapter_config.json names no base_model_name_or_path; cannot load the base model"
        )
    model, _ = load_model_and_processor(base, lora=None, **kwargs)
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        processor = AutoProcessor.from_pretrained(base, local_files_only=True)
    peft_model = PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    return peft_model, processor


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two processors tokenize alike (a KL between their models is then defined token by token)."""
    return tokenizer_of(a).get_vocab() == tokenizer_of(b).get_vocab()


# ------------------------------------------------------------------------------------ saving


def save_model_and_processor(
    model: nn.Module,
    processor: Any,
    out_dir: str | os.PathLike,
    *,
    mode: Literal["auto", "adapter", "merged", "full"] = "auto",
) -> Path:
    """Save in Hugging Face format (safetensors) with the processor; returns the folder.

    ``mode``: ``"adapter"`` writes only a PEFT model's adapter (small; reload with
    :func:`load_model_and_processor` while the base model stays where it was); ``"merged"``
    merges the adapter into a copy of the weights (the model itself is left wrapped; the copy
    costs one model's memory) and writes a plain model; ``"full"`` writes a plain model;
    ``"auto"`` is ``"adapter"`` for a PEFT model and ``"full"`` otherwise.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "peft_config")
    if mode == "auto":
        mode = "adapter" if is_peft else "full"
    if mode in ("adapter", "merged") and not is_peft:
        raise ValueError(f"mode={mode!r} needs a PEFT model; this is a {type(model).__name__}")
    if mode == "merged" and is_quantized(model):
        raise ModelLoadError(
            "--save=merged on a 4-bit (nf4) base would round the merged weights to 4 bits: save the "
            "adapter (it loads on the full-precision base) and merge it there"
        )
    if mode == "merged":
        copy.deepcopy(model).merge_and_unload().save_pretrained(out)
    elif mode == "full" and is_peft:
        raise ValueError("mode='full' on a PEFT model: use 'adapter' or 'merged'")
    else:
        model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
