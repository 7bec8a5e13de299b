"""Per-token log-probs (and entropies) straight from hidden states, the vocabulary in chunks.

A causal language model's logits for N scored tokens are an ``(N, V)`` tensor: with a real
vocabulary (Qwen: V = 151,936) and a float32 log-softmax, it and the copies that autograd keeps
(the float logits, the log-softmax output, their gradients) are the largest tensors of a
preference or RL step. :func:`head_logprobs` never holds them: it applies the LM head to one
block of ``block_rows`` vocabulary rows at a time (default :data:`BLOCK_ROWS`), for all N tokens
at once. The blocks depend on the vocabulary alone, never on N (the order of the sums over the
vocabulary is then the same whatever N is; the matrix product itself may still round a lone row
differently from a batch on a CPU). The forward keeps, per
token and block, the maximum, the sum of exponentials and (for the entropy) their first moment,
and combines the blocks at the end; only the log-probs, the log-sum-exp and the entropies
(``(N,)`` each) are saved. The backward recomputes the logits block by block from the saved
hidden states, turns them into the logits' gradient, writes that block of the head's weight (and
bias) gradient once and adds its share to the hidden states' gradient. Peak memory for the head
is then a few ``N x block_rows`` tensors instead of ``N x V``; the price is one more
``(N, H) x (H, V)`` product in the backward pass (the recomputation). Blocking by vocabulary
rows rather than by tokens keeps every product as wide as N: with token chunks, every chunk
re-reads the whole ``(V, H)`` weight (and in the backward re-writes its gradient), a memory-bound
sweep that cost more than the products on a CPU.

The math, for one token with logits ``y = h W^T + b`` (in the weights' dtype), optional
soft-capping ``y <- c tanh(y / c)`` (Gemma-style, in the same dtype), and temperature ``T``:
``z = float(y) / T``, ``lse = log sum_v exp(z_v)``, ``log p_v = z_v - lse``,

- log-prob of target ``t``: ``z_t - lse``;
- entropy: ``H = -sum_v p_v log p_v``;
- gradients: ``dlogp_t / dz_v = [v = t] - p_v``, ``dH / dz_v = -p_v (log p_v + H)``; then
  ``dz/dy = 1 / T`` (times ``1 - tanh^2(y_raw / c)`` when capped), ``dL/dh = dL/dy W``,
  ``dL/dW = (dL/dy)^T h``, ``dL/db = sum over tokens of dL/dy``.

Every step is the same operation, in the same dtype, as autograd's for
``log_softmax(float(linear(h)) / T)`` followed by a gather (the "full" path of
:mod:`vlalign.models.logprobs`); only the order of the sums over the vocabulary differs (by
block), so the two agree to float rounding (tested in ``tests/models/test_head_logprobs.py``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlalign.models.arch import text_config, unwrap
from vlalign.models.packing import Layout

BLOCK_ROWS = 8192
"""Default vocabulary rows per block: 19 blocks for Qwen's 151,936 tokens; 32 MiB of float32
logits per block for 1,024 scored tokens (the full path holds 594 MiB for them)."""

CHUNKED_MIN_VOCAB = 32_768
"""Off CUDA, ``logits_mode="auto"`` picks the chunked path from this many vocabulary rows up
(Qwen's 151,936, Gemma3's 262,208, Idefics3's 49,152; LLaVA-1.5's 32,000 and the tiny test models
stay on the full path). Below it, the logits of a step are small next to the model's own
activations and the chunked path saves nothing worth its extra matrix product."""

FULL_LOGITS_MAX_SHARE = 0.25
"""On CUDA, ``logits_mode="auto"`` keeps the full logits while their estimate
(:func:`full_logits_bytes`) is at most this share of the device's free memory, and chunks above
it. A GPU runs the full path's few large kernels faster than the chunked path's many small ones
(an H100 in bf16: GRPO 2 x 8 on ``bench-vocab`` 1.34x slower chunked), so the chunked head pays
there only for the memory it saves; the other three quarters are left to the model's own
activations, which the estimate does not count."""

FULL_LOGITS_BYTES_PER_ENTRY_F32 = 12
"""Float32 bytes per (position, vocabulary row) entry that the full path holds besides two copies
in the head's dtype: the float32 copy, its division by the temperature and the log-softmax output
(saved for the backward). See :func:`full_logits_bytes`."""


def full_logits_bytes(positions: int, vocab: int, dtype: torch.dtype) -> int:
    """An upper bound of the memory the full path's logits take for ``positions`` scored slots.

    The full path (:mod:`vlalign.models.logprobs`) creates, per position and vocabulary row: the
    model's kept logits and their gathered copy, in ``dtype`` (the head's, or the autocast dtype),
    then the float32 copy, its division by the temperature and the log-softmax output that
    autograd keeps: ``positions x vocab x (2 x itemsize + 12)`` bytes, the sum of all of them
    although not all are alive at once (in float32 the float copy is no copy at all). The DPO
    step of ``benchmarks/layouts.py`` on ``bench-vocab`` (280 slots, float32: 811 MiB by this
    bound) peaked at 571 MiB of activations in that forward, the model's own included. The
    backward's gradients of the same shapes replace these tensors; they do not add to them.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return positions * vocab * (2 * itemsize + FULL_LOGITS_BYTES_PER_ENTRY_F32)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def auto_logits_mode(
    device_type: str, vocab: int, positions: int, dtype: torch.dtype, free_bytes: int | None
) -> tuple[Literal["chunked", "full"], str]:
    """What ``logits_mode="auto"`` means, ``("chunked" | "full", why)``: a pure function of its inputs.

    ``device_type`` the head's device (``"cpu"``, ``"cuda"`` ...), ``vocab`` its rows,
    ``positions`` the slots the full path would score (``R x L``, padding included), ``dtype``
    the logits' dtype, ``free_bytes`` the device's free memory (CUDA; None when unknown).

    - Off CUDA: chunked from :data:`CHUNKED_MIN_VOCAB` rows up (on a CPU the chunked head is
      faster and smaller at every size measured: the full logits' passes are memory-bound).
    - On CUDA: full while :func:`full_logits_bytes` is at most :data:`FULL_LOGITS_MAX_SHARE` of
      ``free_bytes``, else chunked; with ``free_bytes`` unknown, the rule off CUDA.
    """
    if device_type != "cuda" or free_bytes is None:
        chosen: Literal["chunked", "full"] = "chunked" if vocab >= CHUNKED_MIN_VOCAB else "full"
        return chosen, f"{vocab:,} rows, chunked from {CHUNKED_MIN_VOCAB:,} rows on {device_type}"
    need, limit = full_logits_bytes(positions, vocab, dtype), FULL_LOGITS_MAX_SHARE * free_bytes
    size = f"{positions:,} positions x {vocab:,} rows in {str(dtype).removeprefix('torch.')}"
    if need <= limit:
        return (
            "full",
            f"full logits {_gib(need)} ({size}) within {FULL_LOGITS_MAX_SHARE:.0%} of {_gib(free_bytes)} free",
        )
    return "chunked", f"full logits {_gib(need)} ({size}) over {FULL_LOGITS_MAX_SHARE:.0%} of {_gib(free_bytes)} free"


