"""Checks of a log-prob call's inputs, made before any forward (each failure names the sample).

:func:`check_inputs` requires one completion group per prompt, no empty prompt or completion,
prompt + longest completion within ``max_length`` (never truncated: truncation could cut through
image tokens), and each prompt's image tokens matching its own images, not just the batch's total
(the model checks only the total). Failures are :class:`~vlalign.data.schema.DataError`, or
``ValueError`` for a call with the wrong number of groups.
"""

from __future__ import annotations

from torch import nn

from vlalign.data.collate import EncodedPrompts
from vlalign.data.schema import DataError
from vlalign.models.arch import image_token_id, unwrap
from vlalign.models.packing import Completions


def check_inputs(model: nn.Module, prompts: EncodedPrompts, completions: Completions, max_length: int | None) -> None:
    """Raise if the call cannot be scored exactly as given (see the module doc)."""
    if len(completions) != len(prompts):
        raise ValueError(f"{len(completions)} completion groups for {len(prompts)} prompts; give one group per prompt")
    for i, group in enumerate(completions):
        for j, tokens in enumerate(group):
            if len(tokens) == 0:
                raise DataError(f"sample {prompts.sample_ids[i]!r}: completion {j} is empty (no tokens)")
        if len(prompts.input_ids[i]) == 0:
            raise DataError(f"sample {prompts.sample_ids[i]!r}: empty prompt")
        if max_length is not None:
            _check_length(prompts, i, max((len(c) for c in group), default=0), max_length)
    _check_image_tokens(model, prompts)


def _check_length(prompts: EncodedPrompts, i: int, longest: int, max_length: int) -> None:
    n_prompt = len(prompts.input_ids[i])
    if n_prompt + longest <= max_length:
        return
    what = (
        f"its prompt alone has {n_prompt} tokens"
        if n_prompt >= max_length
        else f"prompt + longest completion have {n_prompt + longest} tokens"
    )
    raise DataError(
        f"sample {prompts.sample_ids[i]!r}: {what} (prompt {n_prompt}, of which {prompts.image_token_count[i]} image "
        f"tokens; longest completion {longest}), more than max_length {max_length}; raise max_length or drop the "
        "sample (vlalign never truncates: truncation could cut through image tokens)"
    )


def _check_image_tokens(model: nn.Module, prompts: EncodedPrompts) -> None:
    """Each prompt's image tokens must match its own images, not just the batch's total.

    The model checks the batch total; a prompt with too few image tokens next to one with too many
    would pass that check and shift image features across samples. Qwen-style grids give the exact
    count per prompt; tiled and any-resolution ones (InternVL, LLaVA-OneVision / NeXT) what
    :func:`_check_size_dependent` can tell; fixed-size ones must give every image the same number of tokens.
    """
    token_id = image_token_id(model)
    if token_id is None:
        return
    counts = [sum(1 for t in ids if t == token_id) for ids in prompts.input_ids]
    advice = (
        "re-encode the samples with encode_prompts (never edit input_ids by hand) and give one "
        "{'type': 'image'} part per image"
    )
    grid = prompts.vision.get("image_grid_thw")
    if grid is not None:
        merge = getattr(getattr(unwrap(model).config, "vision_config", None), "spatial_merge_size", 1)
        per_image = (grid.prod(dim=-1) // (merge * merge)).tolist()
        rows = prompts.vision_rows["image_grid_thw"]
        for i, count in enumerate(counts):
            want = int(sum(per_image[rows[i]]))
            if count != want:
                raise DataError(
                    f"sample {prompts.sample_ids[i]!r}: its prompt holds {count} image tokens but its "
                    f"{prompts.num_images[i]} image(s) give {want} features; {advice}"
                )
        return
    if _size_dependent(prompts):
        _check_size_dependent(model, prompts, counts, advice)
        return
    for i, (count, n) in enumerate(zip(counts, prompts.num_images)):
        if (count == 0) != (n == 0) or (n and count % n):
            raise DataError(
                f"sample {prompts.sample_ids[i]!r}: its prompt holds {count} image tokens for {n} image(s); {advice}"
            )
    per_image = {count // n for count, n in zip(counts, prompts.num_images) if n}
    if len(per_image) > 1:
        detail = ", ".join(
            f"{prompts.sample_ids[i]!r}: {c} for {n}" for i, (c, n) in enumerate(zip(counts, prompts.num_images)) if n
        )
        raise DataError(
            f"image tokens per image differ across the batch (samples {detail} image(s)), but every "
            f"image of this architecture gives the same number of features; {advice}"
        )


def _size_dependent(prompts: EncodedPrompts) -> bool:
    """Whether an image's token count depends on its size: any-resolution tiles with ``image_sizes``
    (LLaVA-OneVision / NeXT) or more ``pixel_values`` tiles than images (InternVL)."""
    pixel_values = prompts.vision.get("pixel_values")
    tiled = pixel_values is not None and pixel_values.ndim == 4 and pixel_values.shape[0] != sum(prompts.num_images)
    return "image_sizes" in prompts.vision or tiled


def _check_size_dependent(model: nn.Module, prompts: EncodedPrompts, counts: list[int], advice: str) -> None:
    """Tiles of ``image_seq_length`` tokens each (InternVL): a prompt's tokens are its own ``pixel_values``
    rows times that. Any-resolution grids (LLaVA-OneVision / NeXT): image tokens exactly when images
    (the batch total is the model's own check)."""
    per_tile = getattr(unwrap(model).config, "image_seq_length", None)
    pixel_values, rows = prompts.vision.get("pixel_values"), prompts.vision_rows.get("pixel_values")
    tiled = isinstance(per_tile, int) and pixel_values is not None and pixel_values.ndim == 4 and rows is not None
    videos = prompts.num_videos or [0] * len(prompts)
    for i, (count, n) in enumerate(zip(counts, prompts.num_images)):
        expected = ""
        if tiled and rows is not None and isinstance(per_tile, int):
            n_tiles = rows[i].stop - rows[i].start
            expected = f" ({n_tiles * per_tile} for its {n_tiles} tile(s))" if count != n_tiles * per_tile else ""
        if (count == 0 and n > 0) or (count > 0 and n == 0 and videos[i] == 0) or expected:  # InternVL: frames
            raise DataError(
                f"sample {prompts.sample_ids[i]!r}: its prompt holds {count} image tokens for {n} image(s){expected}; "
                f"{advice}"
            )
