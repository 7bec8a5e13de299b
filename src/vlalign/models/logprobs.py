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
Architectures with layers no mask describes (Qwen3.5's linear attention; ``ArchSupport.cache_sharing``)
share through the cache instead: a prompt pass, its completions continuing from the expanded cache
(:mod:`vlalign.models.prefix_cache`).

``"naive"``: one row per (prompt, completion), the image repeated (what TRL, LLaMA-Factory,
ms-swift, verl and EasyR1 do); kept as the reference and as the fallback.

Both modes run the vocabulary projection on completion positions alone; the speed-up of
``"shared"`` over ``"naive"`` is the prefix sharing alone.

The LM head: ``logits_mode``
----------------------------
``"chunked"`` (what the default ``"auto"`` picks on a CPU for a head of at least
:data:`~vlalign.models.head_logprobs.CHUNKED_MIN_VOCAB` rows, e.g. Qwen's 151,936, and on a GPU
when the full logits would not fit: :func:`~vlalign.models.head_logprobs.auto_logits_mode`): the model's
forward runs with its LM head computing ONE position (a forward pre-hook on the head keeps the
last hidden states of the scored positions and hands the head a single row), and the log-probs
(and entropies) of the completion tokens are computed from
those hidden states by :func:`vlalign.models.head_logprobs.head_logprobs`: the head applied to
one block of vocabulary rows at a time, the backward recomputing each block's logits, so no
``(tokens, vocabulary)`` tensor is ever held (with Qwen's 151,936-token vocabulary, the full
logits and their float32 copies are the largest tensors of a step). The one position the head
still computes is a probe: the model's own output there must equal the head applied by hand
(soft-capped when the text config has ``final_logit_softcapping`` and the model applies it),
which catches a model that changes its logits after the head; the dtype of that output (bf16
under autocast) is the dtype the chunks compute in, so autocast runs stay as exact as the full
path.

``"full"`` (what ``"auto"`` picks below that size, the tiny test models included): the model
computes the kept logits (``logits_to_keep``), then a float32 log-softmax and a gather: the path
before chunking, the reference and the fallback. Below the threshold the logits are small next to
the model's own activations and the chunked path saves nothing worth its extra product. The two
paths agree to float rounding, not bit for bit: a reference scored with one path and a policy
with the other differ by ~1e-7 where two runs of the same path on the same batch give exactly 0.
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
from vlalign.models.arch import cache_sharing, sharing_unsupported, text_config, unwrap
from vlalign.models.head_logprobs import auto_logits_mode, chunked_outputs, plain_head, probe_softcap
from vlalign.models.input_checks import check_inputs
from vlalign.models.memory import cuda_free_bytes
from vlalign.models.moe import RouterCapture, layout_tokens, router_logits_off
from vlalign.models.packed_inputs import packing_problem, shared_inputs, sliding_window_problem
from vlalign.models.packing import Completions, Layout, gather_tokens, naive_layout, packed_layout
from vlalign.models.prefix_cache import cache_sharing_problem, keep_cache_copies, prompt_cache_inputs

logger = logging.getLogger(__name__)

Mode = Literal["shared", "naive"]
LogitsMode = Literal["auto", "chunked", "full"]

_logged: set[str] = set()


def _log_once(message: str, *, info: bool = False, key: str | None = None) -> None:
    """Log ``message`` the first time it (or ``key``, when given) comes."""
    if (key or message) not in _logged:
        _logged.add(key or message)
        (logger.info if info else logger.warning)(message)


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
    router_aux_loss: Tensor | None = None  # MoE: the forward(s)' router loss, None unless the config asks
    router_aux_coef: float | None = None  # its ``router_aux_loss_coef`` (a recipe adds coef * loss: vlalign.models.moe)

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
            if isinstance(getattr(self, f.name), Tensor) and getattr(self, f.name).ndim  # not the batch's aux loss
        }
        return replace(self, **changes)


# ------------------------------------------------------------------------------- the forward


