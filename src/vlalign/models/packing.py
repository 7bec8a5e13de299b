"""Row layouts for completion log-probs: the packed prefix-sharing layout and the naive one.

Pure layout code (token ids, segment ids, positions, attention masks); no model is run here.
:mod:`vlalign.models.logprobs` turns a layout into one ordinary forward of the model.

**Packed layout** (one row per prompt)::

    row b:   [ prompt (P tokens) | c_1 (L_1) | c_2 (L_2) | ... | c_k (L_k) | padding ]
    segment:   0 0 ... 0           1 ... 1     2 ... 2          k ... k     -1 ... -1
    position:  0 1 ... P-1         P ... P+L_1-1  P ... P+L_2-1  ...        0 ... 0

Query ``q`` may attend key ``kv`` when ``kv <= q`` and the key is a prompt token or in the
query's own completion (:func:`block_attention_mask`); so completion ``j`` sees exactly what it
would see in a row of its own, at the same positions, and every prompt token (and image) is
processed once. The last prompt token predicts the first token of every completion (k labels on
one position); the other completion tokens are predicted by the token before them.

Three extra rules keep it exact (each was silently wrong when missing; the traps are listed in
``docs/notes/prefix-sharing.md`` and each rule is tested in ``tests/models/test_logprobs.py``):

- Padding positions attend to themselves: a query with no visible key gives NaN under an
  additive ``-inf`` mask, and NaN reaches every weight gradient.
- Models with multimodal RoPE (Qwen2-VL, Qwen2.5-VL) take 3-row positions: the prompt's come from
  the model's ``get_rope_index``; every completion restarts at ``max(prompt positions) + 1`` on
  all three rows (:func:`mrope_positions`).
- Architectures whose image tokens attend to each other bidirectionally (Gemma3) mark image
  blocks (``image_blocks``), and sliding-window layers get their own mask, the window measured in
  logical positions (which equal the indices of the naive row).

**Naive layout**: one row per (prompt, completion), the image repeated, built by
:func:`vlalign.data.collate.build_rows`; :func:`naive_layout` only adds the gather indices.

:func:`concat_prompts` joins two prompt batches (mDPO's corrupted-image prompts after the
originals) so that both run in one forward.

Both layouts give the same gather indices: ``keep (rows, K)`` are the positions whose logits the
model computes (``logits_to_keep``), and ``source (R, L)`` indexes the flattened kept logits for
the ``t``-th token of completion ``r``, so the per-token outputs have one layout in both modes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlalign.data.collate import IGNORE_INDEX, EncodedPrompts, SequenceBatch

PROMPT_SEGMENT = 0
PAD_SEGMENT = -1

Completions = Sequence[Sequence[Sequence[int]]]
"""Token ids of k completions per prompt: ``completions[i][j]`` is completion j of prompt i."""


@dataclass
class Layout:
    """Where each completion token sits in the model's rows, and which logits predict it.

    ``R`` completions in flat order (prompt 0's completions first), ``L`` the longest completion,
    ``rows`` the model's batch rows, ``T`` its row width, ``K`` the kept positions per row.
    """

    input_ids: Tensor  # (rows, T) long
    keep: Tensor  # (rows, K) long: positions whose logits are computed, per row
    source: Tensor  # (R, L) long: index into the flattened (rows * K) kept logits
    predictor: Tensor  # (R, L) long: flat index into (rows * T) of the position predicting each token
    target: Tensor  # (R, L) long: flat index into (rows * T) of each completion token
    last: Tensor  # (R,) long: flat index into (rows * T) of each completion's last token
    mask: Tensor  # (R, L) bool: real completion tokens
    row_prompt: Tensor  # (R,) long: prompt of each completion
    row_completion: Tensor  # (R,) long: index of the completion among its prompt's
    num_tokens: int
    """Non-padding tokens the language model processes."""

    @property
    def lengths(self) -> Tensor:  # (R,) long
        return self.mask.sum(-1)


def flat_order(completions: Completions) -> list[tuple[int, int]]:
    """``(prompt i, completion j)`` of every completion, prompt 0's first (the flat order ``R``)."""
    return [(i, j) for i, group in enumerate(completions) for j in range(len(group))]


def _completion_tensors(completions: Completions, order: list[tuple[int, int]]) -> tuple[Tensor, Tensor, int]:
    lengths = [len(completions[i][j]) for i, j in order]
    width = max(lengths, default=0)
    mask = torch.zeros((len(order), width), dtype=torch.bool)
    for r, n in enumerate(lengths):
        mask[r, :n] = True
    return mask, torch.tensor(lengths, dtype=torch.long), width


# ------------------------------------------------------------------------------------- packed


@dataclass
class PackedRows:
    """The packed batch: one row per prompt; ``layout`` says where each completion is."""

    layout: Layout
    segments: Tensor  # (B, T) long: 0 prompt, j + 1 completion j, -1 padding
    positions: Tensor  # (B, T) long: logical (1-D) positions; completions restart after the prompt
    token_fields: dict[str, Tensor]  # (B, T) long each: per-token processor outputs, 0 past the prompt
    prompt_lengths: Tensor  # (B,) long


def packed_layout(prompts: EncodedPrompts, completions: Completions, *, pad_token_id: int) -> PackedRows:
    """Lay out each prompt followed by all of its completions in one row (see the module doc)."""
    order = flat_order(completions)
    mask, lengths, width = _completion_tensors(completions, order)
    totals = [len(p) + sum(len(c) for c in group) for p, group in zip(prompts.input_ids, completions)]
    n_rows, seq = len(prompts), max(totals, default=0)
    input_ids = torch.full((n_rows, seq), pad_token_id, dtype=torch.long)
    segments = torch.full((n_rows, seq), PAD_SEGMENT, dtype=torch.long)
    positions = torch.zeros((n_rows, seq), dtype=torch.long)
    fields = {k: torch.zeros((n_rows, seq), dtype=torch.long) for k in prompts.token_fields}
    keep_width = max((t - len(p) for t, p in zip(totals, prompts.input_ids)), default=1)
    keep = torch.zeros((n_rows, keep_width), dtype=torch.long)
    source = torch.zeros((len(order), width), dtype=torch.long)
    predictor = torch.zeros((len(order), width), dtype=torch.long)
    target = torch.zeros((len(order), width), dtype=torch.long)
    last = torch.zeros(len(order), dtype=torch.long)
    r = 0
    for b, (prompt, group) in enumerate(zip(prompts.input_ids, completions)):
        n_prompt = len(prompt)
        input_ids[b, :n_prompt] = torch.tensor(prompt, dtype=torch.long)
        segments[b, :n_prompt] = PROMPT_SEGMENT
        positions[b, :n_prompt] = torch.arange(n_prompt)
        for key, rows in prompts.token_fields.items():
            fields[key][b, :n_prompt] = torch.tensor(rows[b], dtype=torch.long)
        # kept logits of row b: positions [P - 1, P - 1 + keep_width), clamped inside the row
        keep[b] = torch.clamp(torch.arange(n_prompt - 1, n_prompt - 1 + keep_width), max=max(seq - 1, 0))
        start = n_prompt
        for j, tokens in enumerate(group):
            n = len(tokens)
            predictor[r] = target[r] = b * seq + n_prompt - 1  # padding entries: the last prompt token
            span = torch.arange(start, start + n)
            input_ids[b, span] = torch.tensor(tokens, dtype=torch.long)
            segments[b, span] = j + 1
            positions[b, span] = torch.arange(n_prompt, n_prompt + n)
            pred = torch.cat([torch.tensor([n_prompt - 1]), span[:-1]])  # (n,)
            source[r, :n] = b * keep_width + (pred - (n_prompt - 1))
            predictor[r, :n] = b * seq + pred
            target[r, :n] = b * seq + span
            last[r] = b * seq + start + n - 1
            start += n
            r += 1
    layout = Layout(
        input_ids=input_ids,
        keep=keep,
        source=source,
        predictor=predictor,
        target=target,
        last=last,
        mask=mask,
        row_prompt=torch.tensor([i for i, _ in order], dtype=torch.long),
        row_completion=torch.tensor([j for _, j in order], dtype=torch.long),
        num_tokens=sum(totals),
    )
    return PackedRows(
        layout=layout,
        segments=segments,
        positions=positions,
        token_fields=fields,
        prompt_lengths=torch.tensor(prompts.lengths, dtype=torch.long),
    )


def naive_layout(batch: SequenceBatch) -> Layout:
    """Gather indices for the naive rows of :func:`~vlalign.data.collate.build_rows`."""
    n_rows, seq = batch.input_ids.shape
    lengths = batch.completion_lengths
    width = int(lengths.max()) if n_rows else 0
    steps = torch.arange(width)
    mask = steps[None, :] < lengths[:, None]  # (R, L)
    start = batch.prompt_lengths[:, None]  # (R, 1)
    keep = torch.clamp(start - 1 + steps[None, :], max=max(seq - 1, 0))  # (R, L)
    row_base = (torch.arange(n_rows) * seq)[:, None]
    pred = torch.where(mask, start - 1 + steps[None, :], start - 1)
    tgt = torch.where(mask, start + steps[None, :], start - 1)
    source = torch.arange(n_rows)[:, None] * width + steps[None, :]
    return Layout(
        input_ids=batch.input_ids,
        keep=keep,
        source=source,
        predictor=row_base + pred,
        target=row_base + tgt,
        last=row_base[:, 0] + batch.prompt_lengths + lengths - 1,
        mask=mask,
        row_prompt=batch.row_prompt,
        row_completion=batch.row_completion,
        num_tokens=int(batch.attention_mask.sum()),
    )


def gather_tokens(input_ids: Tensor, layout: Layout) -> Tensor:
    """The token ids at each completion position, ``IGNORE_INDEX`` on padding: ``(R, L)``."""
    tokens = input_ids.reshape(-1)[layout.target]
    return torch.where(layout.mask, tokens, torch.full_like(tokens, IGNORE_INDEX))


def _zero_pad(tensor: Tensor, trailing: Sequence[int]) -> Tensor:
    """``tensor`` zero-padded at the end of every dimension but the first to ``trailing``."""
    if list(tensor.shape[1:]) == list(trailing):
        return tensor
    out = tensor.new_zeros((tensor.shape[0], *trailing))
    out[(slice(None), *(slice(0, n) for n in tensor.shape[1:]))] = tensor
    return out


def concat_prompts(first: EncodedPrompts, second: EncodedPrompts) -> EncodedPrompts:
    """``first``'s prompts followed by ``second``'s, as one batch (vision tensors concatenated).

    Per-prompt vision tensors with a different trailing shape (Idefics3's ``(B, max_images, ...)``)
    are zero-padded to the larger one, as the processor pads a batch.
    """
    vision: dict[str, Tensor] = {}
    rows: dict[str, list[slice]] = {}
    for key in first.vision:
        if key not in second.vision:
            raise ValueError(f"concat_prompts: the second batch has no {key!r}; encode both with the same processor")
        a, b = first.vision[key], second.vision[key]
        shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]
        vision[key] = torch.cat([_zero_pad(a, shape), _zero_pad(b, shape).to(a.dtype)], dim=0)
        shift = first.vision[key].shape[0]
        moved = [slice(s.start + shift, s.stop + shift) for s in second.vision_rows[key]]
        rows[key] = list(first.vision_rows[key]) + moved
    return EncodedPrompts(
        sample_ids=first.sample_ids + second.sample_ids,
        input_ids=first.input_ids + second.input_ids,
        token_fields={k: first.token_fields[k] + second.token_fields[k] for k in first.token_fields},
        vision=vision,
        vision_rows=rows,
        num_images=first.num_images + second.num_images,
        image_token_count=first.image_token_count + second.image_token_count,
    )


