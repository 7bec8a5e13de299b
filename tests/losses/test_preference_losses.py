"""Tests of the paired DPO-family losses, KTO and loss combination against hand-worked values.

Most hand values are built so that a sigmoid argument is ln 3, where σ(ln 3) = 3/4 and
σ(−ln 3) = 1/4: the expected losses are then short expressions in ln 2, ln 3, ln(4/3).
"""

from __future__ import annotations

import math

import pytest
import torch

from vlalign.losses import (
    LOSS_PRESETS,
    PREFERENCE_LOSSES,
    PreferenceLogps,
    UnpairedLogps,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    combine_losses,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    nll_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)

LN3 = math.log(3.0)
F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def unit_pair() -> PreferenceLogps:
    """r_w = (−2) − (−3) = 1 and r_l = (−4) − (−3) = −1, so h = 2; lengths 2 and 4."""
    return PreferenceLogps(
        chosen_logps=t(-2.0),
        rejected_logps=t(-4.0),
        ref_chosen_logps=t(-3.0),
        ref_rejected_logps=t(-3.0),
        chosen_lengths=t(2.0),
        rejected_lengths=t(4.0),
    )


def random_pairs(batch: int = 6, seed: int = 0, requires_grad: bool = False) -> PreferenceLogps:
    gen = torch.Generator().manual_seed(seed)

    def rnd(scale: float = 3.0) -> torch.Tensor:
        return (-(torch.rand(batch, generator=gen, dtype=F64) * scale) - 0.5).requires_grad_(requires_grad)

    lengths_w = torch.randint(2, 9, (batch,), generator=gen).to(F64)
    lengths_l = torch.randint(2, 9, (batch,), generator=gen).to(F64)
    return PreferenceLogps(rnd(), rnd(), rnd(), rnd(), lengths_w, lengths_l)


def test_dpo_hand_value() -> None:
    """β·h = (ln3/2)·2 = ln 3 ⇒ L = −log σ(ln 3) = ln(4/3); rewards β·r = ±ln3/2, accuracy 1."""
    out = dpo_loss(unit_pair(), beta=LN3 / 2)
    torch.testing.assert_close(out.losses, t(math.log(4 / 3)), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.metrics["rewards/chosen"], torch.tensor(LN3 / 2, dtype=F64))
    torch.testing.assert_close(out.metrics["rewards/rejected"], torch.tensor(-LN3 / 2, dtype=F64))
    torch.testing.assert_close(out.metrics["rewards/margin"], torch.tensor(LN3, dtype=F64))
    assert out.metrics["rewards/accuracy"].item() == 1.0
    assert out.metrics["logps/chosen"].item() == -2.0


def test_cdpo_hand_value() -> None:
    """ε = 1/4, β·h = ln 3: L = −(3/4)·log(3/4) − (1/4)·log(1/4) = (3/4)ln(4/3) + (1/4)ln 4."""
    out = dpo_loss(unit_pair(), beta=LN3 / 2, label_smoothing=0.25)
    expected = 0.75 * math.log(4 / 3) + 0.25 * math.log(4)
    torch.testing.assert_close(out.losses, t(expected), rtol=0, atol=1e-15)


def test_robust_dpo_hand_value() -> None:
    """ε = 1/4, β·h = ln 3: L = [(3/4)ln(4/3) − (1/4)ln 4] / (1 − 1/2) = 1.5·ln(4/3) − 0.5·ln 4."""
    out = robust_dpo_loss(unit_pair(), beta=LN3 / 2, label_smoothing=0.25)
    torch.testing.assert_close(out.losses, t(1.5 * math.log(4 / 3) - 0.5 * math.log(4)), rtol=0, atol=1e-15)


