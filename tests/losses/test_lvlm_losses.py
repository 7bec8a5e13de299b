"""Tests of the LVLM objectives (mDPO, DDPO/RLHF-V, HSA-DPO, POVID) and the Bradley-Terry loss."""

from __future__ import annotations

import math

import pytest
import torch

from vlalign.losses import (
    ALL_PREFERENCE_LOSSES,
    PreferenceLogps,
    bradley_terry_loss,
    combine_losses,
    ddpo_sequence_logps,
    ddpo_token_weights,
    differing_segments,
    dpo_loss,
    hsa_dpo_loss,
    mdpo_loss,
    nll_loss,
    povid_loss,
)

LN3 = math.log(3.0)
F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def mdpo_pair(corrupted: float = -3.0) -> PreferenceLogps:
    """r_w = 1, r_l = −1 and r(y_w | m') = corrupted − (−3)."""
    return PreferenceLogps(
        t(-2.0), t(-4.0), t(-3.0), t(-3.0), corrupted_chosen_logps=t(corrupted), ref_corrupted_chosen_logps=t(-3.0)
    )


def test_mdpo_hand_value() -> None:
    """β = ln 3, r_w = 1, r_l = −1, r(y_w|m') = 0:
    DPO term −log σ(2 ln 3) = ln(10/9); conditional −log σ(ln 3 − 0) = ln(4/3);
    anchor −log σ(ln 3) = ln(4/3). Total ln(10/9) + 2 ln(4/3)."""
    out = mdpo_loss(mdpo_pair(), beta=LN3)
    torch.testing.assert_close(out.losses, t(math.log(10 / 9) + 2 * math.log(4 / 3)), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.metrics["rewards/conditional_margin"], torch.tensor(LN3, dtype=F64))
    assert out.metrics["rewards/conditional_accuracy"].item() == 1.0


def test_mdpo_anchor_delta_and_reduction_to_dpo() -> None:
    """δ = ln 3 makes the anchor −log σ(0) = ln 2; with both extra weights 0 mDPO is DPO exactly."""
    out = mdpo_loss(mdpo_pair(), beta=LN3, anchor_delta=LN3, conditional_weight=0.0)
    torch.testing.assert_close(out.losses, t(math.log(10 / 9) + math.log(2)), rtol=0, atol=1e-15)
    plain = mdpo_loss(mdpo_pair(-1.7), beta=0.3, conditional_weight=0.0, anchor_weight=0.0).losses
    torch.testing.assert_close(plain, dpo_loss(mdpo_pair(-1.7), beta=0.3).losses, rtol=0, atol=0)
    with pytest.raises(ValueError, match="corrupted_chosen_logps"):
        mdpo_loss(PreferenceLogps(t(-1.0), t(-2.0), t(-1.0), t(-2.0)))


def test_ddpo_hand_value() -> None:
    """Token log-probs (−1, −2, −3, pad), the middle token in a differing segment, γ = 5:
    weighted sum −1 − 10 − 3 = −14 over N = 1 + 5 + 1 = 7 ⇒ −2 (normalised) or −14."""
    token_logps = t(-1.0, -2.0, -3.0, 123.0).unsqueeze(0)
    mask = torch.tensor([[True, True, True, False]])
    segment = torch.tensor([[False, True, False, True]])
    torch.testing.assert_close(ddpo_sequence_logps(token_logps, mask, segment, gamma=5.0), t(-2.0), rtol=0, atol=0)
    torch.testing.assert_close(
        ddpo_sequence_logps(token_logps, mask, segment, gamma=5.0, normalize=False), t(-14.0), rtol=0, atol=0
    )
    assert ddpo_token_weights(mask, segment, gamma=5.0).tolist() == [[1.0, 5.0, 1.0, 0.0]]
    # γ = 2.7 stays exact in float64: (−1 − 2·2.7 − 3) / (1 + 2.7 + 1)
    torch.testing.assert_close(
        ddpo_sequence_logps(token_logps, mask, segment, gamma=2.7), t((-1 - 5.4 - 3) / 4.7), rtol=1e-15, atol=0
    )