def _chunk_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None
) -> tuple[Tensor, Tensor | None]:
    """Logits of a chunk in the weights' dtype (soft-capped) and, when capped, ``tanh(y / c)``."""
    y = F.linear(hidden, weight, bias)  # (C, V)
    if softcap is None:
        return y, None
    squashed = torch.tanh(y / softcap)
    return squashed * softcap, squashed


def _blocked_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    softcap: float | None,
    rows: int,
    return_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs, log-sum-exp and entropies ``(N,)`` from blocks of vocabulary rows.

    Per block b: its maximum ``m_b``, ``s_b = sum exp(z - m_b)`` and ``u_b = sum exp(z - m_b) z``;
    then ``lse = M + log S`` with ``M = max_b m_b``, ``S = sum_b s_b exp(m_b - M)``, and
    ``H = lse - U / S`` with ``U = sum_b u_b exp(m_b - M)`` (``sum_v p_v z_v = U / S``).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    f32 = {"dtype": torch.float32, "device": hidden.device}
    starts = list(range(0, vocab, rows))
    maxes, sums = torch.empty((n, len(starts)), **f32), torch.empty((n, len(starts)), **f32)
    moments = torch.empty((n, len(starts)), **f32) if return_entropy else None
    target_logits = torch.empty(n, **f32)
    for i, v0 in enumerate(starts):
        v1 = min(v0 + rows, vocab)
        y, _ = _chunk_logits(hidden, weight[v0:v1], bias[v0:v1] if bias is not None else None, softcap)
        z = y.float()  # (N, V_b); y is ours to overwrite (z is y itself in float32)
        del y
        if temperature != 1.0:  # x / 1 == x exactly: skip the pass
            z.div_(temperature)
        hit = ((targets >= v0) & (targets < v1)).nonzero().squeeze(-1)
        target_logits[hit] = z[hit, targets[hit] - v0]
        maxes[:, i] = z.max(dim=-1).values
        # without the entropy, z is not needed after its exponentials: compute them in place
        e = (z - maxes[:, i, None]).exp_() if moments is not None else z.sub_(maxes[:, i, None]).exp_()
        sums[:, i] = e.sum(-1)
        if moments is not None:
            moments[:, i] = (e * z).sum(-1)
        del z, e
    top = maxes.max(dim=-1).values  # (N,)
    scale = (maxes - top[:, None]).exp_()
    total = (sums * scale).sum(-1)
    lse = top + total.log()
    entropy = lse - (moments * scale).sum(-1) / total if moments is not None else torch.zeros(0, **f32)
    return target_logits - lse, lse, entropy


