"""Scalar heads on a vision-language backbone: reward models and value functions (critics).

A *head* is one linear map from the language model's last hidden state to a number
(:class:`ScalarHead`). Where it reads the hidden states decides what it is:

* a **reward head** reads the hidden state at each completion's *last* token (the end-of-turn
  token, which has attended to the image, the question and the whole answer):
  ``CompletionLogprobs.last_hidden`` ``(R, H)`` -> rewards ``(R,)`` (:func:`sequence_scores`);
* a **value head** reads the hidden state at the position that *predicts* each completion token
  (the state s_t = (image, question, y_<t) in which action y_t is taken):
  ``CompletionLogprobs.hidden`` ``(R, L, H)`` -> values ``(R, L)`` (:func:`token_scores`), V(s_t).

Both come from :func:`vlalign.models.logprobs.completion_logprobs` with ``return_hidden=True``, so a
head shares the engine's prefix sharing (each image and prompt encoded once for all its
completions). The hidden states are those of the last layer after the final norm (the input of
``lm_head``), checked in ``tests/models/test_heads.py``.

:class:`RewardModel` and :class:`CriticModel` bundle a backbone (any loaded image-text-to-text
model, LoRA or not) with a head as one ``nn.Module``, so that the training loop's checkpoints
(which hold every trainable parameter of the modules they are given) cover both. A PPO policy
that shares its backbone with the critic keeps a bare :class:`ScalarHead` instead and calls
:func:`token_scores` on the hidden states of its own forward.

A trained reward model is a folder: the backbone as :func:`~vlalign.models.load.save_model_and_processor`
writes it (a full model or a LoRA adapter), plus ``reward_head.safetensors`` and
``reward_model.json`` (:class:`RewardModelInfo`: the head's size, the reward normalisation and,
for a fact-augmented model, the dataset column its ground-truth context comes from).
:func:`load_reward_model` reopens it.

Heads compute in float32 whatever the backbone's dtype (a bf16 backbone's hidden states are
cast up): the head is tiny and its output feeds losses whose precision matters.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlalign.data.collate import EncodedPrompts
from vlalign.models.arch import unwrap
from vlalign.models.load import load_model_and_processor, save_model_and_processor
from vlalign.models.logprobs import CompletionLogprobs, Mode, completion_logprobs
from vlalign.models.packing import Completions

HEAD_FILE = "reward_head.safetensors"
INFO_FILE = "reward_model.json"
INFO_FORMAT = 1


def hidden_size_of(model: nn.Module) -> int:
    """Width of the language model's last hidden state (what a head reads)."""
    config = unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot find the hidden size of {type(unwrap(model)).__name__} (no text_config.hidden_size)")
    return size


class ScalarHead(nn.Module):
    """``x -> w·dropout(x) + b``: one number per hidden-state vector ``(..., H) -> (...)``.

    Initialisation: ``w ~ N(0, 1/(H+1)²)`` (as OpenRLHF's reward and value heads; with unit-scale
    normed hidden states the initial outputs have std about 1/√H, close to 0), ``b = 0``. ``seed``
    makes the draw reproducible without touching the global random state.
    """

    def __init__(self, hidden_size: int, *, dropout: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1), got {dropout}")
        self.hidden_size = hidden_size
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, 1, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(1, hidden_size, generator=generator) / (hidden_size + 1))
            self.score.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"the head expects hidden states of width {self.hidden_size}, got {tuple(hidden.shape)}")
        return self.score(self.dropout(hidden.to(self.score.weight.dtype))).squeeze(-1)


def new_head(model: nn.Module, *, dropout: float = 0.0, seed: int | None = None) -> ScalarHead:
    """A fresh :class:`ScalarHead` sized for ``model``'s hidden states, on the model's device."""
    device = next(model.parameters()).device
    return ScalarHead(hidden_size_of(model), dropout=dropout, seed=seed).to(device)


def sequence_scores(head: nn.Module, logprobs: CompletionLogprobs) -> Tensor:
    """Reward-head outputs at each completion's last token: ``(R,)`` float32."""
    if logprobs.last_hidden is None:
        raise ValueError("sequence_scores needs hidden states: call completion_logprobs(..., return_hidden=True)")
    return head(logprobs.last_hidden)


