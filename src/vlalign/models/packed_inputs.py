"""The forward's keyword arguments for packed rows (one row per prompt, its completions after it).

:func:`shared_inputs` turns a :class:`~vlalign.models.packing.PackedRows` into what the model's
ordinary forward takes: input ids, the attention mask in the form the language model's attention
implementation needs (a boolean mask for sdpa, an additive float mask for eager, a FlexAttention
``BlockMask`` for flex_attention; a ``{"full_attention", "sliding_attention"}`` pair for
sliding-window layers), positions (3-row multimodal RoPE positions for the Qwen2-VL family, from
the model's own ``get_rope_index`` for the prompts: :func:`prompt_mrope`), and each prompt's
vision inputs once. :func:`sliding_window_problem` says when a batch cannot be packed for an
architecture whose forward takes one mask for all layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlalign.data.collate import TOKEN_SPAN_KEYS, EncodedPrompts, spread_along_tokens
from vlalign.models.arch import ARCHITECTURES, ArchSupport, attention_implementation, position_base, text_config, unwrap
from vlalign.models.packing import (
    PAD_SEGMENT,
    PROMPT_SEGMENT,
    PackedRows,
    additive_mask,
    block_attention_mask,
    flex_block_mask,
    image_blocks,
    mrope_positions,
)


def prompt_mrope(model: nn.Module, prompts: EncodedPrompts) -> list[Tensor]:
    """Each prompt's 3-row positions, ``(3, P_b)``, from the model's own ``get_rope_index``."""
    base = unwrap(model).model
    n, width = len(prompts), max(prompts.lengths)
    ids = torch.zeros((n, width), dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    types = torch.zeros((n, width), dtype=torch.long)
    type_rows = prompts.token_fields.get("mm_token_type_ids")
    for b, row in enumerate(prompts.input_ids):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attn[b, : len(row)] = 1
        if type_rows is not None:
            types[b, : len(row)] = torch.tensor(type_rows[b], dtype=torch.long)
    device = next(model.parameters()).device
    grid = prompts.vision.get("image_grid_thw")
    videos = {k: prompts.vision[k].to(device) for k in ("video_grid_thw", "second_per_grid_ts") if k in prompts.vision}
    with torch.no_grad():
        positions, _ = base.get_rope_index(
            ids.to(device),
            mm_token_type_ids=types.to(device),
            image_grid_thw=grid.to(device) if grid is not None else None,
            attention_mask=attn.to(device),
            **videos,
        )
    return [positions[:, b, : len(row)].cpu() for b, row in enumerate(prompts.input_ids)]


def shared_inputs(
    model: nn.Module, prompts: EncodedPrompts, packed: PackedRows, device: torch.device
) -> dict[str, Any]:
    """Keyword arguments of the model's forward for the packed rows."""
    support = ARCHITECTURES[unwrap(model).config.model_type]
    text = text_config(model)
    attn = attention_implementation(model)
    blocks = _bidirectional_blocks(support, text, packed)
    window = getattr(text, "sliding_window", None)
    sliding = window is not None and "sliding_attention" in (getattr(text, "layer_types", None) or ())
    segments, positions = packed.segments.to(device), packed.positions.to(device)
    blocks = blocks.to(device) if blocks is not None else None
    samples = packed.samples.to(device) if len(packed.prompt_rows) > segments.shape[0] else None  # several per row

    def build(window_: int | None, blocks: Tensor | None = blocks) -> Any:
        kw = {"samples": samples, "positions": positions, "blocks": blocks, "sliding_window": window_}
        if attn == "flex_attention":
            return flex_block_mask(segments, **kw)
        visible = block_attention_mask(segments, **kw)
        return visible if attn == "sdpa" else additive_mask(visible, unwrap(model).get_input_embeddings().weight.dtype)

    mask: Any = build(None, None if support.bidirectional_sliding_only else blocks)
    if sliding and support.dict_masks:  # otherwise the window covers every row (sliding_window_problem)
        mask = {"full_attention": mask, "sliding_attention": build(int(window))}
    if support.mrope:
        position_ids = mrope_positions(prompt_mrope(model, prompts), packed)
    else:
        position_ids = packed.positions + position_base(model)
    return {
        "input_ids": packed.layout.input_ids.to(device),
        "attention_mask": mask,
        "position_ids": position_ids.to(device),
        **{k: v.to(device) for k, v in prompts.vision.items()},
        **{k: v.to(device) for k, v in packed.token_fields.items()},
        **{k: v.to(device) for k, v in _token_spans(prompts, packed).items()},
    }


def _bidirectional_blocks(support: ArchSupport, text: Any, packed: PackedRows) -> Tensor | None:
    """Ids of the blocks whose tokens see each other in both directions (-1 elsewhere), or None.

    The whole prompt for a prefix-LM (PaliGemma); else the runs of image tokens, when the
    architecture has them and its text config switches them on (Gemma 4: only with
    ``use_bidirectional_attention="vision"``).
    """
    if support.bidirectional_prompt:
        return torch.where(packed.segments == PROMPT_SEGMENT, 0, -1)
    key = support.bidirectional_images
    if not key or key not in packed.token_fields:
        return None
    if support.bidirectional_when is not None:
        name, value = support.bidirectional_when
        if getattr(text, name, None) != value:
            return None
    return image_blocks(packed.token_fields[key])


def _token_spans(prompts: EncodedPrompts, packed: PackedRows) -> dict[str, Tensor]:
    """Per-token vision tensors (Mllama's cross-attention mask) for the packed rows: each prompt's own, and
    its last token's entry on every completion after it, as in the completion's naive row."""
    ends = (packed.segments != PAD_SEGMENT).sum(-1).tolist()
    spans = [(b, b, 0, int(end)) for b, end in enumerate(ends)]
    shape = tuple(packed.segments.shape)
    return {k: spread_along_tokens(prompts, k, spans, shape) for k in TOKEN_SPAN_KEYS if k in prompts.vision}


PACKABLE = frozenset({"qwen2_vl", "qwen2_5_vl", "llava", "idefics3", "gemma3"})
"""``config.model_type`` of the architectures verified with several prompts in one row
(``tests/models/test_packing_across_samples.py``)."""


def packing_problem(model: nn.Module, prompts: EncodedPrompts) -> str | None:
    """Why several prompts cannot share a row for this model (None if they can)."""
    model_type = unwrap(model).config.model_type
    if model_type not in PACKABLE:
        return f"{model_type}: packing several prompts per row is not verified; one prompt per row"
    if any(k in prompts.vision for k in TOKEN_SPAN_KEYS):
        return f"{model_type}: per-token vision inputs cannot be packed across prompts; one prompt per row"
    return None


def sliding_window_problem(model: nn.Module, packed: PackedRows) -> str | None:
    """Why the packed layout cannot express this batch's sliding-window layers (None if it can)."""
    text = text_config(model)
    window = getattr(text, "sliding_window", None)
    if window is None or "sliding_attention" not in (getattr(text, "layer_types", None) or ()):
        return None
    if ARCHITECTURES[unwrap(model).config.model_type].dict_masks:
        return None
    if int(packed.positions.max()) + 1 <= int(window):
        return None  # the window covers every sequence: the full mask is the sliding mask
    return (
        f"{unwrap(model).config.model_type} has sliding-window layers and its forward takes one mask for all "
        "layers; sequences longer than the window are computed the naive way"
    )
