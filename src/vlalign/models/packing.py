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

**Several prompts per row** (``pack_length``, :func:`pack_prompts`): consecutive prompts, each
followed by its completions, share a row while it stays within ``pack_length`` tokens::

    row:      [ p_0 | c_0,1 | c_0,2 | p_1 | c_1,1 | c_1,2 | padding ]
    samples:    0 0   0 0     0 0     1 1   1 1     1 1     -1 -1
    position:   0 ..  P_0 ..  P_0 ..  0 ..  P_1 ..  P_1 ..

``samples`` (the prompt of each token) joins the visibility rule: a key must be in the query's
own prompt, so each completion still sees exactly what it sees in a row of its own; positions
(mRoPE's too) restart at each prompt. Prompts keep their order, so the vision inputs stay in the
order the model matches them to image tokens.

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
    """The packed batch: one row per prompt, or several prompts per row (``pack_length``);
    ``layout`` says where each completion is."""

    layout: Layout
    segments: Tensor  # (B, T) long: 0 prompt, j + 1 completion j, -1 padding
    positions: Tensor  # (B, T) long: logical (1-D) positions; restart per prompt and after each prompt
    token_fields: dict[str, Tensor]  # (B, T) long each: per-token processor outputs, 0 past the prompt
    prompt_lengths: Tensor  # (N,) long: per prompt
    samples: Tensor  # (B, T) long: the prompt each token belongs to, -1 on padding
    prompt_rows: Tensor  # (N,) long: the row of each prompt
    prompt_starts: Tensor  # (N,) long: where each prompt starts in its row


def pack_prompts(totals: Sequence[int], pack_length: int | None) -> list[list[int]]:
    """Consecutive prompts grouped into rows: ``totals[i]`` tokens of prompt i with its completions.

    ``None``: one prompt per row. Otherwise prompts are added to a row, in order, while its total
    stays within ``pack_length``; a prompt longer than that alone gets a row of its own. Keeping
    the order keeps each prompt's vision inputs in the order the model matches them to image
    tokens (row by row, left to right).
    """
    if pack_length is None:
        return [[i] for i in range(len(totals))]
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(totals):
        if rows and used + n <= pack_length:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return rows


def useful_token_counts(
    prompt_lengths: Sequence[int], completions: Completions, pack_length: int | None = None
) -> tuple[int, int]:
    """``(tokens, slots)`` of :func:`packed_layout`'s rows for these prompts, without building them.

    ``tokens`` = every prompt once plus its completions; ``slots`` = rows x row width. Their
    ratio is the useful-token fraction (1 = no padding).
    """
    totals = [n + sum(len(c) for c in group) for n, group in zip(prompt_lengths, completions)]
    groups = pack_prompts(totals, pack_length)
    return sum(totals), len(groups) * max((sum(totals[i] for i in g) for g in groups), default=0)


@dataclass
class TokenSlots:
    """Tokens that forwards processed and the slots of their rows, summed over the forwards added
    (``CompletionLogprobs.num_tokens`` and ``num_slots``); ``tokens / slots`` is their useful-token
    fraction (1: no padding)."""

    tokens: int = 0
    slots: int = 0

    def add(self, num_tokens: int, num_slots: int) -> None:
        self.tokens += num_tokens
        self.slots += num_slots

    def fraction(self) -> float | None:
        """``tokens / slots`` (None when nothing was counted)."""
        return self.tokens / self.slots if self.slots else None


@dataclass
class _Rows:
    """The tensors :func:`packed_layout` fills."""

    input_ids: Tensor
    segments: Tensor
    positions: Tensor
    samples: Tensor
    fields: dict[str, Tensor]
    keep: Tensor
    source: Tensor
    predictor: Tensor
    target: Tensor
    last: Tensor


def _place(out: _Rows, b: int, start: int, kept: int, i: int, prompt: Sequence[int], group: Any, r: int) -> int:
    """Prompt ``i`` and its completions at ``start`` of row ``b``, its kept logits from ``kept``; the next flat index."""
    seq, keep_width = out.input_ids.shape[1], out.keep.shape[1]
    n_prompt = len(prompt)
    end = start + n_prompt
    out.input_ids[b, start:end] = torch.tensor(prompt, dtype=torch.long)
    out.segments[b, start:end] = PROMPT_SEGMENT
    out.positions[b, start:end] = torch.arange(n_prompt)
    out.samples[b, start : end + sum(len(c) for c in group)] = i
    first = start + n_prompt - 1  # the last prompt token: the first kept position of this prompt
    for j, tokens in enumerate(group):
        n = len(tokens)
        out.predictor[r] = out.target[r] = b * seq + first  # padding entries: the last prompt token
        span = torch.arange(end, end + n)
        out.input_ids[b, span] = torch.tensor(tokens, dtype=torch.long)
        out.segments[b, span] = j + 1
        out.positions[b, span] = torch.arange(n_prompt, n_prompt + n)
        pred = torch.cat([torch.tensor([first]), span[:-1]])  # (n,)
        out.source[r, :n] = b * keep_width + kept + (pred - first)
        out.predictor[r, :n] = b * seq + pred
        out.target[r, :n] = b * seq + span
        out.last[r] = b * seq + end + n - 1
        end += n
        r += 1
    return r


def packed_layout(
    prompts: EncodedPrompts, completions: Completions, *, pad_token_id: int, pack_length: int | None = None
) -> PackedRows:
    """Lay out each prompt followed by all of its completions (see the module doc).

    ``pack_length``: put consecutive prompts (each with its completions) in one row while the row
    stays within that many tokens (:func:`pack_prompts`); the ``samples`` ids keep them apart in
    the attention masks and positions restart at 0 for each prompt. None: one prompt per row.
    """
    order = flat_order(completions)
    mask, _, width = _completion_tensors(completions, order)
    n_prompts = [len(p) for p in prompts.input_ids]
    totals = [n + sum(len(c) for c in group) for n, group in zip(n_prompts, completions)]
    groups = pack_prompts(totals, pack_length)
    n_rows, seq = len(groups), max((sum(totals[i] for i in g) for g in groups), default=0)
    keep_width = max((sum(totals[i] - n_prompts[i] for i in g) for g in groups), default=1)
    out = _Rows(
        input_ids=torch.full((n_rows, seq), pad_token_id, dtype=torch.long),
        segments=torch.full((n_rows, seq), PAD_SEGMENT, dtype=torch.long),
        positions=torch.zeros((n_rows, seq), dtype=torch.long),
        samples=torch.full((n_rows, seq), PAD_SEGMENT, dtype=torch.long),
        fields={k: torch.zeros((n_rows, seq), dtype=torch.long) for k in prompts.token_fields},
        keep=torch.zeros((n_rows, keep_width), dtype=torch.long),
        source=torch.zeros((len(order), width), dtype=torch.long),
        predictor=torch.zeros((len(order), width), dtype=torch.long),
        target=torch.zeros((len(order), width), dtype=torch.long),
        last=torch.zeros(len(order), dtype=torch.long),
    )
    rows, starts = torch.zeros(len(totals), dtype=torch.long), torch.zeros(len(totals), dtype=torch.long)
    r = 0
    for b, group_ids in enumerate(groups):
        start = kept = nxt = 0
        pieces = []
        for i in group_ids:
            rows[i], starts[i] = b, start
            for key, values in prompts.token_fields.items():
                out.fields[key][b, start : start + n_prompts[i]] = torch.tensor(values[i], dtype=torch.long)
            r = _place(out, b, start, kept, i, prompts.input_ids[i], completions[i], r)
            n_kept = totals[i] - n_prompts[i]
            nxt = start + n_prompts[i] - 1 + n_kept
            pieces.append(torch.arange(nxt - n_kept, nxt))
            start, kept = start + totals[i], kept + n_kept
        # unused kept entries continue after the last prompt's, clamped inside the row
        pieces.append(torch.arange(nxt, nxt + keep_width - kept))
        out.keep[b] = torch.clamp(torch.cat(pieces), max=max(seq - 1, 0))
    layout = Layout(
        input_ids=out.input_ids,
        keep=out.keep,
        source=out.source,
        predictor=out.predictor,
        target=out.target,
        last=out.last,
        mask=mask,
        row_prompt=torch.tensor([i for i, _ in order], dtype=torch.long),
        row_completion=torch.tensor([j for _, j in order], dtype=torch.long),
        num_tokens=sum(totals),
    )
    return PackedRows(
        layout=layout,
        segments=out.segments,
        positions=out.positions,
        token_fields=out.fields,
        prompt_lengths=torch.tensor(prompts.lengths, dtype=torch.long),
        samples=out.samples,
        prompt_rows=rows,
        prompt_starts=starts,
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
        completion_fields={**second.completion_fields, **first.completion_fields},
        num_videos=(first.num_videos or [0] * len(first)) + (second.num_videos or [0] * len(second))
        if first.num_videos or second.num_videos
        else [],
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
    samples: Tensor | None = None,
    positions: Tensor | None = None,
    blocks: Tensor | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Which keys each query may see in packed rows: ``(B, 1, T, T)`` bool, True = visible.

    ``kv <= q`` and (``kv`` in the prompt or in ``q``'s completion); padding queries see only
    themselves. ``blocks`` (image-block ids, -1 elsewhere) additionally opens each image block
    to itself in both directions; ``sliding_window`` keeps only keys with
    ``positions[q] - positions[kv] < sliding_window`` (logical distance, as in the naive row).
    ``samples`` (the prompt of each token, for rows that hold several) keeps every key in the
    query's own prompt.
    """
    n = segments.shape[1]
    idx = torch.arange(n, device=segments.device)
    causal = (idx[:, None] >= idx[None, :])[None]  # (1, T, T)
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    real = (seg_q != PAD_SEGMENT) & (seg_k != PAD_SEGMENT)
    visible = causal & real & ((seg_k == PROMPT_SEGMENT) | (seg_k == seg_q))
    if samples is not None:
        visible = visible & (samples[:, :, None] == samples[:, None, :])
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
    samples: Tensor | None = None,
    positions: Tensor,
    blocks: Tensor | None = None,
    sliding_window: int | None = None,
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The visibility rule of :func:`block_attention_mask` as a FlexAttention ``mask_mod``."""
    blocks_ = blocks if blocks is not None else torch.full_like(segments, -1)
    samples_ = samples if samples is not None else torch.zeros_like(segments)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        seg_q, seg_k = segments[b, q], segments[b, kv]
        real = (seg_q != PAD_SEGMENT) & (seg_k != PAD_SEGMENT)
        ok = (kv <= q) & real & ((seg_k == PROMPT_SEGMENT) | (seg_k == seg_q)) & (samples_[b, q] == samples_[b, kv])
        ok = ok | ((blocks_[b, q] == blocks_[b, kv]) & (blocks_[b, q] >= 0))
        if sliding_window is not None:
            ok = ok & ((positions[b, q] - positions[b, kv]) < sliding_window)
        return ok | ((q == kv) & (seg_q == PAD_SEGMENT))

    return mask_mod


def flex_block_mask(
    segments: Tensor,
    *,
    samples: Tensor | None = None,
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
    mod = flex_mask_mod(segments, samples=samples, positions=positions, blocks=blocks, sliding_window=sliding_window)
    return create_block_mask(mod, n_rows, None, n, n, device=segments.device)


# ---------------------------------------------------------------------------------- positions


def mrope_positions(prompt_positions: Sequence[Tensor], packed: PackedRows) -> Tensor:
    """3-row positions of packed rows: each prompt's (``(3, P_i)``), its completions from max + 1.

    ``prompt_positions[i]`` are the positions the model's ``get_rope_index`` gives prompt ``i``
    alone; completion tokens continue from ``max(prompt positions) + 1`` on all three rows,
    exactly as the text that follows a prompt does in a row of its own. Several prompts in one
    row each get their own (starting at 0 again).
    """
    n_rows, seq = packed.segments.shape
    out = torch.zeros((3, n_rows, seq), dtype=torch.long)
    for i, pos in enumerate(prompt_positions):
        b, start, n_prompt = int(packed.prompt_rows[i]), int(packed.prompt_starts[i]), pos.shape[1]
        out[:, b, start : start + n_prompt] = pos
        offset = pos.max() + 1 - n_prompt  # completion position = offset + logical position
        comp = (packed.samples[b] == i) & (packed.segments[b] > PROMPT_SEGMENT)
        out[:, b, comp] = (packed.positions[b, comp] + offset)[None, :].expand(3, -1)
    return out
