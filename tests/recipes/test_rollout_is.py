"""Truncated importance sampling in the GRPO/PPO surrogate (update.rollout_is_cap, engine log-probs)."""

from __future__ import annotations

import math

import torch

from vlalign.models.logprobs import CompletionLogprobs
from vlalign.recipes.rl_common import PolicyUpdateConfig
from vlalign.recipes.rl_update import UpdateContext, surrogate_loss
from vlalign.recipes.rollouts import Rollouts


def _part(engine_logps: torch.Tensor | None) -> Rollouts:
    """One prompt, two completions (2 tokens and 1 token), advantages (1, 1); surrogate_loss reads
    only the per-row tensors, so the prompt encoding is left out."""
    return Rollouts(
        samples=[None],  # type: ignore[list-item]
        prompts=None,  # type: ignore[arg-type]
        token_ids=[[[1, 2], [3]]],
        texts=[["a", "b"]],
        stopped=[[True, True]],
        group_size=2,
        advantages=torch.tensor([1.0, 1.0]),
        engine_logps=engine_logps,
    )


def test_surrogate_is_scaled_by_truncated_weights() -> None:
    """On-policy (old = current log-probs), every ratio is 1 and the clipped surrogate of a token is -A = -1.
    Trainer p (0.5, 0.2 | 0.3), engine p (0.25, 0.1 | 0.6): ratios 2, 2 | 0.5, capped at 1.5:
    weights 1.5, 1.5 | 0.5. Token-mean over 3 tokens: with TIS (-1.5 - 1.5 - 0.5) / 3 = -7/6, capped
    share 2/3; without the option, or without engine log-probs (hf engine): (-1 - 1 - 1) / 3 = -1."""
    out = CompletionLogprobs(
        logps=torch.log(torch.tensor([[0.5, 0.2], [0.3, 1.0]])),
        mask=torch.tensor([[True, True], [True, False]]),
        token_ids=torch.tensor([[1, 2], [3, -100]]),
        row_prompt=torch.tensor([0, 0]),
        row_completion=torch.tensor([0, 1]),
        mode="shared",
        num_tokens=3,
        num_slots=3,
    )
    engine = torch.log(torch.tensor([[0.25, 0.1], [0.6, 1.0]]))
    ctx = UpdateContext(temperature=1.0, pad_token_id=0, micro_batches=1, norm_length=2, seed=0, step=0)
    norms = {"num_tokens": torch.tensor(3.0), "num_sequences": torch.tensor(2.0)}
    tis = PolicyUpdateConfig(rollout_is_cap=1.5)
    loss, metrics = surrogate_loss(out, _part(engine), tis, ctx, norms)
    assert math.isclose(loss.item(), -7 / 6, rel_tol=1e-6)
    assert math.isclose(metrics["rollout_is/capped_frac"].item(), 2 / 3, rel_tol=1e-6)
    plain, metrics = surrogate_loss(out, _part(engine), PolicyUpdateConfig(), ctx, norms)
    assert math.isclose(plain.item(), -1.0, rel_tol=1e-6) and "rollout_is/capped_frac" not in metrics
    hf, _ = surrogate_loss(out, _part(None), tis, ctx, norms)
    assert math.isclose(hf.item(), -1.0, rel_tol=1e-6)