def test_ddpo_gamma_one_is_sum_and_mean_and_padding_is_ignored() -> None:
    """γ = 1: the unnormalised form is the masked sum, the normalised one the masked mean; nan/inf
    on padding change nothing."""
    gen = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(4, 7, generator=gen, dtype=F64)
    mask = torch.rand(4, 7, generator=gen) > 0.3
    mask[:, 0] = True
    segment = torch.rand(4, 7, generator=gen) > 0.5
    dirty = torch.where(mask, token_logps, torch.tensor(float("nan"), dtype=F64))
    summed = (token_logps * mask).sum(-1)
    torch.testing.assert_close(ddpo_sequence_logps(dirty, mask, segment, gamma=1.0, normalize=False), summed)
    torch.testing.assert_close(ddpo_sequence_logps(dirty, mask, segment, gamma=1.0), summed / mask.sum(-1))


def test_differing_segments_hand_cases() -> None:
    """[1 2 3 4 5 6 7 8] vs [1 2 3 9 9 6 7 8]: common blocks "1 2 3" and "6 7 8" (3 tokens each);
    positions 3-4 differ on both sides. A shared single token (10) inside a rewrite is shorter than
    min_match_size = 3, so it stays in the differing segment; with min_match_size = 1 it matches."""
    chosen_diff, rejected_diff = differing_segments([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 9, 6, 7, 8])
    assert chosen_diff.tolist() == [False, False, False, True, True, False, False, False]
    assert rejected_diff.tolist() == [False, False, False, True, True, False, False, False]
    chosen_diff, rejected_diff = differing_segments([1, 2, 3, 4, 10, 6, 7, 8, 9], [1, 2, 3, 5, 10, 5, 7, 8, 9])
    assert chosen_diff.tolist() == [False, False, False, True, True, True, False, False, False]
    assert rejected_diff.tolist() == [False, False, False, True, True, True, False, False, False]
    chosen_diff, _ = differing_segments([1, 2, 3, 4, 10, 6, 7, 8, 9], [1, 2, 3, 5, 10, 5, 7, 8, 9], min_match_size=1)
    assert chosen_diff.tolist() == [False, False, False, True, False, True, False, False, False]
    inserted, shorter = differing_segments([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8])
    assert not inserted.any() and shorter.tolist() == [False] * 6 + [True, True]


def test_hsa_dpo_hand_value_and_reduction() -> None:
    """Severity w_r = 2: logits = r_w − 2·r_l = 1 + 2 = 3; β = ln3/3 ⇒ L = −log σ(ln 3) = ln(4/3).
    Severity 1 is plain DPO."""
    logps = PreferenceLogps(t(-2.0), t(-4.0), t(-3.0), t(-3.0))
    out = hsa_dpo_loss(logps, beta=LN3 / 3, severity=t(2.0))
    torch.testing.assert_close(out.losses, t(math.log(4 / 3)), rtol=0, atol=1e-15)
    plain = dpo_loss(logps, beta=0.4).losses
    torch.testing.assert_close(hsa_dpo_loss(logps, beta=0.4).losses, plain, rtol=0, atol=0)


def test_hsa_dpo_with_lm_term_through_combine() -> None:
    """The authors' auxiliary LM loss is the registry's ``nll`` term: HSA + γ·NLL."""
    logps = PreferenceLogps(t(-2.0, -1.0), t(-4.0, -3.0), t(-3.0, -1.5), t(-3.0, -2.0), t(2.0, 4.0), t(3.0, 3.0))
    severity = t(1.5, 0.5)
    out = combine_losses(
        logps,
        weights={"hsa_dpo": 1.0, "nll": 0.2},
        beta=0.1,
        options={"hsa_dpo": {"severity": severity}},
        registry=ALL_PREFERENCE_LOSSES,
    )
    manual = hsa_dpo_loss(logps, beta=0.1, severity=severity).losses + 0.2 * nll_loss(logps).losses
    torch.testing.assert_close(out.losses, manual, rtol=0, atol=1e-15)


