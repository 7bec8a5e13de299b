"""Batch records and their layout: prompt/completion spans, padding, and image-safe length checks.

:class:`EncodedPrompts` is what one processor call gives (:func:`vlalign.data.collate.encode_prompts`);
:func:`build_rows` lays out one right-padded row per (prompt, completion) with its labels and
spans, :func:`build_prompt_rows` left-pads prompts for generation, and :func:`check_lengths` says
which samples fit ``max_length`` (never truncating: a cut could go through image tokens). No
processor is called here; :mod:`vlalign.data.collate` holds the processor's quirks and re-exports
these names, so callers import batching from one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from vlalign.data.schema import DataError

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt and padding)."""

OnOverflow = Literal["drop", "raise"]

TOKEN_SPAN_KEYS = ("cross_attention_mask",)
"""Vision tensors laid out along each prompt's tokens, ``(prompts, tokens, ...)``: Mllama's cross-attention
mask (which images and tiles each token sees). Row ``i`` holds prompt ``i``'s tokens first
(:func:`vlalign.data.collate.encode_prompts`); every layout copies them to the prompt's tokens and repeats the
prompt's last entry on the tokens after it (:func:`spread_along_tokens`)."""


def spread_along_tokens(
    prompts: EncodedPrompts, key: str, placements: Sequence[tuple[int, int, int, int]], shape: tuple[int, int]
) -> Tensor:
    """The :data:`TOKEN_SPAN_KEYS` tensor ``key`` for rows of ``shape`` ``(rows, width)``, zero where unplaced.

    ``placements`` are ``(row, prompt i, start, stop)``: prompt ``i`` sits at ``[start, start + P_i)`` of
    ``row`` and the tokens up to ``stop`` continue it (its completions), so they get its last token's entry:
    the processor marks every token after an image as seeing it, and ``model.generate`` extends the mask
    the same way.
    """
    source = prompts.vision[key]
    out = source.new_zeros((*shape, *source.shape[2:]))
    for row, i, start, stop in placements:
        n = len(prompts.input_ids[i])
        own = source[prompts.vision_rows[key][i]][0, :n]
        out[row, start : start + n] = own
        out[row, start + n : stop] = own[n - 1]
    return out


# ------------------------------------------------------------------------------ batch records


