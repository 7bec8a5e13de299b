"""Per-token log-probs of many completions per prompt, each prompt and image processed once.

:func:`completion_logprobs` is what every recipe calls: DPO and its relatives (k = 2
completions per prompt, 1 + K for POVID), mDPO's corrupted-image condition (another prompt),
GRPO / RLOO groups (k = G) and PPO (entropies, hidden states for a value head). It returns
:class:`CompletionLogprobs`, whose per-token layout is the same whichever way it was computed, so
that every loss works unchanged.

Modes
-----
``"shared"`` (default): one packed row per prompt, ``[prompt | c_1 | ... | c_k]``, with a block
attention mask (each completion sees the prompt and itself, never its siblings) and positions that
restart after the prompt (:mod:`vlalign.models.packing`). It is ONE ordinary forward of the model
(``model(**inputs)``), so LoRA (PEFT), gradient checkpointing and data parallel wrappers work
unchanged, and gradients reach every parameter the naive computation reaches, the vision tower
included. Each image goes through the vision tower once per prompt instead of once per completion.

``"naive"``: one row per (prompt, completion), the image repeated (what TRL, LLaMA-Factory,
ms-swift, verl and EasyR1 do); kept as the reference and as the fallback.

Both modes ask the model for the logits of the needed positions only (``logits_to_keep``), so
the vocabulary projection runs on completion positions alone in both; the speed-up of
``"shared"`` over ``"naive"`` is the prefix sharing alone.

Which attention is used when
----------------------------
The mask follows the language model's attention implementation (``config._attn_implementation``):

- ``"sdpa"``: a dense boolean ``(B, 1, T, T)`` mask (memory quadratic in the packed length T;
  small next to activations for prompts of a few thousand tokens).
- ``"eager"``: the same mask as an additive float mask (0 / ``finfo(dtype).min``): eager
  attention adds the mask to the scores, so a boolean mask there would be silently wrong.
- ``"flex_attention"`` (CUDA): a FlexAttention ``BlockMask``, memory linear in the number of
  128 x 128 tiles, tiles no query may see skipped. Load the model with
  ``attn_implementation="flex_attention"`` on GPUs where the architecture allows it (LLaVA,
  Idefics3, Gemma3 in transformers 5.24; Qwen2-VL / Qwen2.5-VL refuse it and use sdpa). On CPU,
  FlexAttention has no backward; use sdpa there.
- anything else (``flash_attention_2``/``3``: variable-length kernels cannot let several
  completions share one prompt) falls back to ``"naive"``, as does an architecture not in
  :data:`ARCHITECTURES`; the reason is logged once.

Architectures verified (per-token log-probs and gradients equal to the naive computation within
1e-5 in float32, ``tests/models/test_logprobs.py``): Qwen2-VL, Qwen2.5-VL, LLaVA, Idefics3 and
Gemma3 (bidirectional attention over image tokens; sliding-window layers get their own mask).

On a GPU (one H100, torch 2.11, transformers 5.24, the ``small`` tiny models, 2 prompts with 8
completions each, log-prob sums and a backward; 2026-11-26), shared and naive agreed as follows:

- float32, with cuDNN's default TF32 convolutions: log-probs within 9.5e-7 for LLaVA (flex and
  sdpa) and Qwen2-VL (sdpa; it refuses flex); up to 2.3e-4 for Gemma3 and 8e-5 for Idefics3, the
  same under sdpa and flex. The vision patch embedding runs once per prompt in one mode and once
  per row in the other, so the TF32 convolution rounds differently. With TF32 off, Gemma3 agreed
  within 9.5e-7 in log-probs and 7e-7 in gradients (relative norm) under both attentions;
  Idefics3 was not rerun that way.
- bfloat16: up to 1e-2 in log-probs and 3e-3 to 8e-3 in gradients, the rounding of bf16.

Gemma3's sliding-window layers give FlexAttention two mask functions. ``torch.compile`` guards
on each, and a process that also switched dtype reached dynamo's recompile limit (8). It then
fell back to the unfused kernel: still exact, but with the full score matrix in memory.

Safety checks: every prompt's image tokens must match its own images (:func:`_check_image_tokens`;
the model itself only checks the batch total), a prompt alone longer than ``max_length`` is a
:class:`~vlalign.data.schema.DataError`, and :attr:`CompletionLogprobs.token_ids` holds the tokens
actually scored, read back from the model's input at the gathered positions, so a caller (and the
tests) can compare them with the labels.

Preference batches
------------------
:func:`preference_batch` lays out pairs, 1 + K negatives (POVID) and, with ``corrupted_prompts``,
the chosen completion under a corrupted image (mDPO: another prompt, same forward);
:func:`preference_logprobs` returns :class:`PreferenceLogprobs`, the per-sequence sums a
``PreferenceLogps`` needs. A reference policy scores ``batch.prompts`` / ``batch.completions``
and ``batch.split`` shapes its result the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlalign.data.collate import EncodedPrompts, build_rows
from vlalign.data.schema import DataError
from vlalign.models.packing import (
    Layout,
    PackedRows,
    additive_mask,
    block_attention_mask,
    concat_prompts,
    flex_block_mask,
    gather_tokens,
    image_blocks,
    mrope_positions,
    naive_layout,
    packed_layout,
)

logger = logging.getLogger(__name__)

Mode = Literal["shared", "naive"]
Completions = Sequence[Sequence[Sequence[int]]]
"""Token ids of k completions per prompt: ``completions[i][j]`` is completion j of prompt i."""


@dataclass(frozen=True)
class ArchSupport:
    """What the packed layout must know about an architecture."""

    mrope: bool = False
    """3-row multimodal RoPE positions from the model's ``get_rope_index`` (Qwen2-VL family)."""
    bidirectional_images: str | None = None
    """Per-token field marking image tokens (value 1) that attend to each other in both directions."""
    dict_masks: bool = False
    """The forward accepts ``{"full_attention": m, "sliding_attention": m}`` for sliding-window layers."""