def test_povid_hand_value_and_equivalence() -> None:
    """β = ln 3, r_w = 1; negative 1 has r = −1 (β·h = 2 ln 3 ⇒ ln(10/9)), negative 2 has r = 1
    (h = 0 ⇒ ln 2). L = ½·ln(10/9) + ½·ln 2; and it equals 0.5·DPO(pair 1) + 0.5·DPO(pair 2)."""
    logps = PreferenceLogps(t(-2.0), torch.tensor([[-4.0, -2.0]], dtype=F64), t(-3.0), t(-3.0, -3.0).unsqueeze(0))
    out = povid_loss(logps, beta=LN3)
    torch.testing.assert_close(out.losses, t(0.5 * math.log(10 / 9) + 0.5 * math.log(2)), rtol=0, atol=1e-15)
    assert out.metrics["rewards/accuracy"].item() == 0.5  # one negative of two ranked strictly below
    pair1 = PreferenceLogps(t(-2.0), t(-4.0), t(-3.0), t(-3.0))
    pair2 = PreferenceLogps(t(-2.0), t(-2.0), t(-3.0), t(-3.0))
    manual = 0.5 * dpo_loss(pair1, beta=LN3).losses + 0.5 * dpo_loss(pair2, beta=LN3).losses
    torch.testing.assert_close(out.losses, manual, rtol=0, atol=1e-15)
    weighted = povid_loss(logps, beta=LN3, negative_weights=[1.0, 0.0]).losses
    torch.testing.assert_close(weighted, dpo_loss(pair1, beta=LN3).losses, rtol=0, atol=1e-15)


def test_gradcheck_lvlm_losses() -> None:
    """float64 gradcheck of mDPO, HSA-DPO and POVID in all policy log-probs."""
    gen = torch.Generator().manual_seed(2)
    chosen, rejected, corrupted = (-torch.rand(3, generator=gen, dtype=F64) * 3 for _ in range(3))
    ref_c, ref_r, ref_x = (-torch.rand(3, generator=gen, dtype=F64) * 3 for _ in range(3))
    rejected_k = -torch.rand(3, 2, generator=gen, dtype=F64) * 3
    ref_k = -torch.rand(3, 2, generator=gen, dtype=F64) * 3
    severity = torch.rand(3, generator=gen, dtype=F64) + 0.5

    def mdpo(c: torch.Tensor, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        record = PreferenceLogps(c, r, ref_c, ref_r, corrupted_chosen_logps=x, ref_corrupted_chosen_logps=ref_x)
        return mdpo_loss(record, beta=0.5, anchor_delta=0.1).losses

    def hsa(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return hsa_dpo_loss(PreferenceLogps(c, r, ref_c, ref_r), beta=0.5, severity=severity).losses

    def povid(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return povid_loss(PreferenceLogps(c, r, ref_c, ref_k), beta=0.5).losses

    grad = [x.clone().requires_grad_(True) for x in (chosen, rejected, corrupted)]
    assert torch.autograd.gradcheck(mdpo, tuple(grad))
    assert torch.autograd.gradcheck(hsa, tuple(grad[:2]))
    assert torch.autograd.gradcheck(povid, (grad[0], rejected_k.clone().requires_grad_(True)))


def test_bradley_terry_hand_values() -> None:
    """R_w = ln 3, R_l = 0: −log σ(ln 3) = ln(4/3). Margin m = ln 3: −log σ(0) = ln 2.
    Squared centring c = 0.01 adds 0.01·(ln 3)². Abs-mean centring on the batch
    (R_w + R_l) = (ln 3, −3): c·|(ln 3 − 3)/2| added to every example."""
    chosen, rejected = t(LN3), t(0.0)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected).losses, t(math.log(4 / 3)), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, margin=LN3).losses, t(math.log(2)), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, center_coef=0.01).losses,
        t(math.log(4 / 3) + 0.01 * LN3**2),
        rtol=0,
        atol=1e-15,
    )
    batch = bradley_terry_loss(t(LN3, -1.0), t(0.0, -2.0), center_coef=0.5, center_mode="abs_mean")
    bt = t(math.log(4 / 3), math.log1p(math.exp(-1.0)))
    torch.testing.assert_close(batch.losses, bt + 0.5 * abs((LN3 - 3.0) / 2), rtol=0, atol=1e-15)
    assert batch.metrics["rewards/accuracy"].item() == 1.0


def test_bradley_terry_gradcheck_and_errors() -> None:
    """float64 gradcheck with margin and squared centring; shape and mode errors are explicit."""
    gen = torch.Generator().manual_seed(4)
    chosen = torch.randn(4, generator=gen, dtype=F64).requires_grad_(True)
    rejected = torch.randn(4, generator=gen, dtype=F64).requires_grad_(True)
    margin = torch.rand(4, generator=gen, dtype=F64)

    def fn(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return bradley_terry_loss(c, r, margin=margin, center_coef=0.1).losses

    assert torch.autograd.gradcheck(fn, (chosen, rejected))
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))
    with pytest.raises(ValueError, match="center_mode"):
        bradley_terry_loss(t(1.0), t(0.0), center_mode="l1")
