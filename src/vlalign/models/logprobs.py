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

Both modes run the vocabulary projection on completion positions alone; the speed-up of
``"shared"`` over ``"naive"`` is the prefix sharing alone.

The LM head: ``logits_mode``
----------------------------
``"chunked"`` (opt-in): the model's forward runs with its LM head computing ONE position (a
forward pre-hook on the head keeps the last hidden states of the scored positions and hands the
head a single row), and the log-probs (and entropies) of the completion tokens are computed from
those hidden states by :func:`vlalign.models.head_logprobs.head_logprobs`: the head applied to
one block of vocabulary rows at a time, the backward recomputing each block's logits, so no
``(tokens, vocabulary)`` tensor is ever held (with Qwen's 151,936-token vocabulary, the full
logits and their float32 copies are the largest tensors of a step). The one position the head
still computes is a probe: the model's own output there must equal the head applied by hand
(soft-capped when the text config has ``final_logit_softcapping`` and the model applies it),
which catches a model that changes its logits after the head; the dtype of that output (bf16
under autocast) is the dtype the chunks compute in, so autocast runs stay as exact as the full
path.

``"full"`` (the default): the model computes the kept logits (``logits_to_keep``), then a float32
log-softmax and a gather: the path before chunking, the reference and the fallback. It stays the
default because the chunked path, exact to float rounding, is not batch-invariant on a CPU
(a matrix product of one row and of many round differently), so a reference scored in other
batches than the policy differs from it by ~1e-7 where the full path gives exactly 0, and its
memory and time targets were not met (``docs/performance.md``).
``"chunked"`` falls back to it (logged once, with the reason) when the LM head is not a plain
``nn.Linear`` (LoRA on the head), when its weight is sharded (DeepSpeed ZeRO-3, FSDP2) or when
the probe disagrees. :attr:`CompletionLogprobs.logits_mode` says which path ran. The two paths
agree within float rounding (``tests/models/test_logprobs_chunked.py``; measurements in
``docs/performance.md``).

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
from vlalign.models.arch import sharing_unsupported, text_config, unwrap
from vlalign.models.head_logprobs import head_logprobs
from vlalign.models.input_checks import check_inputs
from vlalign.models.packed_inputs import shared_inputs, sliding_window_problem
from vlalign.models.packing import Completions, Layout, gather_tokens, naive_layout, packed_layout

logger = logging.getLogger(__name__)

Mode = Literal["shared", "naive"]
LogitsMode = Literal["chunked", "full"]

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
    logits_mode: str = ""
    """The LM-head path that ran (``"chunked"`` or ``"full"``); empty where none ran (a cache)."""

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


def _hidden_outputs(hidden: Tensor, layout: Layout) -> dict[str, Tensor]:
    """Last hidden states at the position predicting each token ``(R, L, H)`` and at each last token ``(R, H)``."""
    device = hidden.device
    states = hidden.reshape(-1, hidden.shape[-1])  # (rows * T, H)
    mask = layout.mask.to(device)
    return {
        "hidden": states[layout.predictor.to(device)] * mask[..., None],
        "last_hidden": states[layout.last.to(device)],
    }


def _token_outputs(
    logits: Tensor,
    layout: Layout,
    token_ids: Tensor,
    *,
    temperature: float,
    return_entropy: bool,
) -> dict[str, Tensor | None]:
    """The full path: log-softmax of the kept logits, gathered at each completion token."""
    device = logits.device
    flat = logits.reshape(-1, logits.shape[-1])  # (rows * K, V)
    chosen = flat[layout.source.to(device)].float() / temperature  # (R, L, V)
    logp_all = F.log_softmax(chosen, dim=-1)
    mask = layout.mask.to(device)
    safe = token_ids.to(device).clamp(min=0)
    logps = logp_all.gather(-1, safe[..., None]).squeeze(-1).masked_fill(~mask, 0.0)  # (R, L)
    out: dict[str, Tensor | None] = {"logps": logps, "entropy": None}
    if return_entropy:
        out["entropy"] = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~mask, 0.0)
    return out


# ------------------------------------------------------------------------------ the chunked head