def test_cdpo_and_robust_with_zero_eps_equal_dpo() -> None:
    """Both reduce to −log σ(β·h) when ε = 0 (exact, same arithmetic)."""
    logps = random_pairs()
    base = dpo_loss(logps, beta=0.3).losses
    torch.testing.assert_close(dpo_loss(logps, beta=0.3, label_smoothing=0.0).losses, base, rtol=0, atol=0)
    robust = robust_dpo_loss(logps, beta=0.3, label_smoothing=0.0).losses
    torch.testing.assert_close(robust, base, rtol=0, atol=1e-15)


def test_dpo_matches_naive_reference() -> None:
    """Independent form: −log(1/(1 + exp(−β·h))) computed directly in float64."""
    logps = random_pairs(seed=3)
    h = (logps.chosen_logps - logps.ref_chosen_logps) - (logps.rejected_logps - logps.ref_rejected_logps)
    naive = torch.log1p(torch.exp(-0.7 * h))
    torch.testing.assert_close(dpo_loss(logps, beta=0.7).losses, naive, rtol=1e-14, atol=1e-15)


def test_dpo_is_stable_for_huge_margins() -> None:
    """β·h = ±1e4 would overflow exp; logsigmoid gives 0 and 1e4 exactly, with finite gradients."""
    chosen = t(0.0, 0.0).requires_grad_(True)
    logps = PreferenceLogps(chosen, t(-1e5, 1e5), t(0.0, 0.0), t(0.0, 0.0))
    out = dpo_loss(logps, beta=0.1)
    torch.testing.assert_close(out.losses.detach(), t(0.0, 1e4))
    out.losses.sum().backward()
    assert torch.isfinite(chosen.grad).all()


def test_hinge_hand_value() -> None:
    """β = 0.1: h = 2 ⇒ 1 − 0.2 = 0.8; h = 20 ⇒ max(0, 1 − 2) = 0."""
    logps = PreferenceLogps(t(-2.0, 10.0), t(-4.0, -10.0), t(-3.0, 0.0), t(-3.0, 0.0))
    torch.testing.assert_close(hinge_loss(logps, beta=0.1).losses, t(0.8, 0.0), rtol=0, atol=1e-15)


def test_ipo_hand_value_is_length_normalised() -> None:
    """r_w/|y_w| = 1/2, r_l/|y_l| = −1/4 ⇒ h̄ = 3/4; β = 1/2 ⇒ 1/(2β) = 1 ⇒ L = (3/4 − 1)² = 1/16."""
    out = ipo_loss(unit_pair(), beta=0.5)
    torch.testing.assert_close(out.losses, t(1 / 16), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.metrics["rewards/chosen"], torch.tensor(0.25, dtype=F64))


def test_bco_pair_hand_value() -> None:
    """β·r_w = ln 3, β·r_l = −ln 3: L = −log σ(ln 3) − log σ(ln 3) = 2 ln(4/3).
    With δ = ln 3: −log σ(0) − log σ(2 ln 3) = ln 2 − ln(9/10)."""
    logps = unit_pair()
    torch.testing.assert_close(bco_pair_loss(logps, beta=LN3).losses, t(2 * math.log(4 / 3)), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        bco_pair_loss(logps, beta=LN3, delta=LN3).losses, t(math.log(2) - math.log(0.9)), rtol=0, atol=1e-15
    )


def test_apo_zero_hand_value() -> None:
    """β·r_w = ln 3, β·r_l = −ln 3: (1 − 3/4) + 1/4 = 1/2."""
    torch.testing.assert_close(apo_zero_loss(unit_pair(), beta=LN3).losses, t(0.5), rtol=0, atol=1e-15)


def test_apo_down_hand_value() -> None:
    """β·r_w = ln 3, β·h = 2 ln 3: σ(ln 3) + 1 − σ(2 ln 3) = 3/4 + 1 − 9/10 = 17/20; rewards as DPO's."""
    out = apo_down_loss(unit_pair(), beta=LN3)
    torch.testing.assert_close(out.losses, t(0.85), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.metrics["rewards/margin"], torch.tensor(2 * LN3, dtype=F64))