# -------------------------------------------------------------------------------------- masks


def image_blocks(token_type: Tensor) -> Tensor:
    """Id of each run of consecutive image tokens (``token_type == 1``) in a row, -1 elsewhere: ``(B, T)``."""
    is_image = token_type == 1
    before = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~before
    ids = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_image, ids, torch.full_like(ids, -1))


def block_attention_mask(
    segments: Tensor,
    *,
    positions: Tensor | None = None,
    blocks: Tensor | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Which keys each query may see in packed rows: ``(B, 1, T, T)`` bool, True = visible.

    ``kv <= q`` and (``kv`` in the prompt or in ``q``'s completion); padding queries see only
    themselves. ``blocks`` (image-block ids, -1 elsewhere) additionally opens each image block
    to itself in both directions; ``sliding_window`` keeps only keys with
    ``positions[q] - positions[kv] < sliding_window`` (logical distance, as in the naive row).
    """
    n = segments.shape[1]
    idx = torch.arange(n, device=segments.device)
    causal = (idx[:, None] >= idx[None, :])[None]  # (1, T, T)
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    real = (seg_q != PAD_SEGMENT) & (seg_k != PAD_SEGMENT)
    visible = causal & real & ((seg_k == PROMPT_SEGMENT) | (seg_k == seg_q))
    if blocks is not None:
        visible = visible | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    if sliding_window is not None:
        if positions is None:
            raise ValueError("block_attention_mask: a sliding window needs the positions")
        visible = visible & ((positions[:, :, None] - positions[:, None, :]) < sliding_window)
    eye = torch.eye(n, dtype=torch.bool, device=segments.device)[None]
    visible = visible | (eye & (seg_q == PAD_SEGMENT))
    return visible[:, None]


def additive_mask(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as the additive float mask eager attention needs (0 visible, dtype min hidden)."""
    zeros = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return zeros.masked_fill(~visible, torch.finfo(dtype).min)


def flex_mask_mod(
    segments: Tensor,
    *,
    positions: Tensor,
    blocks: Tensor | None = None,
    sliding_window: int | None = None,
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The visibility rule of :func:`block_attention_mask` as a FlexAttention ``mask_mod``."""
    blocks_ = blocks if blocks is not None else torch.full_like(segments, -1)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        seg_q, seg_k = segments[b, q], segments[b, kv]
        real = (seg_q != PAD_SEGMENT) & (seg_k != PAD_SEGMENT)
        ok = (kv <= q) & real & ((seg_k == PROMPT_SEGMENT) | (seg_k == seg_q))
        ok = ok | ((blocks_[b, q] == blocks_[b, kv]) & (blocks_[b, q] >= 0))
        if sliding_window is not None:
            ok = ok & ((positions[b, q] - positions[b, kv]) < sliding_window)
        return ok | ((q == kv) & (seg_q == PAD_SEGMENT))

    return mask_mod


def flex_block_mask(
    segments: Tensor,
    *,
    positions: Tensor,
    blocks: Tensor | None = None,
    sliding_window: int | None = None,
) -> Any:
    """The same visibility as :func:`block_attention_mask`, as a FlexAttention ``BlockMask``.

    Memory grows with the number of (128 x 128) tiles, not with ``T * T``; tiles that no query
    of a tile may see are skipped by the kernel (the siblings of a completion, for instance).
    """
    # local: FlexAttention is absent from torch 2.4 (pyproject allows it); only flex users need it
    from torch.nn.attention.flex_attention import create_block_mask

    n_rows, n = segments.shape
    mod = flex_mask_mod(segments, positions=positions, blocks=blocks, sliding_window=sliding_window)
    return create_block_mask(mod, n_rows, None, n, n, device=segments.device)


# ---------------------------------------------------------------------------------- positions


def mrope_positions(prompt_positions: Sequence[Tensor], packed: PackedRows) -> Tensor:
    """3-row positions of packed rows: each prompt's (``(3, P_b)``), completions from max + 1.

    ``prompt_positions[b]`` are the positions the model's ``get_rope_index`` gives prompt ``b``;
    completion tokens continue from ``max(prompt positions) + 1`` on all three rows, exactly as
    the text that follows a prompt does in a row of its own.
    """
    n_rows, seq = packed.segments.shape
    out = torch.zeros((3, n_rows, seq), dtype=torch.long)
    for b, pos in enumerate(prompt_positions):
        n_prompt = pos.shape[1]
        out[:, b, :n_prompt] = pos
        offset = pos.max() + 1 - n_prompt  # completion position = offset + logical position
        comp = packed.segments[b] > PROMPT_SEGMENT
        out[:, b, comp] = (packed.positions[b, comp] + offset)[None, :].expand(3, -1)
    return out