def _plain_head(model: nn.Module) -> tuple[nn.Linear | None, str | None]:
    """The LM head when the chunked path can apply it by hand; else None and the reason."""
    head = unwrap(model).get_output_embeddings()
    if type(head) is not nn.Linear:
        return None, f"the LM head is a {type(head).__name__}, not a plain nn.Linear (an adapter on the head?)"
    weight = head.weight
    if weight.ndim != 2 or weight.numel() == 0 or hasattr(weight, "ds_id") or "DTensor" in type(weight.data).__name__:
        return None, "the LM head's weight is sharded (DeepSpeed ZeRO-3 or FSDP)"
    return head, None


def _run_chunked(
    model: nn.Module, inputs: dict[str, Any], layout: Layout, head: nn.Linear, *, want_hidden: bool
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """One forward whose LM head computes one position (the probe).

    Returns the last hidden states at the kept positions ``(rows, K, H)`` (None when the head was
    not called once with them), the model's logits at the probe ``(1, 1, V)`` and, on request,
    the last hidden states of every position ``(rows, T, H)``.
    """
    captured: list[Tensor] = []

    def keep_states(module: nn.Module, args: tuple[Any, ...]) -> tuple[Tensor] | None:
        if len(args) != 1 or not isinstance(args[0], Tensor) or args[0].ndim != 3:
            return None
        captured.append(args[0])
        return (args[0][:1, :1],)

    handle = head.register_forward_pre_hook(keep_states)
    try:
        logits, hidden = _run(model, inputs, layout, want_hidden=want_hidden)
    finally:
        handle.remove()
    return (captured[0] if len(captured) == 1 else None), logits, hidden


def _probe_softcap(model: nn.Module, head: nn.Linear, states: Tensor, probe: Tensor) -> tuple[bool, float | None]:
    """Whether the model's logits at the probe are the head applied by hand, and the soft-cap it applied."""
    with torch.no_grad():
        bias = head.bias.to(probe.dtype) if head.bias is not None else None
        by_hand = F.linear(states[:1, :1].to(probe.dtype), head.weight.to(probe.dtype), bias)
        if by_hand.shape == probe.shape and torch.equal(by_hand, probe):
            return True, None
        cap = getattr(text_config(model), "final_logit_softcapping", None)
        if cap is not None and by_hand.shape == probe.shape:
            capped = torch.tanh(by_hand / cap) * cap
            if torch.equal(capped, probe):
                return True, float(cap)
    return False, None


def _chunked_outputs(
    states: Tensor,
    head: nn.Linear,
    dtype: torch.dtype,
    layout: Layout,
    token_ids: Tensor,
    *,
    softcap: float | None,
    temperature: float,
    block_rows: int | None,
    return_entropy: bool,
) -> dict[str, Tensor | None]:
    """Log-probs (and entropies) of the completion tokens from the kept hidden states, in chunks."""
    device = states.device
    mask = layout.mask.to(device)
    rows = layout.source.to(device)[mask]  # (N,): index of the kept position predicting each real token
    flat = states.reshape(-1, states.shape[-1])[rows].to(dtype)  # (N, H)
    bias = head.bias.to(dtype) if head.bias is not None else None
    logps, entropy = head_logprobs(
        flat,
        head.weight.to(dtype),
        token_ids.to(device)[mask],
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        block_rows=block_rows,
        return_entropy=return_entropy,
    )
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    return {
        "logps": zeros.masked_scatter(mask, logps),
        "entropy": zeros.masked_scatter(mask, entropy) if entropy is not None else None,
    }


def _score(
    model: nn.Module,
    inputs: dict[str, Any],
    layout: Layout,
    token_ids: Tensor,
    *,
    logits_mode: LogitsMode,
    block_rows: int | None,
    temperature: float,
    return_entropy: bool,
    return_hidden: bool,
) -> tuple[dict[str, Tensor | None], str]:
    """The forward and the per-token outputs, chunked when possible; the outputs and the path that ran."""
    outs: dict[str, Tensor | None] = {}
    hidden: Tensor | None = None
    if logits_mode == "chunked":
        head, reason = _plain_head(model)
        if head is not None:
            states, probe, hidden = _run_chunked(model, inputs, layout, head, want_hidden=return_hidden)
            agrees, softcap = _probe_softcap(model, head, states, probe) if states is not None else (False, None)
            if agrees:
                assert states is not None
                outs = _chunked_outputs(
                    states,
                    head,
                    probe.dtype,
                    layout,
                    token_ids,
                    softcap=softcap,
                    temperature=temperature,
                    block_rows=block_rows,
                    return_entropy=return_entropy,
                )
            else:
                reason = "the model's logits differ from its LM head's output (a transform after the head?)"
        if not outs:
            _log_once(f"chunked log-probs unavailable: {reason}; computing the full logits (logits_mode='full')")
            logits_mode = "full"
    if logits_mode == "full":
        logits, hidden = _run(model, inputs, layout, want_hidden=return_hidden)
        outs = _token_outputs(logits, layout, token_ids, temperature=temperature, return_entropy=return_entropy)
    if hidden is not None:
        outs.update(_hidden_outputs(hidden, layout))
    return outs, logits_mode


def _layout_and_inputs(
    model: nn.Module,
    prompts: EncodedPrompts,
    completions: Completions,
    mode: Mode,
    pad_token_id: int,
    device: torch.device,
) -> tuple[Mode, Layout, dict[str, Any]]:
    """The mode that runs (``"shared"`` falls back to ``"naive"``, logged once), its layout and the forward's inputs."""
    if mode == "shared":
        reason = sharing_unsupported(model)
        packed = packed_layout(prompts, completions, pad_token_id=pad_token_id) if reason is None else None
        if packed is not None:
            reason = sliding_window_problem(model, packed)
        if reason is None:
            assert packed is not None
            return mode, packed.layout, shared_inputs(model, prompts, packed, device)
        _log_once(reason)
    batch = build_rows(prompts, completions, pad_token_id=pad_token_id)
    return "naive", naive_layout(batch), {k: v.to(device) for k, v in batch.model_inputs().items()}


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
    logits_mode: LogitsMode = "full",
    block_rows: int | None = None,
) -> CompletionLogprobs:
    """Per-token log-probs of ``completions[i][j]`` given prompt ``i``, for every (i, j).

    ``prompts`` come from :func:`vlalign.data.collate.encode_prompts` (one processor call),
    ``completions`` from :func:`~vlalign.data.collate.encode_completions` or from generation
    (token ids, end-of-turn included where it should be scored; k may differ per prompt).
    ``temperature`` divides the logits (RL recipes score at the sampling temperature).
    ``return_hidden`` adds the last hidden states (value heads: at the position predicting each
    token; reward heads: ``last_hidden`` at each completion's last token). ``max_length`` bounds
    prompt + completion (a prompt alone over it is an error, never a truncation).

    ``logits_mode`` picks the LM-head path (module doc): ``"chunked"`` holds the logits of
    ``block_rows`` vocabulary rows at a time (default :data:`~vlalign.models.head_logprobs.BLOCK_ROWS`),
    ``"full"`` materialises the kept logits.

    Gradients flow; wrap the call in ``torch.no_grad()`` for a reference or a rollout score.
    ``mode="shared"`` falls back to ``"naive"`` (logged once, with the reason) for an
    architecture or attention implementation that cannot share prompts.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode not in ("shared", "naive"):
        raise ValueError(f"mode must be 'shared' or 'naive', not {mode!r}")
    if logits_mode not in ("chunked", "full"):
        raise ValueError(f"logits_mode must be 'chunked' or 'full', not {logits_mode!r}")
    check_inputs(model, prompts, completions, max_length)
    device = next(model.parameters()).device
    mode, layout, inputs = _layout_and_inputs(model, prompts, completions, mode, pad_token_id, device)
    token_ids = gather_tokens(layout.input_ids, layout)
    outs, ran = _score(
        model,
        inputs,
        layout,
        token_ids,
        logits_mode=logits_mode,
        block_rows=block_rows,
        temperature=temperature,
        return_entropy=return_entropy,
        return_hidden=return_hidden,
    )
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
        entropy=outs.get("entropy"),
        hidden=outs.get("hidden"),
        last_hidden=outs.get("last_hidden"),
        logits_mode=ran,
    )