def test_apo_down_lowers_the_chosen_likelihood_where_apo_zero_raises_it() -> None:
    """β = ln 3, r_w = 0, r_l = −1 (h = 1), with σ'(x) = σ(x)(1 − σ(x)): σ'(0) = 1/4, σ'(ln 3) = 3/16.
    APO-down: ∂L/∂r_w = β·(σ'(0) − σ'(β·h)) = ln3·(1/4 − 3/16) = ln3/16 > 0 (descent lowers the
    chosen log-prob) and ∂L/∂r_l = β·σ'(β·h) = 3·ln3/16 (descent lowers the rejected one faster).
    APO-zero: ∂L/∂r_w = −β·σ'(0) = −ln3/4, ∂L/∂r_l = β·σ'(−ln 3) = 3·ln3/16."""
    grads = {}
    for name, fn in (("down", apo_down_loss), ("zero", apo_zero_loss)):
        chosen, rejected = t(-2.0).requires_grad_(True), t(-4.0).requires_grad_(True)
        fn(PreferenceLogps(chosen, rejected, t(-2.0), t(-3.0)), beta=LN3).losses.sum().backward()
        grads[name] = (chosen.grad, rejected.grad)
    torch.testing.assert_close(grads["down"][0], t(LN3 / 16), rtol=0, atol=1e-15)
    torch.testing.assert_close(grads["down"][1], t(3 * LN3 / 16), rtol=0, atol=1e-15)
    torch.testing.assert_close(grads["zero"][0], t(-LN3 / 4), rtol=0, atol=1e-15)
    torch.testing.assert_close(grads["zero"][1], t(3 * LN3 / 16), rtol=0, atol=1e-15)


def test_simpo_hand_value() -> None:
    """log π(y_w) = −2 over 4 tokens, log π(y_l) = −6 over 3: β = 2 gives −1 + 4 = 3; γ = 3 − ln 3
    leaves ln 3 ⇒ L = ln(4/3). No reference needed."""
    logps = PreferenceLogps(t(-2.0), t(-6.0), chosen_lengths=t(4.0), rejected_lengths=t(3.0))
    out = simpo_loss(logps, beta=2.0, gamma=3.0 - LN3)
    torch.testing.assert_close(out.losses, t(math.log(4 / 3)), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.metrics["rewards/margin"], torch.tensor(3.0, dtype=F64))


def test_orpo_hand_value() -> None:
    """Mean token log-probs ln(1/2) (P = 1/2, odds 1) and ln(1/5) (P = 1/5, odds 1/4):
    log-odds ratio = ln 4, σ(ln 4) = 4/5; NLL = ln 2 ⇒ L = ln 2 − 0.1·ln(4/5)."""
    logps = PreferenceLogps(t(3 * math.log(0.5)), t(2 * math.log(0.2)), chosen_lengths=t(3.0), rejected_lengths=t(2.0))
    out = orpo_loss(logps, beta=0.1)
    torch.testing.assert_close(out.losses, t(math.log(2) - 0.1 * math.log(0.8)), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.metrics["orpo/log_odds_ratio"], torch.tensor(math.log(4), dtype=F64))


def test_orpo_near_certain_chosen_is_finite() -> None:
    """Mean log-prob −1e-12 (P ≈ 1): log(1 − P) ≈ ln(1e-12) must stay finite, and so must gradients."""
    chosen = t(-1e-12).requires_grad_(True)
    logps = PreferenceLogps(chosen, t(-3.0), chosen_lengths=t(1.0), rejected_lengths=t(1.0))
    out = orpo_loss(logps, beta=0.1)
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(chosen.grad).all()


def test_nll_hand_value() -> None:
    """−(3·ln(1/2))/3 = ln 2."""
    logps = PreferenceLogps(t(3 * math.log(0.5)), t(-1.0), chosen_lengths=t(3.0), rejected_lengths=t(1.0))
    torch.testing.assert_close(nll_loss(logps).losses, t(math.log(2)), rtol=0, atol=1e-15)