class _HeadLogprobs(torch.autograd.Function):
    """Autograd of :func:`head_logprobs`: saves the hidden states and the per-token log-sum-exp only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float,
        softcap: float | None,
        block_rows: int,
        return_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        logps, lse, entropy = _blocked_forward(
            hidden, weight, bias, targets, temperature, softcap, block_rows, return_entropy
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.softcap, ctx.block_rows, ctx.return_entropy = (
            temperature,
            softcap,
            block_rows,
            return_entropy,
        )
        return logps, entropy

    @staticmethod
    def backward(ctx: Any, grad_logps: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab, temperature = weight.shape[0], ctx.temperature
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b and bias is not None else None
        rows = ctx.block_rows
        g_logp = grad_logps[:, None].float()
        for v0 in range(0, vocab, rows):
            v1 = min(v0 + rows, vocab)
            w = weight[v0:v1]
            y, squashed = _chunk_logits(hidden, w, bias[v0:v1] if bias is not None else None, ctx.softcap)
            logp = y.float()  # (N, V_b), y itself in float32
            del y
            if temperature != 1.0:
                logp.div_(temperature)
            logp.sub_(lse[:, None])  # log p
            p = logp.exp() if ctx.return_entropy else logp.exp_()  # logp is not needed without the entropy
            # dL/dz = g_logp ([v = t] - p) + g_ent (-p (log p + H))
            if ctx.return_entropy:
                grad_z = logp.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])
                grad_z.sub_(p.mul_(g_logp))
            else:
                grad_z = p.mul_(-g_logp)
            hit = ((targets >= v0) & (targets < v1)).nonzero().squeeze(-1)
            grad_z.index_put_((hit, targets[hit] - v0), g_logp[hit, 0], accumulate=True)
            grad_y = (grad_z.div_(temperature) if temperature != 1.0 else grad_z).to(weight.dtype)
            del grad_z, logp, p
            if squashed is not None:
                grad_y = grad_y * (1 - squashed * squashed)
            if grad_h is not None:
                grad_h += grad_y @ w
            if grad_w is not None:  # written in place: no (V_b, H) temporary and copy per block
                torch.mm(grad_y.t(), hidden, out=grad_w[v0:v1])
            if grad_b is not None:
                grad_b[v0:v1] = grad_y.sum(0)
        return (grad_h.to(hidden.dtype) if grad_h is not None else None), grad_w, grad_b, None, None, None, None, None


def head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    block_rows: int | None = None,
    return_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``targets`` under ``softmax(LM head(hidden) / temperature)``, chunk by chunk.

    ``hidden`` ``(N, H)`` are the last hidden states of the positions predicting each target,
    ``weight`` ``(V, H)`` (and ``bias`` ``(V,)``) the LM head, ``targets`` ``(N,)`` token ids.
    ``softcap`` soft-caps the logits (``c tanh(y / c)``) as Gemma-family heads configured with
    ``final_logit_softcapping`` do. Returns float32 log-probs ``(N,)`` and, with
    ``return_entropy``, entropies ``(N,)`` (else None). ``block_rows`` vocabulary rows are
    computed at a time (default :data:`BLOCK_ROWS`). Differentiable in ``hidden``, ``weight``
    and ``bias``; no ``(N, V)`` tensor is kept for the backward pass (see the module doc).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    size = block_rows if block_rows is not None else BLOCK_ROWS
    if size < 1:
        raise ValueError(f"block_rows must be >= 1, got {size}")
    logps, entropy = _HeadLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), softcap, int(size), return_entropy
    )
    return logps, (entropy if return_entropy else None)


# ------------------------------------------------------- the engine's chunked path (models.logprobs)


def plain_head(model: nn.Module) -> tuple[nn.Linear | None, str | None]:
    """The LM head when the chunked path can apply it by hand; else None and the reason."""
    head = unwrap(model).get_output_embeddings()
    if type(head) is not nn.Linear:
        return None, f"the LM head is a {type(head).__name__}, not a plain nn.Linear (an adapter on the head?)"
    weight = head.weight
    if weight.ndim != 2 or weight.numel() == 0 or hasattr(weight, "ds_id") or "DTensor" in type(weight.data).__name__:
        return None, "the LM head's weight is sharded (DeepSpeed ZeRO-3 or FSDP)"
    return head, None


def probe_softcap(model: nn.Module, head: nn.Linear, states: Tensor, probe: Tensor) -> tuple[bool, float | None]:
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


def chunked_outputs(
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
    """Log-probs (and entropies) ``(R, L)`` of a layout's completion tokens from the kept hidden states.

    ``states`` ``(rows, K, H)`` are the last hidden states at the kept positions (the LM head's
    input that :mod:`vlalign.models.logprobs` captures); zeros on padding entries.
    """
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
