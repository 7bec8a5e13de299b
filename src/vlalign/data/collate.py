"""Batching: one processor pass per batch, prompt/completion spans, image-safe length checks.

Every processor quirk of vlalign lives here. A batch is built in three steps, each a public
function that the shared-prefix log-prob engine (:mod:`vlalign.models.logprobs`) reuses:

1. :func:`encode_prompts` renders each prompt with the processor's chat template
   (``add_generation_prompt=True``) and runs the processor ONCE on the whole batch. It returns
   :class:`EncodedPrompts`: each prompt's token ids (ragged, no padding), the per-token outputs
   (``mm_token_type_ids`` / ``token_type_ids``) ragged the same way, and the processor's vision
   tensors untouched, with :attr:`EncodedPrompts.vision_rows` saying which rows of each vision
   tensor belong to which prompt.
2. :func:`encode_completions` tokenizes k completions per prompt (k may differ per prompt) in one
   tokenizer call and appends the end-of-turn token(s), which :func:`vlalign.data.chat.end_of_turn_text` derives
   from the chat template (``<|im_end|>`` for Qwen, ``<end_of_turn>`` for Gemma3...).
3. :func:`build_rows` lays out the naive batch: one row per (prompt, completion), right-padded,
   labels ``-100`` on prompt and padding, vision inputs repeated per row
   (:meth:`EncodedPrompts.vision_for`). :func:`build_prompt_rows` lays out prompts alone,
   left-padded, for generation.

Over-long samples are never truncated (truncation could cut through image tokens): they are
dropped and counted, or rejected, by option (:func:`check_lengths`).

The batch records, the row layout and the length check live in :mod:`vlalign.data.batch` (no
processor there) and are re-exported here; this module holds the processor calls and collators.

Worked example (the ``tiny`` Qwen2-VL of :mod:`vlalign.models.tiny`: 32 px images, 8 px patches,
2x2 merge; so an image is a 1 x 4 x 4 grid = 16 patch rows of ``pixel_values`` and 4 image
tokens). Two prompts, each with one image; prompt 0 gets two completions, prompt 1 one::

    prompts = encode_prompts(processor, [s0, s1])
    prompts.input_ids        # [[im_start, user, \\n, vision_start, pad x4, vision_end, ...], [...]]
    prompts.vision           # pixel_values (32, 384), image_grid_thw (2, 3)
    prompts.vision_rows      # {"pixel_values": [slice(0, 16), slice(16, 32)],
                             #  "image_grid_thw": [slice(0, 1), slice(1, 2)]}
    prompts.token_fields     # {"mm_token_type_ids": [[0, 0, 0, 0, 1, 1, 1, 1, 0, ...], [...]]}
    comps = encode_completions(processor, [["Yes", "No"], ["Two."]])
                             # [[[Yes, <|im_end|>], [No, <|im_end|>]], [[Two, ., <|im_end|>]]]
    batch = build_rows(prompts, comps, pad_token_id=0)
    batch.row_prompt         # tensor([0, 0, 1]): rows 0 and 1 share prompt 0
    batch.vision             # pixel_values (48, 384) = rows 0:16, 0:16, 16:32;
                             # image_grid_thw (3, 3); mm_token_type_ids (3, T), 0 on completions
    batch.labels[0]          # -100 on the prompt, then [Yes, <|im_end|>], then -100 padding

Processor layouts handled (see :func:`_row_unit`): Qwen2-VL / Qwen2.5-VL pack all images'
patches in one ``pixel_values`` (rows per image = ``prod(image_grid_thw)``) and need
``mm_token_type_ids``; LLaVA and Gemma3 give one ``pixel_values`` row per image (Gemma3 adds
``token_type_ids``); Idefics3 / SmolVLM give ``(B, max_images, C, H, W)`` per prompt with a
``pixel_attention_mask`` of the same layout; InternVL stacks each image's tiles (and each video
frame) as ``pixel_values`` rows, ``image_seq_length`` context tokens per row (:func:`_tiles_per_prompt`);
LLaVA-OneVision / NeXT give ``(images, max_tiles, C, H, W)`` with ``image_sizes`` per image
(OneVision adds ``batch_num_images``, made one entry per prompt, zero for a prompt without images).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from vlalign.data.batch import IGNORE_INDEX as IGNORE_INDEX  # re-exported: batching is imported from here
from vlalign.data.batch import TOKEN_SPAN_KEYS as TOKEN_SPAN_KEYS  # re-exported
from vlalign.data.batch import (
    EncodedPrompts,
    GenerationBatch,
    OnOverflow,
    SequenceBatch,
    build_prompt_rows,
    build_rows,
    check_lengths,
)
from vlalign.data.batch import spread_along_tokens as spread_along_tokens  # re-exported
from vlalign.data.chat import (  # the template helpers; several are imported from here by other modules
    _add_special_tokens,
    conversation_pieces,
    end_of_turn_ids,
    image_placeholder,
    image_token_ids,
    pad_token_id_of,
    render_prompt,
    tokenizer_of,
)
from vlalign.data.schema import (
    DataError,
    ImageLike,
    Message,
    SupervisedSample,
    count_image_placeholders,
    count_video_placeholders,
    load_image,
)
from vlalign.data.video import check_video_placeholders, is_video_key, processor_video_inputs, video_rows

PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")
"""Processor outputs laid out along the sequence (one value per token), 0 outside images."""


class PromptLike(Protocol):
    """Anything with an id, images and a conversational prompt (every sample type of schema.py)."""

    id: str
    images: list[ImageLike]
    prompt: list[Message]


# ------------------------------------------------------------------------------------ prompts


def _check_images(sample: PromptLike, text: str, placeholder: str | None) -> None:
    n_parts = count_image_placeholders(sample.prompt)
    if n_parts != len(sample.images):
        raise DataError(
            f"sample {sample.id!r}: its prompt has {n_parts} image placeholder(s) "
            f"({{'type': 'image'}} parts) but {len(sample.images)} image(s); give one placeholder per image"
        )
    if placeholder is not None and text.count(placeholder) != len(sample.images):
        raise DataError(
            f"sample {sample.id!r}: the rendered prompt holds {text.count(placeholder)} image token(s) "
            f"{placeholder!r} for {len(sample.images)} image(s); remove literal {placeholder!r} from the "
            "prompt text (images go in {'type': 'image'} parts)"
        )


def _tiles_per_prompt(processor: Any, input_ids: list[list[int]]) -> list[int] | None:
    """Rows of ``pixel_values`` per prompt for a processor that cuts an image (or a video frame) into
    tiles of ``image_seq_length`` placeholder tokens each (InternVL's ``(tiles, C, H, W)``), else None."""
    per_tile, token = getattr(processor, "image_seq_length", None), getattr(processor, "image_token_id", None)
    if not isinstance(per_tile, int) or not isinstance(token, int) or per_tile <= 0:
        return None
    return [sum(1 for t in ids if t == token) // per_tile for ids in input_ids]


def _row_unit(
    key: str, tensor: Tensor, vision: dict[str, Tensor], n_prompts: int, n_images: int, n_tiles: int | None = None
) -> str:
    """How ``tensor``'s first dimension is laid out: ``"patch"``, ``"image"`` or ``"prompt"``."""
    if key in TOKEN_SPAN_KEYS or vision.get("pixel_values", tensor).ndim == 6:
        return "prompt"  # Mllama: (B, max_images, max_tiles, C, H, W), and every tensor with it is per prompt
    if key.endswith("_grid_thw") or key == "image_sizes":
        return "image"
    if key == "batch_num_images":
        return "prompt"  # LLaVA-OneVision's images per prompt (one entry per prompt: encode_prompts)
    if key in ("pixel_values", "pixel_attention_mask"):
        if "image_grid_thw" in vision:
            return "patch"
        pixel_values = vision.get("pixel_values", tensor)
        if pixel_values.ndim == 5 and "image_sizes" not in vision:
            return "prompt"  # (B, max_images, C, H, W): Idefics3 / SmolVLM
        if tensor.shape[0] == n_images:
            return "image"  # LLaVA-OneVision / NeXT: (images, max_tiles, C, H, W), zero tiles pad
        if tensor.shape[0] == n_tiles:
            return "patch"  # InternVL: (tiles, C, H, W), each image's tiles in a row
        raise DataError(
            f"the processor returned {key} with {tensor.shape[0]} rows for {n_images} images; image "
            "cropping / splitting (pan-and-scan, image splitting) is not supported, turn it off in the processor"
        )
    if tensor.shape[0] == n_images:
        return "image"
    if tensor.shape[0] == n_prompts:
        return "prompt"
    raise DataError(
        f"cannot tell which rows of the processor output {key!r} {tuple(tensor.shape)} belong to which prompt"
    )


def _vision_rows(
    vision: dict[str, Tensor], num_images: list[int], tiles: list[int] | None = None
) -> dict[str, list[slice]]:
    n_prompts, n_images = len(num_images), sum(num_images)
    image_bounds = [0]
    for n in num_images:
        image_bounds.append(image_bounds[-1] + n)
    patch_bounds = [0]
    if "image_grid_thw" in vision:
        per_image = vision["image_grid_thw"].prod(dim=-1).tolist()
        for i in range(n_prompts):
            patch_bounds.append(patch_bounds[-1] + sum(per_image[image_bounds[i] : image_bounds[i + 1]]))
    elif tiles is not None:
        for n in tiles:
            patch_bounds.append(patch_bounds[-1] + n)
    rows: dict[str, list[slice]] = {}
    for key, tensor in vision.items():
        unit = _row_unit(key, tensor, vision, n_prompts, n_images, sum(tiles) if tiles is not None else None)
        if unit == "prompt":
            rows[key] = [slice(i, i + 1) for i in range(n_prompts)]
        else:
            bounds = patch_bounds if unit == "patch" else image_bounds
            rows[key] = [slice(bounds[i], bounds[i + 1]) for i in range(n_prompts)]
    return rows


def encode_prompts(processor: Any, samples: Sequence[PromptLike]) -> EncodedPrompts:
    """Render and process the prompts of ``samples`` with ONE processor call.

    Raises :class:`DataError` naming the sample when its image placeholders do not match its
    images, or naming the batch's samples when the processor rejects the batch.
    """
    placeholder = image_placeholder(processor)
    texts = [render_prompt(processor, s.prompt) for s in samples]
    for sample, text in zip(samples, texts):
        _check_images(sample, text, placeholder)
        check_video_placeholders(processor, sample.id, sample.prompt, text)
    num_images = [len(s.images) for s in samples]
    num_videos = [count_video_placeholders(s.prompt) for s in samples]
    images = [[load_image(im) for im in s.images] for s in samples] if sum(num_images) else None
    try:
        out = processor(
            text=texts,
            images=images,
            return_tensors="pt",
            padding=True,
            add_special_tokens=_add_special_tokens(processor, texts),
            **processor_video_inputs(processor, [s.prompt for s in samples]),
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        ids = [s.id for s in samples]
        raise DataError(f"the processor rejected the batch of samples {ids}: {exc}") from exc
    mask = out["attention_mask"].bool()
    input_ids = [row[m].tolist() for row, m in zip(out["input_ids"], mask)]
    out.pop("labels", None)  # PaliGemma's processor makes training labels from its suffix: not an input
    token_fields = {
        k: [row[m].tolist() for row, m in zip(out[k], mask)]
        for k in out.keys()
        if k in PER_TOKEN_KEYS or (k not in ("input_ids", "attention_mask") and out[k].shape == mask.shape)
    }
    vision = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask") and k not in token_fields}
    videos = {k: v for k, v in vision.items() if is_video_key(k)}
    for key in TOKEN_SPAN_KEYS:  # each prompt's own tokens first, whichever side the processor padded
        if key in vision:
            vision[key] = torch.stack([torch.cat([v[m], v[~m]]) for v, m in zip(vision[key], mask)])
    if "batch_num_images" in vision:  # LLaVA-OneVision leaves the prompts without images out of it
        vision["batch_num_images"] = vision["batch_num_images"].new_tensor(num_images)
    img_ids = set(image_token_ids(processor))
    counts = [sum(1 for t in ids if t in img_ids) for ids in input_ids]
    for sample, n_img, n_tok, n_vid in zip(samples, num_images, counts, num_videos):
        if n_img == 0 and n_tok and n_vid:
            continue  # InternVL writes video frames with its image tokens
        if (n_img == 0) != (n_tok == 0):
            raise DataError(f"sample {sample.id!r}: {n_img} image(s) but {n_tok} image tokens after processing")
    return EncodedPrompts(
        sample_ids=[s.id for s in samples],
        input_ids=input_ids,
        token_fields=token_fields,
        vision=vision,
        vision_rows={
            **_vision_rows(
                {k: v for k, v in vision.items() if k not in videos},
                num_images,
                _tiles_per_prompt(processor, input_ids),
            ),
            **video_rows(videos, num_videos),
        },
        num_images=num_images,
        num_videos=num_videos if sum(num_videos) else [],
        image_token_count=counts,
        completion_fields=_completion_fields(processor, token_fields),
    )


def _completion_fields(processor: Any, token_fields: dict[str, list[list[int]]]) -> dict[str, int]:
    """Per-token fields whose value on completion tokens is not 0: a processor that builds a
    prefix and a ``suffix`` itself (PaliGemma) marks the suffix with ``token_type_ids`` 1, and its
    model attends bidirectionally over every token marked 0 (the completion must not be among them)."""
    takes_suffix = "suffix" in inspect.signature(type(processor).__call__).parameters
    return {"token_type_ids": 1} if takes_suffix and "token_type_ids" in token_fields else {}


def encode_completions(
    processor: Any,
    completions: Sequence[Sequence[str]],
    *,
    eot_ids: Sequence[int] | None = None,
    affixes: tuple[str, str] | None = None,
) -> list[list[list[int]]]:
    """Token ids of k completions per prompt (ragged), each followed by the end-of-turn ids.

    One tokenizer call for the whole batch. ``eot_ids`` defaults to :func:`end_of_turn_ids`
    (pass it when calling often, to skip re-rendering the template). With ``affixes=(lead, tail)``
    (TRL's convention, :func:`~vlalign.data.chat.response_affixes`) each completion is the one text
    ``lead + completion + tail``, tokenized whole, and ``eot_ids`` is unused.
    """
    flat = [text for group in completions for text in group]
    if affixes is not None:
        flat = [affixes[0] + text + affixes[1] for text in flat]
    eot = [] if affixes is not None else list(end_of_turn_ids(processor) if eot_ids is None else eot_ids)
    encoded = tokenizer_of(processor)(flat, add_special_tokens=False)["input_ids"] if flat else []
    out: list[list[list[int]]] = []
    pos = 0
    for group in completions:
        out.append([list(ids) + eot for ids in encoded[pos : pos + len(group)]])
        pos += len(group)
    return out


# -------------------------------------------------------------------------------- collators


GIVE_UP_AFTER = 64
"""A collator that has dropped every one of the first this many samples for their length stops the
run (:meth:`_Collator._count`)."""


class _Collator:
    """Shared state: the processor, length policy and the running count of dropped samples."""

    def __init__(self, processor: Any, *, max_length: int | None = None, on_overflow: OnOverflow = "drop") -> None:
        if on_overflow not in ("drop", "raise"):
            raise ValueError(f"on_overflow must be 'drop' or 'raise', not {on_overflow!r}")
        self.processor = processor
        self.max_length = max_length
        self.on_overflow: OnOverflow = on_overflow
        self.pad_token_id = pad_token_id_of(processor)
        self.num_dropped = 0
        """Samples dropped so far for exceeding ``max_length`` (in this process)."""
        self.dropped_ids: list[str] = []
        self.num_seen = 0
        """Samples collated so far (in this process)."""

    def _count(self, seen: int, dropped: list[str]) -> None:
        """Count a batch's samples and drops; stop once the first :data:`GIVE_UP_AFTER` samples
        were all too long, rather than train on nothing (a run whose every sample exceeds
        ``max_length`` would otherwise log a loss of 0 at every step and save an untouched model)."""
        fitted_before = self.num_seen > self.num_dropped
        self.num_seen += seen
        self.num_dropped += len(dropped)
        self.dropped_ids.extend(dropped)
        if not fitted_before and self.num_seen >= GIVE_UP_AFTER and self.num_dropped == self.num_seen:
            raise DataError(
                f"0 of {self.num_seen} samples usable: {self.num_seen} longer than data.max_length "
                f"{self.max_length}; raise data.max_length"
            )


class SupervisedCollator(_Collator):
    """``SupervisedSample`` list -> :class:`SequenceBatch` (supervised fine-tuning).

    One processor call per batch; labels cover exactly the completion tokens and the
    end-of-turn token(s). A multi-turn sample (earlier assistant turns inside its prompt) is
    supervised on every assistant turn (:func:`conversation_pieces`), so a conversation of n
    questions about one image teaches n answers for one pass of the image. Over-long samples
    are dropped (counted in ``num_dropped`` and listed in the batch's ``dropped_ids``) or raise
    :class:`DataError`, by ``on_overflow``.
    """

    def __init__(self, processor: Any, *, max_length: int | None = None, on_overflow: OnOverflow = "drop") -> None:
        super().__init__(processor, max_length=max_length, on_overflow=on_overflow)
        self.eot_ids = end_of_turn_ids(processor)

    def __call__(self, samples: Sequence[SupervisedSample]) -> SequenceBatch:
        for s in samples:
            if not s.completion:
                raise DataError(f"sample {s.id!r}: empty completion")
        split = [conversation_pieces(self.processor, s) for s in samples]
        prompts = encode_prompts(self.processor, [first for first, _ in split])
        tok = tokenizer_of(self.processor)
        completions, masks = [], []
        for (_, pieces), sample in zip(split, samples):
            texts = [text for text, _ in pieces] + [sample.completion]
            encoded = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
            ids: list[int] = []
            mask: list[bool] = []
            for piece, (_, supervised) in zip(encoded, [*pieces, ("", True)]):
                ids += piece
                mask += [supervised] * len(piece)
            completions.append([ids + list(self.eot_ids)])
            masks.append([mask + [True] * len(self.eot_ids)])
        keep, dropped = check_lengths(prompts, completions, max_length=self.max_length, on_overflow=self.on_overflow)
        self._count(len(samples), dropped)
        if len(keep) < len(prompts):
            prompts = prompts.select(keep)
            completions = [completions[i] for i in keep]
            masks = [masks[i] for i in keep]
        return build_rows(prompts, completions, pad_token_id=self.pad_token_id, dropped_ids=dropped, label_masks=masks)


class PromptCollator(_Collator):
    """Samples with a prompt -> left-padded :class:`GenerationBatch` (generation, RL, evaluation)."""

    def __call__(self, samples: Sequence[PromptLike]) -> GenerationBatch:
        prompts = encode_prompts(self.processor, samples)
        keep, dropped = check_lengths(prompts, None, max_length=self.max_length, on_overflow=self.on_overflow)
        self._count(len(samples), dropped)
        if len(keep) < len(prompts):
            prompts = prompts.select(keep)
        return build_prompt_rows(prompts, pad_token_id=self.pad_token_id, dropped_ids=dropped)


def check_some_fit(
    collate: Callable[[Sequence[Any]], Any],
    samples: Sequence[Any],
    *,
    max_length: int | None,
    probe: int = 256,
    batch_size: int = 16,
    option: str = "data.max_length",
) -> int:
    """Stop before training when no sample fits ``max_length``: encode the first ``probe``
    samples with ``collate`` (a collator or encoder that counts drops in ``num_dropped``, which is
    restored afterwards, so logged counters do not change) and raise :class:`DataError` if every
    one was dropped: "0 of 40 samples usable: 40 longer than data.max_length 1024; raise
    data.max_length". Returns the number of probed samples that fit."""
    n = min(len(samples), probe)
    if max_length is None or n == 0:
        return n
    before = collate.num_dropped  # type: ignore[attr-defined]
    ids = list(getattr(collate, "dropped_ids", []))
    seen = getattr(collate, "num_seen", None)
    try:
        for start in range(0, n, batch_size):
            collate(list(samples[start : min(start + batch_size, n)]))
        dropped = collate.num_dropped - before  # type: ignore[attr-defined]
    finally:
        collate.num_dropped = before  # type: ignore[attr-defined]
        if hasattr(collate, "dropped_ids"):
            collate.dropped_ids = ids  # type: ignore[attr-defined]
        if seen is not None:
            collate.num_seen = seen  # type: ignore[attr-defined]
    if dropped >= n:
        checked = f" (the first {n} of {len(samples)} checked)" if n < len(samples) else ""
        raise DataError(
            f"0 of {n} samples usable{checked}: {dropped} longer than {option} {max_length}; raise {option}"
        )
    return n - dropped
