"""Prefix sharing through the model's cache: each prompt runs once, its completions continue from its cache.

The packed layout (:mod:`vlalign.models.packing`) shares a prompt between its completions with a
block attention mask. A layer that is not attention cannot take such a mask: a linear-attention
layer (Qwen3.5's gated delta net, Mamba) carries a recurrent state along the row, so in a packed
row completion 2 would start from the state completion 1 left. What a prompt leaves behind for
the tokens after it is exactly what the model's cache holds (keys and values of attention layers,
the recurrent and convolution states of linear-attention layers, cross-attention keys and values),
so this path shares the prompt through the cache:

1. **prompt pass**: the prompts, left-padded, all but their last token, ``use_cache=True``, the
   images with them (each image through the vision tower once per prompt); gradients are kept
   through the cache tensors;
2. **expand**: the cache's batch rows are repeated to one per completion
   (``cache.reorder_cache``: an index select, so the k copies' gradients add up in the prompt's);
3. **completion pass**: rows ``[last prompt token | completion]``, right-padded, continuing from
   the cache (2-D attention mask over cache and row, positions after the prompt's). This is an
   ordinary forward: :mod:`vlalign.models.logprobs` scores it as it scores the naive rows (its
   last prompt token predicts each completion's first token, so nothing of the prompt pass's
   logits is needed).

Left padding keeps the recurrent state exact: the library's linear-attention layers zero the
inputs at padded positions, so a zero state stays zero until the first real token, and a short
convolution sees zeros before it, as at the start of a row.

**Autograd and in-place caches.** The library's cache layers update their states in place
(``copy_``, to keep static addresses for CUDA graphs); in the completion pass a linear-attention
layer reads its recurrent state (autograd saves it for the backward) and then overwrites it with
the new one, which autograd refuses at backward time. The completion pass therefore runs under
:func:`keep_cache_copies`: a saved-tensor hook that stores a copy of any tensor saved for backward
that shares storage with a cache state (small: one ``(heads, d_k, d_v)`` state per row and layer);
every other saved tensor is kept as is.

An architecture takes this path when its :class:`~vlalign.models.arch.ArchSupport` says
``cache_sharing=True``; :func:`cache_sharing_problem` says when a batch cannot (a prompt of one
token). Use: :func:`prompt_cache_inputs` returns the completion pass's layout and keyword
arguments; ``model(**inputs, logits_to_keep=layout.keep)`` under :func:`keep_cache_copies` is the
forward to score.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from vlalign.data.batch import TOKEN_SPAN_KEYS, EncodedPrompts, build_prompt_rows, build_rows
from vlalign.data.collate import PER_TOKEN_KEYS
from vlalign.models.arch import cache_of, left_padded_positions, position_base
from vlalign.models.load import checkpointing_enabled
from vlalign.models.moe import router_logits_off
from vlalign.models.packing import Completions, Layout, naive_layout


@dataclass
class CachedRows:
    """The completion pass of the cache path: its rows, its forward's arguments, and the prompt pass's tokens."""

    layout: Layout
    """Gather indices over the completion rows ``[last prompt token | completion]`` (naive-like);
    ``num_tokens`` counts both passes' real tokens."""
    inputs: dict[str, Any]
    """Keyword arguments of the completion pass's forward (the expanded ``cache`` among them)."""
    prompt_mask: Tensor  # (B, P - 1) long: real tokens of the prompt pass (left-padded)
    completion_mask: Tensor  # (R, 1 + L) long: real tokens of the completion pass


def cache_sharing_problem(model: nn.Module, prompts: EncodedPrompts) -> str | None:
    """Why this batch cannot share its prompts through the cache (None when it can).

    Gradient checkpointing: the library's checkpointed layers drop the cache while training (a
    replayed layer would write it twice), so the completions would not see their prompt.
    """
    if model.training and torch.is_grad_enabled() and checkpointing_enabled(model):
        return (
            "prompts are shared through the model's cache, which gradient-checkpointed layers drop while training; "
            "computing log-probs the naive way"
        )
    if any(length < 2 for length in prompts.lengths):
        return "a prompt of fewer than 2 tokens leaves nothing to cache; computing log-probs the naive way"
    return None