ARCHITECTURES: dict[str, ArchSupport] = {
    "qwen2_vl": ArchSupport(mrope=True, dict_masks=True),
    "qwen2_5_vl": ArchSupport(mrope=True, dict_masks=True),
    "llava": ArchSupport(),
    "idefics3": ArchSupport(),
    "gemma3": ArchSupport(bidirectional_images="token_type_ids", dict_masks=True),
}
"""``config.model_type`` of the architectures the packed layout is verified on."""

_DENSE_ATTENTION = ("sdpa", "eager")
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


# ------------------------------------------------------------------------------------ result


@dataclass
class CompletionLogprobs:
    """Per-token log-probs of R completions (flat order: prompt 0's completions first).

    Per-token tensors are ``(R, L)``, right-padded (L = the longest completion), zero on padding;
    ``mask`` says which entries are real. ``row_prompt[r]`` / ``row_completion[r]`` give the
    (prompt i, completion j) of row r. Log-probs are of ``softmax(logits / temperature)``.
    """

    logps: Tensor  # (R, L) float: log p(token_t | prompt, tokens_<t)
    mask: Tensor  # (R, L) bool
    token_ids: Tensor  # (R, L) long: the completion tokens, IGNORE_INDEX on padding
    row_prompt: Tensor  # (R,) long
    row_completion: Tensor  # (R,) long
    mode: str
    """The mode that actually ran (``"naive"`` after a fallback)."""
    num_tokens: int
    """Non-padding tokens the language model processed (prompt tokens counted once per row)."""
    num_slots: int
    """Token slots of the padded batch (rows x width)."""
    entropy: Tensor | None = None  # (R, L) float: entropy of the next-token distribution
    hidden: Tensor | None = None  # (R, L, H): last hidden state at the position predicting each token
    last_hidden: Tensor | None = None  # (R, H): last hidden state at each completion's last token

    def __len__(self) -> int:
        return int(self.logps.shape[0])

    @property
    def lengths(self) -> Tensor:  # (R,) long
        return self.mask.sum(-1)

    @property
    def sums(self) -> Tensor:  # (R,) float
        """Per-sequence log-probs: the sum over each completion's tokens."""
        return (self.logps * self.mask).sum(-1)

    def by_prompt(self, values: Tensor) -> Tensor:
        """``values`` ``(R, ...)`` as ``(B, k, ...)`` when every prompt has k completions."""
        counts = torch.bincount(self.row_prompt)
        if counts.numel() and bool((counts != counts[0]).any()):
            raise ValueError(f"by_prompt needs the same number of completions per prompt, got {counts.tolist()}")
        k = int(counts[0]) if counts.numel() else 0
        return values.reshape(-1, k, *values.shape[1:])

    def detach(self) -> CompletionLogprobs:
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).detach()
                for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
        )

    def to(self, device: torch.device | str) -> CompletionLogprobs:
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
        )

    def select(self, rows: Tensor | Sequence[int]) -> CompletionLogprobs:
        """The rows ``rows`` (in that order); per-row tensors cut, token counts left as they were."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.logps.device)
        changes = {
            f.name: getattr(self, f.name)[index.to(getattr(self, f.name).device)]
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **changes)


# ------------------------------------------------------------------------------- model access


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside data-parallel wrappers (``DistributedDataParallel`` and friends); PEFT stays."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
        model = model.module
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside data-parallel and PEFT wrappers (LoRA layers stay in place)."""
    inner = unwrap_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def attention_implementation(model: nn.Module) -> str:
    """The language model's attention implementation (``"sdpa"``, ``"eager"``, ``"flex_attention"``...)."""
    config = unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", "eager"))