def test_mpo_combination_hand_value_and_equivalence() -> None:
    """MPO on the unit pair, β = ln 3 (β·r_w = ln 3, β·h = 2 ln 3, σ(2 ln 3) = 9/10):
    0.8·ln(10/9) + 0.2·2·ln(4/3) + 1.0·(2/2) = 0.8·ln(10/9) + 0.4·ln(4/3) + 1; and it equals the
    weighted sum of the three functions called one by one."""
    logps = unit_pair()
    out = combine_losses(logps, weights=LOSS_PRESETS["mpo"], beta=LN3)
    expected = 0.8 * math.log(10 / 9) + 0.4 * math.log(4 / 3) + 1.0
    torch.testing.assert_close(out.losses, t(expected), rtol=0, atol=1e-15)
    rand = random_pairs(seed=5)
    combined = combine_losses(rand, weights={"sigmoid": 0.8, "bco_pair": 0.2, "nll": 1.0}, beta=0.2).losses
    manual = 0.8 * dpo_loss(rand, beta=0.2).losses + 0.2 * bco_pair_loss(rand, beta=0.2).losses + nll_loss(rand).losses
    torch.testing.assert_close(combined, manual, rtol=0, atol=1e-15)
    assert set(out.metrics) >= {"loss/sigmoid", "loss/bco_pair", "loss/nll", "rewards/accuracy"}


def test_combine_options_override_per_loss() -> None:
    """options carry each loss's own hyperparameters (SimPO's β and γ beside DPO's β)."""
    logps = random_pairs(seed=8)
    out = combine_losses(
        logps, weights={"sigmoid": 1.0, "simpo": 0.5}, beta=0.1, options={"simpo": {"beta": 2.5, "gamma": 1.0}}
    )
    manual = dpo_loss(logps, beta=0.1).losses + 0.5 * simpo_loss(logps, beta=2.5, gamma=1.0).losses
    torch.testing.assert_close(out.losses, manual, rtol=0, atol=1e-15)


def test_combine_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown preference loss"):
        combine_losses(unit_pair(), weights={"sigmod": 1.0})


def test_missing_reference_and_lengths_errors_name_fields() -> None:
    no_ref = PreferenceLogps(t(-1.0), t(-2.0))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(no_ref)
    with pytest.raises(ValueError, match="chosen_lengths"):
        simpo_loss(no_ref)
    with pytest.raises(ValueError, match="ref_rejected_logps must have shape"):
        PreferenceLogps(t(-1.0, -2.0), t(-1.0, -2.0), t(-1.0, -2.0), t(-1.0))


def test_kto_hand_value() -> None:
    """KL pairs give diffs (−1) − (−3) = 2 and (−2) − (−2) = 0 ⇒ z₀ = max(0, 1) = 1. β = 1.
    Desirable r = 1 + ln 3: 1 − σ(ln 3) = 1/4 (λ_D = 1). Undesirable r = 1 − ln 3:
    λ_U·(1 − σ(z₀ − r)) = 2·(1 − σ(ln 3)) = 1/2."""
    logps = UnpairedLogps(
        logps=t(1 + LN3, 1 - LN3),
        ref_logps=t(0.0, 0.0),
        desirable=torch.tensor([True, False]),
        kl_logps=t(-1.0, -2.0),
        ref_kl_logps=t(-3.0, -2.0),
    )
    out = kto_loss(logps, beta=1.0, undesirable_weight=2.0)
    torch.testing.assert_close(out.losses, t(0.25, 0.5), rtol=0, atol=1e-15)
    assert out.metrics["kl/reference_point"].item() == 1.0
    torch.testing.assert_close(out.metrics["rewards/chosen"], torch.tensor(1 + LN3, dtype=F64))