def token_scores(head: nn.Module, logprobs: CompletionLogprobs) -> Tensor:
    """Value-head outputs V(s_t) for every completion token, ``(R, L)`` float32, 0 on padding."""
    if logprobs.hidden is None:
        raise ValueError("token_scores needs hidden states: call completion_logprobs(..., return_hidden=True)")
    values = head(logprobs.hidden)  # (R, L)
    return torch.where(logprobs.mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


# ------------------------------------------------------------------------------ backbone + head


class _Headed(nn.Module):
    """A backbone and a head as one module (one checkpoint entry, one ``accelerate.prepare``)."""

    def __init__(self, backbone: nn.Module, head: ScalarHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def hidden(
        self,
        prompts: EncodedPrompts,
        completions: Completions,
        *,
        mode: Mode = "shared",
        pad_token_id: int = 0,
        max_length: int | None = None,
        pack_length: int | None = None,
    ) -> CompletionLogprobs:
        """The backbone's forward over ``completions[i][j]`` given prompt ``i``, hidden states included
        (``pack_length``: several prompts per row, as ``completion_logprobs`` packs them)."""
        return completion_logprobs(
            self.backbone,
            prompts,
            completions,
            mode=mode,
            return_hidden=True,
            pad_token_id=pad_token_id,
            max_length=max_length,
            pack_length=pack_length,
        )


class RewardModel(_Headed):
    """A vision-language reward model: ``(prompts, completions) -> one reward per completion``.

    ``forward`` returns rewards ``(R,)`` in the flat order of :func:`completion_logprobs`
    (prompt 0's completions first). Raw head outputs: the saved normalisation
    (:class:`RewardModelInfo`) is applied by the scorer (:mod:`vlalign.rewards.model`), not here.
    """

    def forward(
        self,
        prompts: EncodedPrompts,
        completions: Completions,
        *,
        mode: Mode = "shared",
        pad_token_id: int = 0,
        max_length: int | None = None,
    ) -> Tensor:
        out = self.hidden(prompts, completions, mode=mode, pad_token_id=pad_token_id, max_length=max_length)
        return sequence_scores(self.head, out)


class CriticModel(_Headed):
    """A separate vision-language critic: ``(prompts, completions) -> V(s_t)`` ``(R, L)``, 0 on padding."""

    def forward(
        self,
        prompts: EncodedPrompts,
        completions: Completions,
        *,
        mode: Mode = "shared",
        pad_token_id: int = 0,
        max_length: int | None = None,
        pack_length: int | None = None,
    ) -> Tensor:
        out = self.hidden(
            prompts, completions, mode=mode, pad_token_id=pad_token_id, max_length=max_length, pack_length=pack_length
        )
        return token_scores(self.head, out)


# ------------------------------------------------------------------------------ saving and loading


def save_head(head: ScalarHead, path: str | Path, *, state: dict[str, Tensor] | None = None) -> Path:
    """Write the head's weights (safetensors); its width is read back from the weight's shape.
    ``state``: the head's weights gathered whole beforehand (a sharded head cannot be read here)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = head.state_dict() if state is None else state
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}, str(path))
    return path


def split_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix.``, with the prefix removed (a submodule's state)."""
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def load_head(path: str | Path, *, dropout: float = 0.0, device: str | torch.device = "cpu") -> ScalarHead:
    """A :class:`ScalarHead` with the weights of ``path`` (written by :func:`save_head`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head weights {path} do not exist")
    state = load_file(str(path))
    if "score.weight" not in state or state["score.weight"].ndim != 2 or state["score.weight"].shape[0] != 1:
        raise ValueError(
            f"{path} does not hold a scalar head (expected score.weight of shape (1, H), found keys {sorted(state)})"
        )
    head = ScalarHead(int(state["score.weight"].shape[1]), dropout=dropout)
    head.load_state_dict(state)
    return head.to(device)


@dataclass
class RewardModelInfo:
    """What a saved reward model needs besides its weights (``reward_model.json``)."""

    hidden_size: int
    """Width of the hidden states the head reads."""
    offset: float = 0.0
    """Subtracted from the raw head output before scaling (a mean reward measured after training)."""
    scale: float = 1.0
    """The raw reward minus ``offset`` is divided by this (a standard deviation measured after training)."""
    facts_column: str = ""
    """Fact-augmented model (Fact-RLHF): the ``meta`` column whose ground truth goes in the prompt ('' for none)."""
    facts_template: str = ""
    """How the facts are written before the question ('' for :data:`vlalign.rewards.FACTS_TEMPLATE`)."""
    heldout_accuracy: float | None = None
    """Pairwise accuracy on the held-out pairs at the end of training (for the record)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (training data, steps...)."""
    format: int = INFO_FORMAT

    def normalise(self, raw: Tensor) -> Tensor:
        """``(raw - offset) / scale``."""
        return (raw - self.offset) / self.scale


def read_info(folder: str | Path) -> RewardModelInfo:
    """The :class:`RewardModelInfo` of a saved reward model folder."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a reward model folder: {INFO_FILE} is missing (train one with `vlalign rm`)"
        )
    data = json.loads(path.read_text())
    known = {f.name for f in fields(RewardModelInfo)}
    unknown = sorted(set(data) - known)
    if unknown or int(data.get("format", 0)) > INFO_FORMAT:
        raise ValueError(
            f"{path}: unknown fields {unknown} or format {data.get('format')} (this vlalign reads "
            f"format {INFO_FORMAT}); upgrade vlalign or retrain the reward model"
        )
    info = RewardModelInfo(**data)
    if not (math.isfinite(info.offset) and math.isfinite(info.scale) and info.scale > 0):
        raise ValueError(f"{path}: offset {info.offset} and scale {info.scale} must be finite with scale > 0")
    return info


def save_reward_model(
    model: RewardModel,
    processor: Any,
    out_dir: str | Path,
    info: RewardModelInfo,
    *,
    mode: Literal["auto", "adapter", "merged", "full"] = "auto",
    state: dict[str, Tensor] | None = None,
) -> Path:
    """Write a reward model folder: backbone (full or adapter, by ``mode``), head and info.

    ``state``: the whole model's weights gathered beforehand by every process (an FSDP2-sharded
    model, :func:`vlalign.training.checkpoints.full_state_dict`); the backbone is then written
    whole with ``save_pretrained(state_dict=...)``."""
    if state is None:
        out = save_model_and_processor(model.backbone, processor, out_dir, mode=mode)
    else:
        if mode == "merged":
            raise ValueError("--save=merged is not supported for a sharded (FSDP) model: save the adapter")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.backbone.save_pretrained(out, state_dict=split_state(state, "backbone"))
        processor.save_pretrained(out)
    save_head(model.head, out / HEAD_FILE, state=None if state is None else split_state(state, "head"))
    (out / INFO_FILE).write_text(json.dumps(asdict(info), indent=1) + "\n")
    return out


def load_reward_model(
    folder: str | Path, *, device: str | None = "auto", dtype: str | torch.dtype = "auto", trainable: bool = False
) -> tuple[RewardModel, Any, RewardModelInfo]:
    """Reopen a folder written by :func:`save_reward_model`: ``(model, processor, info)``.

    ``trainable=False`` (scoring) freezes every weight and puts the model in eval mode.
    """
    folder = Path(folder)
    info = read_info(folder)
    backbone, processor = load_model_and_processor(folder, device=device, dtype=dtype, adapter_trainable=trainable)
    head = load_head(folder / HEAD_FILE, device=next(backbone.parameters()).device)
    if head.hidden_size != hidden_size_of(backbone) or head.hidden_size != info.hidden_size:
        raise ValueError(
            f"{folder}: head width {head.hidden_size}, info {info.hidden_size} and backbone "
            f"{hidden_size_of(backbone)} disagree; the folder is inconsistent"
        )
    model = RewardModel(backbone, head)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model, processor, info


__all__ = [
    "CriticModel",
    "RewardModel",
    "RewardModelInfo",
    "ScalarHead",
    "hidden_size_of",
    "load_head",
    "load_reward_model",
    "new_head",
    "read_info",
    "save_head",
    "save_reward_model",
    "sequence_scores",
    "token_scores",
]