def sharing_unsupported(model: nn.Module) -> str | None:
    """Why the packed layout cannot be used with ``model``, or None when it can."""
    model_type = getattr(unwrap(model).config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return (
            f"prefix sharing is not verified for model_type {model_type!r} (verified: {sorted(ARCHITECTURES)}); "
            "computing log-probs the naive way (prompt and image repeated per completion)"
        )
    attn = attention_implementation(model)
    if attn not in _DENSE_ATTENTION and attn != "flex_attention":
        return (
            f"attention implementation {attn!r} cannot take a block mask (a completion must see the shared "
            "prompt); computing log-probs the naive way. Load the model with attn_implementation='sdpa' "
            "(or 'flex_attention' on GPUs) to share prompts"
        )
    return None


def _text_config(model: nn.Module) -> Any:
    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _image_token_id(model: nn.Module) -> int | None:
    config = unwrap(model).config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# ----------------------------------------------------------------------------------- checks


def _check_inputs(model: nn.Module, prompts: EncodedPrompts, completions: Completions, max_length: int | None) -> None:
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
    count per prompt; fixed-size architectures must give every image the same number of tokens.
    """
    token_id = _image_token_id(model)
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


# --------------------------------------------------------------------------------- the forward


def _prompt_mrope(model: nn.Module, prompts: EncodedPrompts) -> list[Tensor]:
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
    with torch.no_grad():
        positions, _ = base.get_rope_index(
            ids.to(device),
            mm_token_type_ids=types.to(device),
            image_grid_thw=grid.to(device) if grid is not None else None,
            attention_mask=attn.to(device),
        )
    return [positions[:, b, : len(row)].cpu() for b, row in enumerate(prompts.input_ids)]


def _shared_inputs(
    model: nn.Module, prompts: EncodedPrompts, packed: PackedRows, device: torch.device
) -> dict[str, Any]:
    """Keyword arguments of the model's forward for the packed rows."""
    support = ARCHITECTURES[unwrap(model).config.model_type]
    text = _text_config(model)
    attn = attention_implementation(model)
    blocks = None
    if support.bidirectional_images and support.bidirectional_images in packed.token_fields:
        blocks = image_blocks(packed.token_fields[support.bidirectional_images])
    window = getattr(text, "sliding_window", None)
    sliding = window is not None and "sliding_attention" in (getattr(text, "layer_types", None) or ())
    segments, positions = packed.segments.to(device), packed.positions.to(device)
    blocks = blocks.to(device) if blocks is not None else None

    def build(window_: int | None) -> Any:
        if attn == "flex_attention":
            return flex_block_mask(segments, positions=positions, blocks=blocks, sliding_window=window_)
        visible = block_attention_mask(segments, positions=positions, blocks=blocks, sliding_window=window_)
        return visible if attn == "sdpa" else additive_mask(visible, unwrap(model).get_input_embeddings().weight.dtype)

    mask: Any = build(None)
    if sliding:
        mask = {"full_attention": mask, "sliding_attention": build(int(window))}
    if support.mrope:
        position_ids = mrope_positions(_prompt_mrope(model, prompts), packed)
    else:
        position_ids = packed.positions
    return {
        "input_ids": packed.layout.input_ids.to(device),
        "attention_mask": mask,
        "position_ids": position_ids.to(device),
        **{k: v.to(device) for k, v in prompts.vision.items()},
        **{k: v.to(device) for k, v in packed.token_fields.items()},
    }


def _sliding_window_problem(model: nn.Module, packed: PackedRows) -> str | None:
    """Why the packed layout cannot express this batch's sliding-window layers (None if it can)."""
    text = _text_config(model)
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


def _run(
    model: nn.Module, inputs: dict[str, Any], layout: Layout, *, want_hidden: bool
) -> tuple[Tensor, Tensor | None]:
    """One forward: the kept logits ``(rows, K, V)`` and, on request, the last hidden states ``(rows, T, H)``."""
    device = inputs["input_ids"].device
    out = model(
        **inputs,
        logits_to_keep=layout.keep.to(device),
        use_cache=False,
        output_hidden_states=True if want_hidden else None,
    )
    hidden = out.hidden_states[-1] if want_hidden else None
    return out.logits, hidden


def _token_outputs(
    logits: Tensor,
    hidden: Tensor | None,
    layout: Layout,
    token_ids: Tensor,
    *,
    temperature: float,
    return_entropy: bool,
) -> dict[str, Tensor | None]:
    device = logits.device
    flat = logits.reshape(-1, logits.shape[-1])  # (rows * K, V)
    chosen = flat[layout.source.to(device)].float() / temperature  # (R, L, V)
    logp_all = F.log_softmax(chosen, dim=-1)
    mask = layout.mask.to(device)
    safe = token_ids.to(device).clamp(min=0)
    logps = logp_all.gather(-1, safe[..., None]).squeeze(-1).masked_fill(~mask, 0.0)  # (R, L)
    out: dict[str, Tensor | None] = {"logps": logps, "entropy": None, "hidden": None, "last_hidden": None}
    if return_entropy:
        out["entropy"] = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~mask, 0.0)
    if hidden is not None:
        states = hidden.reshape(-1, hidden.shape[-1])  # (rows * T, H)
        out["hidden"] = states[layout.predictor.to(device)] * mask[..., None]
        out["last_hidden"] = states[layout.last.to(device)]
    return out


