"""Truncated importance weights of the trainer over the rollout engine (hand-worked numbers)."""

from __future__ import annotations

import math

import pytest
import torch

from vlalign.losses import truncated_is_weights


def test_truncated_is_weights_hand_worked() -> None:
    """Row 0: trainer log-probs (log 0.5, log 0.2), engine (log 0.25, log 0.4): ratios 0.5/0.25 = 2 and
    0.2/0.4 = 0.5; with cap 1.5 the first becomes 1.5. Row 1: one real token with ratio
    0.3/0.3 = 1, then padding (whatever it holds, even inf) gets weight 0.
    Metrics over the 3 real tokens: mean raw weight (2 + 0.5 + 1) / 3 = 7/6; capped 1/3;
    mean |log ratio| = (log 2 + log 2 + 0) / 3."""
    trainer = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.3), float("inf")]], dtype=torch.float64)
    engine = torch.tensor([[math.log(0.25), math.log(0.4)], [math.log(0.3), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    weights, metrics = truncated_is_weights(trainer, engine, mask, cap=1.5)
    expected = torch.tensor([[1.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12)
    assert metrics["rollout_is/weight_mean"].item() == pytest.approx(7 / 6, rel=1e-12)
    assert metrics["rollout_is/capped_frac"].item() == pytest.approx(1 / 3, rel=1e-12)
    assert metrics["rollout_is/log_ratio_abs"].item() == pytest.approx(2 * math.log(2) / 3, rel=1e-12)


def test_truncated_is_weights_are_detached_and_one_when_engines_agree() -> None:
    """Equal log-probs give weight exactly 1 on real tokens; no gradient flows through the weights."""
    logp = torch.log(torch.tensor([[0.1, 0.7, 0.9]])).requires_grad_(True)
    weights, _ = truncated_is_weights(logp, logp.detach().clone(), torch.tensor([[1, 1, 0]]), cap=2.0)
    assert weights.tolist() == [[1.0, 1.0, 0.0]]
    assert not weights.requires_grad


def test_truncated_is_weights_rejects_bad_input() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        truncated_is_weights(x, torch.zeros(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(x, x, torch.ones(2, 3), cap=0.0)