def _last_tokens(prompts: EncodedPrompts) -> EncodedPrompts:
    """Each prompt's last token alone (no images): the prompt part of a completion row."""
    n = len(prompts)
    return replace(
        prompts,
        input_ids=[ids[-1:] for ids in prompts.input_ids],
        token_fields={k: [row[-1:] for row in rows] for k, rows in prompts.token_fields.items()},
        vision={},
        vision_rows={},
        num_images=[0] * n,
        image_token_count=[0] * n,
    )


def prompt_cache_inputs(
    model: nn.Module, prompts: EncodedPrompts, completions: Completions, *, pad_token_id: int, device: torch.device
) -> CachedRows:
    """Run the prompt pass and expand its cache; the completion pass's layout and forward arguments.

    Gradients flow from the completion pass into the prompt pass through the cache. The prompt
    pass computes the LM head at one position per prompt (its logits are not used).
    """
    dtype = next(model.parameters()).dtype
    full = build_prompt_rows(prompts, pad_token_id=pad_token_id)  # left-padded: column -1 is each last token
    vision = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in full.vision.items()}
    per_token = set(PER_TOKEN_KEYS) | set(TOKEN_SPAN_KEYS)
    head = {k: (v[:, :-1] if k in per_token else v) for k, v in vision.items()}
    ids, mask = full.input_ids[:, :-1].to(device), full.attention_mask[:, :-1].to(device)
    positions, deltas = left_padded_positions(model, ids, mask, head)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **head,
        **router_logits_off(model),
    )
    rows = build_rows(_last_tokens(prompts), completions, pad_token_id=pad_token_id)
    layout = naive_layout(rows)
    index = rows.row_prompt.to(device)
    cache = cache_of(out)
    cache.reorder_cache(index)
    row_mask = rows.attention_mask.to(device)
    steps = torch.arange(row_mask.shape[1], device=device)[None, :]
    start = mask.sum(-1)[index][:, None]  # (R, 1): the last prompt token's index in its own row
    if deltas is None:
        pos: Tensor = start + steps + position_base(model)
    else:
        pos = (start + steps + deltas.to(device)[index]).unsqueeze(0).expand(3, -1, -1)  # (3, R, 1 + L)
    inputs: dict[str, Any] = {
        "input_ids": rows.input_ids.to(device),
        "attention_mask": torch.cat([mask[index], row_mask], dim=1),
        "position_ids": pos,
        "cache": cache,
        **{
            k: vision[k][:, -1:][index].expand(-1, row_mask.shape[1], *vision[k].shape[2:])
            for k in TOKEN_SPAN_KEYS
            if k in vision
        },
    }
    layout = replace(layout, num_tokens=layout.num_tokens + int(mask.sum()))
    return CachedRows(layout=layout, inputs=inputs, prompt_mask=mask, completion_mask=row_mask)


def cache_states(cache: Any) -> list[Tensor]:
    """The tensors a cache holds (keys, values, convolution and recurrent states), layer by layer."""
    found: list[Tensor] = []
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            value = getattr(layer, name, None)
            if isinstance(value, Tensor):
                found.append(value)
        for name in ("conv_states", "recurrent_states"):
            states = getattr(layer, name, None)
            if isinstance(states, dict):
                found.extend(v for v in states.values() if isinstance(v, Tensor))
    return found


@contextmanager
def keep_cache_copies(cache: Any) -> Iterator[None]:
    """Autograd keeps its own copy of any saved tensor sharing storage with one of ``cache``'s states.

    The cache layers overwrite their states in place during the forward; a copy taken when the
    tensor is saved is what the backward needs (module doc). ``cache`` None: nothing changes.
    """
    if cache is None:
        yield
        return
    storages = {t.untyped_storage().data_ptr() for t in cache_states(cache) if t.numel()}

    def pack(tensor: Tensor) -> Tensor:
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            return tensor.clone()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield
