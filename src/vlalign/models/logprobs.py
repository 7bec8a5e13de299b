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
The mask follows the language model's attention implementation (``config._attn_implementation``;
the forward's inputs are built by :mod:`vlalign.models.packed_inputs`):

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
  :data:`~vlalign.models.arch.ARCHITECTURES`; the reason is logged once.

Architectures verified (per-token log-probs and gradients equal to the naive computation within
1e-5 in float32, ``tests/models/test_logprobs.py``): Qwen2-VL, Qwen2.5-VL, LLaVA, Idefics3 and
Gemma3 (bidirectional attention over image tokens; sliding-window layers get their own mask).

See docs/notes/logprob-engine.md for how closely the two modes agree on a GPU (TF32, bfloat16).

Safety checks (:mod:`vlalign.models.input_checks`): every prompt's image tokens must match its own
images (the model itself only checks the batch total), a prompt alone longer than ``max_length``
is a :class:`~vlalign.data.schema.DataError`, and :attr:`CompletionLogprobs.token_ids` holds the
tokens actually scored, read back from the model's input at the gathered positions, so a caller
(and the tests) can compare them with the labels.

Preference batches (pairs, 1 + K negatives, mDPO's corrupted images) are laid out for one call of
this function by :mod:`vlalign.models.preference_batch`.
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
from vlalign.models.arch import sharing_unsupported
from vlalign.models.input_checks import check_inputs
from vlalign.models.packed_inputs import shared_inputs, sliding_window_problem
from vlalign.models.packing import Completions, Layout, gather_tokens, naive_layout, packed_layout

logger = logging.getLogger(__name__)

Mode = Literal["shared", "naive"]

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


# ------------------------------------------------------------------------------- the forward


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
    check_inputs(model, prompts, completions, max_length)
    device = next(model.parameters()).device
    if mode == "shared":
        reason = sharing_unsupported(model)
        packed = packed_layout(prompts, completions, pad_token_id=pad_token_id) if reason is None else None
        if packed is not None:
            reason = sliding_window_problem(model, packed)
        if reason is not None:
            _log_once(reason)
            mode = "naive"
    if mode == "shared":
        assert packed is not None
        layout = packed.layout
        inputs = shared_inputs(model, prompts, packed, device)
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