def test_kto_reference_point_is_clamped_and_detached() -> None:
    """A negative mean KL estimate gives z₀ = 0; no gradient flows into the KL log-probs."""
    kl = t(-5.0, -5.0).requires_grad_(True)
    policy = t(0.0).requires_grad_(True)
    logps = UnpairedLogps(policy, t(0.0), torch.tensor([True]), kl_logps=kl, ref_kl_logps=t(-1.0, -1.0))
    out = kto_loss(logps, beta=1.0)
    torch.testing.assert_close(out.losses.detach(), t(0.5))  # 1 − σ(0)
    out.losses.sum().backward()
    assert kl.grad is None and policy.grad is not None
    with pytest.raises(ValueError, match="reference point"):
        kto_loss(UnpairedLogps(t(0.0), t(0.0), torch.tensor([True])))
    explicit = kto_loss(UnpairedLogps(t(0.0), t(0.0), torch.tensor([True])), reference_point=0.0)
    torch.testing.assert_close(explicit.losses, t(0.5))


@pytest.mark.parametrize("name", sorted(set(PREFERENCE_LOSSES) - {"nll"}))
def test_gradcheck_preference_losses(name: str) -> None:
    """float64 gradcheck of every loss with a non-trivial gradient (all but the linear NLL)."""
    base = random_pairs(batch=3, seed=11)
    inputs = tuple(
        x.clone().requires_grad_(True)
        for x in (base.chosen_logps, base.rejected_logps, base.ref_chosen_logps, base.ref_rejected_logps)
    )
    kwargs = {"label_smoothing": 0.1} if name in ("sigmoid", "robust") else {}
    if name == "hinge":
        kwargs = {"beta": 0.05}  # keeps every example inside the hinge's linear part (no kink)

    def fn(cw: torch.Tensor, rl: torch.Tensor, rcw: torch.Tensor, rrl: torch.Tensor) -> torch.Tensor:
        logps = PreferenceLogps(cw, rl, rcw, rrl, base.chosen_lengths, base.rejected_lengths)
        return PREFERENCE_LOSSES[name](logps, **kwargs).losses

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", sorted(set(PREFERENCE_LOSSES) - {"nll"}))
def test_every_loss_raises_the_margin_under_gradient_descent(name: str) -> None:
    """The loss-level twin of the DPO recipe's margin test: the policy log-probs start equal to the
    reference (every r = 0), and 20 plain gradient steps (lr 0.05) on them must raise the logged
    ``rewards/margin`` (β·h, or SimPO's / ORPO's length-normalised policy margin, also 0 at the start
    since the mean token log-probs are equal) of every pair of a batch of three. NLL has no margin."""
    ref_w, ref_l = t(-2.0, -5.0, -1.0), t(-3.0, -4.0, -1.5)
    len_w, len_l = t(2.0, 5.0, 2.0), t(3.0, 4.0, 3.0)
    chosen, rejected = ref_w.clone().requires_grad_(True), ref_l.clone().requires_grad_(True)
    loss = PREFERENCE_LOSSES[name]

    def margins() -> torch.Tensor:
        pairs = [
            PreferenceLogps(*(x[i : i + 1].detach() for x in (chosen, rejected, ref_w, ref_l, len_w, len_l)))
            for i in range(3)
        ]
        return torch.stack([loss(p).metrics["rewards/margin"] for p in pairs])

    before = margins()
    for _ in range(20):
        loss(PreferenceLogps(chosen, rejected, ref_w, ref_l, len_w, len_l)).losses.sum().backward()
        with torch.no_grad():
            for x in (chosen, rejected):
                x -= 0.05 * x.grad
                x.grad = None
    after = margins()
    assert (before.abs() < 1e-15).all() and (after > before + 1e-3).all(), (before, after)


def test_gradcheck_kto() -> None:
    """float64 gradcheck of KTO in the policy log-probs."""
    logps = t(-1.0, -2.5, -0.5).requires_grad_(True)

    def fn(x: torch.Tensor) -> torch.Tensor:
        record = UnpairedLogps(x, t(-1.5, -2.0, -1.0), torch.tensor([True, False, True]), t(-1.0), t(-1.3))
        return kto_loss(record, beta=0.5, undesirable_weight=1.5).losses

    assert torch.autograd.gradcheck(fn, (logps,))
