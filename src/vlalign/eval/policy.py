"""Policy-level metrics: KL divergence from a reference policy, and win rate under a scorer.

**KL from the reference** on held-out prompts: completions y are sampled from the policy pi at
temperature 1 (no top-p, so that they are draws from pi itself), and per token
``d_t = log pi(y_t | x, y_<t) - log ref(y_t | x, y_<t)``. Reported:

- ``kl`` = mean over completions of ``sum_t d_t`` (Schulman's k1 summed over the sequence, an
  unbiased estimate of KL(pi || ref) per completion, in nats; it can come out slightly negative
  on a small sample);
- ``kl_token_k3`` = mean over tokens of ``exp(-d_t) + d_t - 1`` (k3, never negative, per token).

Log-probs are computed the simple way (:func:`completion_token_logprobs`: one right-padded row per
completion, the image repeated, one forward); the end-of-turn token of a completion that stopped
is scored too. When the shared-prefix engine (:mod:`vlalign.models.logprobs`) is settled, this
function should call it instead (the numbers are the same; it only saves compute).

**Win rate** of responses A over responses B to the same prompts under a scorer (a reward
model, the ground truth, a claim verifier: any ``(samples, completions) -> scores``):
``mean(1 if s_A > s_B, 1/2 if equal, 0 otherwise)``.

**Which engine generates** (``vlalign eval --engine``): every answer and KL rollout of the evaluation
goes through :func:`generate_answers`, vlalign's decode loop by default; inside
:func:`generation_engine` with ``engine="vllm"`` a vLLM engine on the model's folder generates
instead (greedy answers equal the ``hf`` engine's; docs/vllm.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlalign.data.collate import IGNORE_INDEX, build_rows, encode_prompts, pad_token_id_of
from vlalign.data.schema import PromptSample
from vlalign.models.generate import Generations, generate
from vlalign.models.vllm_engine import VLLMEngine, VLLMOptions
from vlalign.rewards.combine import BatchScorer

_ENGINE: ContextVar[VLLMEngine | None] = ContextVar("vlalign_eval_engine", default=None)
"""The vLLM engine :func:`generate_answers` uses (set by :func:`generation_engine`), None: the hf engine."""


@contextmanager
def generation_engine(
    engine: str, model_path: str | Path, model: nn.Module, processor: Any, *, options: VLLMOptions | None = None
) -> Iterator[None]:
    """Within the block, :func:`generate_answers` generates with ``engine``: ``hf`` (vlalign's loop on
    ``model``) or ``vllm`` (an engine started on ``model_path``, ``model``'s folder, closed on exit)."""
    if engine != "vllm":
        yield
        return
    vllm = VLLMEngine(model_path, processor, dtype=next(model.parameters()).dtype, options=options or VLLMOptions())
    token = _ENGINE.set(vllm)
    try:
        yield
    finally:
        _ENGINE.reset(token)
        vllm.close()


def generate_answers(model: nn.Module, processor: Any, samples: Sequence[Any], **kwargs: Any) -> Generations:
    """:func:`vlalign.models.generate.generate` (same arguments), or the vLLM engine of the enclosing
    :func:`generation_engine` (``progress`` and ``desc`` do not apply to it)."""
    engine = _ENGINE.get()
    if engine is None:
        return generate(model, processor, samples, **kwargs)
    kwargs.pop("progress", None)
    kwargs.pop("desc", None)
    return engine.generate(model, list(samples), **kwargs)


@torch.no_grad()
def completion_token_logprobs(
    model: nn.Module,
    processor: Any,
    samples: Sequence[Any],
    token_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
) -> list[Tensor]:
    """Per-token log-probs ``(len(token_ids[i]),)`` of completion ``token_ids[i]`` given prompt i."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad = pad_token_id_of(processor)
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        for lo in range(0, len(samples), batch_size):
            prompts = encode_prompts(processor, samples[lo : lo + batch_size])
            comps = [[list(ids)] for ids in token_ids[lo : lo + batch_size]]
            batch = build_rows(prompts, comps, pad_token_id=pad)
            inputs = {
                k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                for k, v in batch.model_inputs().items()
            }
            logits = model(**inputs).logits[:, :-1].float()  # (R, T-1, V)
            labels = batch.labels[:, 1:].to(device)  # (R, T-1)
            mask = labels != IGNORE_INDEX
            logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out.extend(row[m].cpu() for row, m in zip(logp, mask))
    finally:
        model.train(was_training)
    return out


def kl_from_logprobs(policy: Sequence[Tensor], reference: Sequence[Tensor]) -> dict[str, float]:
    """``kl`` (mean sequence k1) and ``kl_token_k3`` from per-token log-probs of the same tokens."""
    if len(policy) != len(reference) or not policy:
        raise ValueError(f"need the same, non-zero number of completions, got {len(policy)} and {len(reference)}")
    seq = torch.stack([(p.double() - r.double()).sum() for p, r in zip(policy, reference)])
    d = torch.cat([p.double() - r.double() for p, r in zip(policy, reference)])  # log pi - log ref
    k3 = torch.exp(-d) + d - 1 if d.numel() else torch.zeros(1, dtype=torch.float64)
    return {"kl": float(seq.mean()), "kl_token_k3": float(k3.mean())}


def kl_divergence(
    policy: nn.Module,
    reference: nn.Module,
    processor: Any,
    samples: Sequence[PromptSample],
    *,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, float]:
    """KL(policy || reference) on ``samples``' prompts (see the module doc); both models share
    ``processor``. Also returns ``kl_n`` (completions) and ``kl_tokens`` (tokens scored)."""
    gens = generate_answers(
        policy,
        processor,
        samples,
        n=1,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        desc="kl rollouts",
    )
    ids = [g[0] for g in gens.token_ids]
    keep = [i for i, x in enumerate(ids) if x]
    chosen = [samples[i] for i in keep]
    ids = [ids[i] for i in keep]
    lp_policy = completion_token_logprobs(policy, processor, chosen, ids, batch_size=batch_size)
    lp_ref = completion_token_logprobs(reference, processor, chosen, ids, batch_size=batch_size)
    out = kl_from_logprobs(lp_policy, lp_ref)
    out.update({"kl_n": float(len(ids)), "kl_tokens": float(sum(len(x) for x in ids))})
    return out


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Share of prompts where A scores higher than B, ties counting one half."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"need the same, non-zero number of scores, got {len(scores_a)} and {len(scores_b)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)) / len(scores_a)


def scored_win_rate(
    scorer: BatchScorer, samples: Sequence[Any], texts_a: Sequence[str], texts_b: Sequence[str]
) -> dict[str, float]:
    """Win rate of ``texts_a`` over ``texts_b`` (answers to ``samples``) under ``scorer``, with the
    mean score of each side (``score_a``, ``score_b``) and the share of identical answers (``same``).

    Identical answers tie. A batched scorer pads each answer to the longest one in its batch, and
    the padding changes the last bits of a score, so the same text scored in two batches can differ
    by a few times 1e-7: compared as floats, every unchanged answer would count as a coin-flip win
    or loss instead of one half."""
    a = [float(x) for x in scorer(samples, texts_a)]
    b = [float(x) for x in scorer(samples, texts_b)]
    same = [x == y for x, y in zip(texts_a, texts_b)]
    b_tied = [x if s else y for x, y, s in zip(a, b, same)]
    return {
        "win_rate": win_rate(a, b_tied),
        "score_a": sum(a) / len(a),
        "score_b": sum(b) / len(b),
        "same": sum(same) / len(same),
    }