def completion_logprobs(
    model: nn.Module,
    prompts: EncodedPrompts,
    completions: Completions,
    *,
    mode: Mode = "shared",
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_hidden: bool = False,
    pad_token_id: int = 0,
    max_length: int | None = None,
) -> CompletionLogprobs:
    """Per-token log-probs of ``completions[i][j]`` given prompt ``i``, for every (i, j).

    ``prompts`` come from :func:`vlalign.data.collate.encode_prompts` (one processor call),
    ``completions`` from :func:`~vlalign.data.collate.encode_completions` or from generation
    (token ids, end-of-turn included where it should be scored; k may differ per prompt).
    ``temperature`` divides the logits (RL recipes score at the sampling temperature).
    ``return_hidden`` adds the last hidden states (value heads: at the position predicting each
    token; reward heads: ``last_hidden`` at each completion's last token). ``max_length`` bounds
    prompt + completion (a prompt alone over it is an error, never a truncation).

    Gradients flow; wrap the call in ``torch.no_grad()`` for a reference or a rollout score.
    ``mode="shared"`` falls back to ``"naive"`` (logged once, with the reason) for an
    architecture or attention implementation that cannot share prompts.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode not in ("shared", "naive"):
        raise ValueError(f"mode must be 'shared' or 'naive', not {mode!r}")
    _check_inputs(model, prompts, completions, max_length)
    device = next(model.parameters()).device
    if mode == "shared":
        reason = sharing_unsupported(model)
        packed = packed_layout(prompts, completions, pad_token_id=pad_token_id) if reason is None else None
        if packed is not None:
            reason = _sliding_window_problem(model, packed)
        if reason is not None:
            _log_once(reason)
            mode = "naive"
    if mode == "shared":
        assert packed is not None
        layout = packed.layout
        inputs = _shared_inputs(model, prompts, packed, device)
    else:
        batch = build_rows(prompts, completions, pad_token_id=pad_token_id)
        layout = naive_layout(batch)
        inputs = {k: v.to(device) for k, v in batch.model_inputs().items()}
    token_ids = gather_tokens(layout.input_ids, layout)
    logits, hidden = _run(model, inputs, layout, want_hidden=return_hidden)
    outs = _token_outputs(logits, hidden, layout, token_ids, temperature=temperature, return_entropy=return_entropy)
    rows, width = layout.input_ids.shape
    return CompletionLogprobs(
        logps=outs["logps"],
        mask=layout.mask.to(device),
        token_ids=token_ids.to(device),
        row_prompt=layout.row_prompt.to(device),
        row_completion=layout.row_completion.to(device),
        mode=mode,
        num_tokens=layout.num_tokens,
        num_slots=rows * width,
        entropy=outs["entropy"],
        hidden=outs["hidden"],
        last_hidden=outs["last_hidden"],
    )


# ------------------------------------------------------------------------------- preferences


@dataclass
class PreferenceLogprobs:
    """Per-sequence log-probs of a preference batch, shaped as :class:`~vlalign.losses.PreferenceLogps` wants.

    ``*_rows`` index the rows of ``tokens`` (the per-token result) for per-token losses (DDPO).
    """

    chosen_logps: Tensor  # (B,)
    rejected_logps: Tensor  # (B,) or (B, K)
    chosen_lengths: Tensor  # (B,) long
    rejected_lengths: Tensor  # like rejected_logps
    chosen_rows: Tensor  # (B,) long
    rejected_rows: Tensor  # like rejected_logps
    tokens: CompletionLogprobs
    corrupted_chosen_logps: Tensor | None = None  # (B,): the chosen completion under the corrupted image (mDPO)
    corrupted_rows: Tensor | None = None  # (B,) long


@dataclass
class PreferenceBatch:
    """A preference batch laid out for ONE log-prob call (policy and reference alike).

    Prompt ``i`` (of B) carries ``[chosen_i, rejected_i1, ..., rejected_iK]``; with mDPO's
    corrupted images, corrupted prompt ``i`` (appended after the B prompts) carries ``[chosen_i]``.
    """

    prompts: EncodedPrompts
    completions: list[list[list[int]]]
    num_pairs: int
    num_rejected: int
    rejected_matrix: bool
    """Rejected log-probs come out as ``(B, K)`` (True) or ``(B,)`` (False, one rejected each)."""
    has_corrupted: bool

    def split(self, result: CompletionLogprobs) -> PreferenceLogprobs:
        """Per-sequence sums of ``result`` (of this batch's completions) as chosen / rejected / corrupted."""
        b, k = self.num_pairs, self.num_rejected
        device = result.logps.device
        base = torch.arange(b, device=device) * (1 + k)  # (B,)
        chosen = base
        rejected = base[:, None] + 1 + torch.arange(k, device=device)[None, :]  # (B, K)
        if not self.rejected_matrix:
            rejected = rejected[:, 0]
        sums, lengths = result.sums, result.lengths
        corrupted = b * (1 + k) + torch.arange(b, device=device) if self.has_corrupted else None
        return PreferenceLogprobs(
            chosen_logps=sums[chosen],
            rejected_logps=sums[rejected],
            chosen_lengths=lengths[chosen],
            rejected_lengths=lengths[rejected],
            chosen_rows=chosen,
            rejected_rows=rejected,
            tokens=result,
            corrupted_chosen_logps=sums[corrupted] if corrupted is not None else None,
            corrupted_rows=corrupted,
        )


def preference_batch(
    prompts: EncodedPrompts,
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]],
    *,
    corrupted_prompts: EncodedPrompts | None = None,
) -> PreferenceBatch:
    """Lay out pairs (``rejected[i]`` one completion's ids) or 1 + K negatives (``rejected[i]`` K completions).

    ``corrupted_prompts``: the same prompts with corrupted images (mDPO), in the same order; the
    chosen completion is scored under them too, in the same forward.
    """
    n = len(prompts)
    if len(chosen) != n or len(rejected) != n:
        raise ValueError(
            f"preference_batch: {n} prompts, {len(chosen)} chosen and {len(rejected)} rejected completions"
        )
    matrix = n > 0 and len(rejected[0]) > 0 and not isinstance(rejected[0][0], int)
    groups = [list(r) if matrix else [r] for r in rejected]
    k = len(groups[0]) if groups else 1
    for i, group in enumerate(groups):
        if len(group) != k:
            raise ValueError(
                f"preference_batch: sample {prompts.sample_ids[i]!r} has {len(group)} rejected "
                f"completions, the first has {k}; give every sample the same number"
            )
    completions = [[list(c)] + [list(r) for r in group] for c, group in zip(chosen, groups)]
    if corrupted_prompts is not None:
        if len(corrupted_prompts) != n:
            raise ValueError(f"preference_batch: {len(corrupted_prompts)} corrupted prompts for {n} prompts")
        prompts = concat_prompts(prompts, corrupted_prompts)
        completions += [[list(c)] for c in chosen]
    return PreferenceBatch(
        prompts=prompts,
        completions=completions,
        num_pairs=n,
        num_rejected=k,
        rejected_matrix=matrix,
        has_corrupted=corrupted_prompts is not None,
    )


def preference_logprobs(model: nn.Module, batch: PreferenceBatch, **kwargs: Any) -> PreferenceLogprobs:
    """:func:`completion_logprobs` of a :class:`PreferenceBatch`, split into chosen / rejected / corrupted."""
    return batch.split(completion_logprobs(model, batch.prompts, batch.completions, **kwargs))