def _run(
    model: nn.Module, inputs: dict[str, Any], layout: Layout, *, want_hidden: bool
) -> tuple[Tensor, Tensor | None]:
    """One forward: the kept logits ``(rows, K, V)`` and, on request, the last hidden states ``(rows, T, H)``."""
    device = inputs["input_ids"].device
    with keep_cache_copies(inputs.get("cache")):  # the cache path's prompt cache (vlalign.models.prefix_cache)
        out = model(
            **inputs,
            logits_to_keep=layout.keep.to(device),
            use_cache="cache" in inputs,
            output_hidden_states=True if want_hidden else None,
            **router_logits_off(model),
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
        head, reason = plain_head(model)
        if head is not None:
            states, probe, hidden = _run_chunked(model, inputs, layout, head, want_hidden=return_hidden)
            agrees, softcap = probe_softcap(model, head, states, probe) if states is not None else (False, None)
            if agrees:
                assert states is not None
                outs = chunked_outputs(
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


def resolve_logits_mode(model: nn.Module, logits_mode: LogitsMode, positions: int = 0) -> LogitsMode:
    """``"auto"`` as the path it means for ``model`` scoring ``positions`` slots
    (:func:`~vlalign.models.head_logprobs.auto_logits_mode`; logged once per path with its reason);
    other modes unchanged."""
    if logits_mode != "auto":
        return logits_mode
    head = unwrap(model).get_output_embeddings()
    rows = int(getattr(head, "out_features", 0) or getattr(text_config(model), "vocab_size", 0) or 0)
    weight = getattr(head, "weight", None)
    device = weight.device if isinstance(weight, Tensor) else torch.device("cpu")
    dtype = weight.dtype if isinstance(weight, Tensor) else torch.float32
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    free = cuda_free_bytes(device) if device.type == "cuda" else None
    chosen, why = auto_logits_mode(device.type, rows, positions, dtype, free)
    _log_once(f"LM head: logits_mode='auto' -> {chosen!r} ({why})", info=True, key=f"logits_mode auto {chosen}")
    return chosen


def _layout_and_inputs(
    model: nn.Module,
    prompts: EncodedPrompts,
    completions: Completions,
    mode: Mode,
    pad_token_id: int,
    device: torch.device,
    pack_length: int | None = None,
) -> tuple[Mode, Layout, dict[str, Any]]:
    """The mode that runs (``"shared"`` falls back to ``"naive"``, logged once), its layout and the forward's inputs."""
    if mode == "shared":
        reason = sharing_unsupported(model)
        if reason is None and cache_sharing(model):  # through the cache (vlalign.models.prefix_cache)
            reason = cache_sharing_problem(model, prompts)
            if reason is None:
                cached = prompt_cache_inputs(model, prompts, completions, pad_token_id=pad_token_id, device=device)
                return mode, cached.layout, cached.inputs
        if pack_length is not None and reason is None and (why := packing_problem(model, prompts)) is not None:
            _log_once(why)
            pack_length = None
        packed = (
            packed_layout(prompts, completions, pad_token_id=pad_token_id, pack_length=pack_length)
            if reason is None
            else None
        )
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
    logits_mode: LogitsMode = "auto",
    block_rows: int | None = None,
    pack_length: int | None = None,
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
    ``"full"`` materialises the kept logits; ``"auto"`` (the default) picks one by the device,
    the head's size and the free memory (:func:`~vlalign.models.head_logprobs.auto_logits_mode`).

    ``pack_length``: consecutive prompts with their completions share rows of at most that many
    tokens (:func:`~vlalign.models.packing.pack_prompts`); useful-token fraction = num_tokens / num_slots.

    Gradients flow; wrap the call in ``torch.no_grad()`` for a reference or a rollout score.
    ``mode="shared"`` falls back to ``"naive"`` (logged once, with the reason) for an
    architecture or attention implementation that cannot share prompts.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode not in ("shared", "naive"):
        raise ValueError(f"mode must be 'shared' or 'naive', not {mode!r}")
    if logits_mode not in ("chunked", "full", "auto"):
        raise ValueError(f"logits_mode must be 'chunked' or 'full' (or 'auto'), not {logits_mode!r}")
    check_inputs(model, prompts, completions, max_length)
    device = next(model.parameters()).device
    with RouterCapture(model) as routers:  # MoE: the router logits of the forward(s) (vlalign.models.moe)
        mode, layout, inputs = _layout_and_inputs(model, prompts, completions, mode, pad_token_id, device, pack_length)
        token_ids = gather_tokens(layout.input_ids, layout)
        logits_mode = resolve_logits_mode(model, logits_mode, positions=layout.mask.numel())
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
    routed = routers.result(layout_tokens(layout).to(device))
    prompt_slots = len(prompts) * (inputs["attention_mask"].shape[1] - width) if "cache" in inputs else 0  # its pass
    return CompletionLogprobs(
        logps=outs["logps"],
        mask=layout.mask.to(device),
        token_ids=token_ids.to(device),
        row_prompt=layout.row_prompt.to(device),
        row_completion=layout.row_completion.to(device),
        mode=mode,
        num_tokens=layout.num_tokens,
        num_slots=rows * width + prompt_slots,
        entropy=outs.get("entropy"),
        hidden=outs.get("hidden"),
        last_hidden=outs.get("last_hidden"),
        logits_mode=ran,
        router_aux_loss=routed.router_aux_loss,
        router_aux_coef=routed.router_aux_coef,
    )