@dataclass
class EncodedPrompts:
    """Prompts of a batch after one processor call; ragged (no padding).

    ``vision_rows[key][i]`` is the slice of ``vision[key]``'s first dimension that belongs to
    prompt ``i`` (empty for a prompt without images).
    """

    sample_ids: list[str]
    input_ids: list[list[int]]
    """Token ids of each prompt, image tokens expanded, generation prompt included."""
    token_fields: dict[str, list[list[int]]]
    """Per-token processor outputs (``mm_token_type_ids`` ...), ragged like ``input_ids``."""
    vision: dict[str, Tensor]
    """Vision tensors as the processor returned them for the whole batch."""
    vision_rows: dict[str, list[slice]]
    num_images: list[int]
    image_token_count: list[int]
    """Number of image-placeholder tokens in each prompt."""
    completion_fields: dict[str, int] = field(default_factory=dict)
    """The value a per-token field takes on completion tokens (0 when absent): PaliGemma's
    processor marks its suffix (what the model writes) with ``token_type_ids`` 1, the prefix 0."""
    num_videos: list[int] = field(default_factory=list)
    """Videos of each prompt (``{"type": "video"}`` parts); empty when the batch has none."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def vision_for(self, order: Sequence[int]) -> dict[str, Tensor]:
        """Vision tensors for a batch whose rows come from prompts ``order`` (repeats allowed).

        When none of those prompts has an image or a video the result is empty, as the processor's output
        for a batch without images (Idefics3's all-padding image slots are not passed on).
        """
        if sum(self.num_images[i] + (self.num_videos[i] if self.num_videos else 0) for i in order) == 0:
            return {}
        return {key: torch.cat([t[self.vision_rows[key][i]] for i in order], dim=0) for key, t in self.vision.items()}

    def select(self, keep: Sequence[int]) -> EncodedPrompts:
        """The prompts ``keep`` (in that order), vision tensors cut down to their rows."""
        vision = self.vision_for(keep)
        rows: dict[str, list[slice]] = {}
        for key in vision:
            start, spans = 0, []
            for i in keep:
                s = self.vision_rows[key][i]
                spans.append(slice(start, start + (s.stop - s.start)))
                start += s.stop - s.start
            rows[key] = spans
        return EncodedPrompts(
            sample_ids=[self.sample_ids[i] for i in keep],
            input_ids=[self.input_ids[i] for i in keep],
            token_fields={k: [v[i] for i in keep] for k, v in self.token_fields.items()},
            vision=vision,
            vision_rows=rows,
            num_images=[self.num_images[i] for i in keep],
            image_token_count=[self.image_token_count[i] for i in keep],
            completion_fields=dict(self.completion_fields),
            num_videos=[self.num_videos[i] for i in keep] if self.num_videos else [],
        )


@dataclass
class SequenceBatch:
    """Padded rows of (prompt, completion), ready for ``model(**batch.model_inputs())``.

    Rows are right-padded: row ``r`` holds its prompt at ``[0, prompt_lengths[r])`` and its
    completion at ``[prompt_lengths[r], prompt_lengths[r] + completion_lengths[r])``.
    """

    input_ids: Tensor  # (R, T) long
    attention_mask: Tensor  # (R, T) long, 1 on prompt and completion
    labels: Tensor  # (R, T) long, token id on completion tokens, -100 elsewhere
    vision: dict[str, Tensor]
    """Everything else the model's forward needs (opaque to callers)."""
    prompt_lengths: Tensor  # (R,) long
    completion_lengths: Tensor  # (R,) long
    row_prompt: Tensor  # (R,) long: index of the row's prompt in the batch's prompts
    row_completion: Tensor  # (R,) long: index of the row's completion among its prompt's
    sample_ids: list[str]
    """Sample id of each row (repeated when a prompt has several completions)."""
    dropped_ids: list[str] = field(default_factory=list)
    """Ids of samples of this batch dropped for exceeding ``max_length``."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def completion_mask(self) -> Tensor:  # (R, T) bool
        return self.labels != IGNORE_INDEX

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments of the model's forward (no labels: losses are computed by us)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.vision}

    def to(self, device: torch.device | str) -> SequenceBatch:
        return _to_device(self, device)


@dataclass
class GenerationBatch:
    """Prompts alone, left-padded, for ``model.generate(**batch.model_inputs())``."""

    input_ids: Tensor  # (B, P) long, left-padded
    attention_mask: Tensor  # (B, P) long
    vision: dict[str, Tensor]
    prompt_lengths: Tensor  # (B,) long
    sample_ids: list[str]
    dropped_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def model_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.vision}

    def to(self, device: torch.device | str) -> GenerationBatch:
        return _to_device(self, device)


def _to_device(batch: Any, device: torch.device | str) -> Any:
    changes: dict[str, Any] = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = value.to(device)
        elif isinstance(value, dict):
            changes[f.name] = {k: v.to(device) for k, v in value.items()}
    return replace(batch, **changes)


# ------------------------------------------------------------------------------------ lengths


def check_lengths(
    prompts: EncodedPrompts,
    completions: Sequence[Sequence[Sequence[int]]] | None,
    *,
    max_length: int | None,
    on_overflow: OnOverflow = "drop",
) -> tuple[list[int], list[str]]:
    """Indices of the prompts whose longest sequence fits ``max_length``, and the dropped ids.

    A prompt's longest sequence is its length plus its longest completion (or the prompt alone
    when ``completions`` is None). With ``on_overflow="raise"`` the first over-long sample
    raises :class:`DataError` instead.
    """
    keep: list[int] = []
    dropped: list[str] = []
    for i, ids in enumerate(prompts.input_ids):
        longest = max((len(c) for c in completions[i]), default=0) if completions is not None else 0
        total = len(ids) + longest
        if max_length is None or total <= max_length:
            keep.append(i)
            continue
        if on_overflow == "raise":
            raise DataError(
                f"sample {prompts.sample_ids[i]!r}: {total} tokens (prompt {len(ids)}, of which "
                f"{prompts.image_token_count[i]} image tokens, + completion {longest}) exceed max_length "
                f"{max_length}; raise max_length or shorten the sample (vlalign never truncates, since "
                "truncation could cut through image tokens)"
            )
        dropped.append(prompts.sample_ids[i])
    return keep, dropped


# --------------------------------------------------------------------------------- row layout


def build_rows(
    prompts: EncodedPrompts,
    completions: Sequence[Sequence[Sequence[int]]],
    *,
    pad_token_id: int,
    dropped_ids: Sequence[str] = (),
    label_masks: Sequence[Sequence[Sequence[bool]]] | None = None,
) -> SequenceBatch:
    """The naive layout: one right-padded row per (prompt, completion), vision repeated per row.

    ``label_masks[i][j][t]`` (optional, shaped like ``completions``) says whether token ``t`` of
    completion ``j`` of prompt ``i`` carries a label; by default every completion token does. A
    multi-turn conversation uses it to leave the user turns between assistant turns unlabelled.
    """
    order: list[tuple[int, int]] = [(i, j) for i, group in enumerate(completions) for j in range(len(group))]
    if len(completions) != len(prompts):
        raise ValueError(f"{len(completions)} completion groups for {len(prompts)} prompts")
    width = max((len(prompts.input_ids[i]) + len(completions[i][j]) for i, j in order), default=0)
    n = len(order)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    per_token = {k: torch.zeros((n, width), dtype=torch.long) for k in prompts.token_fields}
    for r, (i, j) in enumerate(order):
        p, c = prompts.input_ids[i], completions[i][j]
        input_ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        input_ids[r, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[r, : len(p) + len(c)] = 1
        target = torch.tensor(c, dtype=torch.long)
        if label_masks is not None:
            target[~torch.tensor(label_masks[i][j], dtype=torch.bool)] = IGNORE_INDEX
        labels[r, len(p) : len(p) + len(c)] = target
        for k, rows in prompts.token_fields.items():
            per_token[k][r, : len(p)] = torch.tensor(rows[i], dtype=torch.long)
            per_token[k][r, len(p) : len(p) + len(c)] = prompts.completion_fields.get(k, 0)
    row_prompt = [i for i, _ in order]
    placements = [(r, i, 0, len(prompts.input_ids[i]) + len(completions[i][j])) for r, (i, j) in enumerate(order)]
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention,
        labels=labels,
        vision={**_spread(prompts.vision_for(row_prompt), prompts, placements, input_ids.shape), **per_token},
        prompt_lengths=torch.tensor([len(prompts.input_ids[i]) for i, _ in order], dtype=torch.long),
        completion_lengths=torch.tensor([len(completions[i][j]) for i, j in order], dtype=torch.long),
        row_prompt=torch.tensor(row_prompt, dtype=torch.long),
        row_completion=torch.tensor([j for _, j in order], dtype=torch.long),
        sample_ids=[prompts.sample_ids[i] for i in row_prompt],
        dropped_ids=list(dropped_ids),
    )


def _spread(
    vision: dict[str, Tensor], prompts: EncodedPrompts, placements: list[tuple[int, int, int, int]], shape: Any
) -> dict[str, Tensor]:
    """``vision`` with its :data:`TOKEN_SPAN_KEYS` tensors laid out for rows of ``shape``."""
    spread = {k: spread_along_tokens(prompts, k, placements, tuple(shape)) for k in TOKEN_SPAN_KEYS if k in vision}
    return {**vision, **spread}


def build_prompt_rows(
    prompts: EncodedPrompts, *, pad_token_id: int, dropped_ids: Sequence[str] = ()
) -> GenerationBatch:
    """Prompts alone, left-padded (generation appends on the right)."""
    n = len(prompts)
    width = max(prompts.lengths, default=0)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    per_token = {k: torch.zeros((n, width), dtype=torch.long) for k in prompts.token_fields}
    for r, p in enumerate(prompts.input_ids):
        start = width - len(p)
        input_ids[r, start:] = torch.tensor(p, dtype=torch.long)
        attention[r, start:] = 1
        for k, rows in prompts.token_fields.items():
            per_token[k][r, start:] = torch.tensor(rows[r], dtype=torch.long)
    placements = [(r, r, width - len(p), width) for r, p in enumerate(prompts.input_ids)]
    return GenerationBatch(
        input_ids=input_ids,
        attention_mask=attention,
        vision={**_spread(prompts.vision_for(range(n)), prompts, placements, input_ids.shape), **per_token},
        prompt_lengths=torch.tensor(prompts.lengths, dtype=torch.long),
        sample_ids=list(prompts.sample_ids),
        dropped_ids=list(dropped_ids),
    )
