"""Tests of PPO-clip (asymmetric and dual clip), the value loss, entropy, KL estimators and controllers."""

from __future__ import annotations

import math

import pytest
import torch

from vlalign.losses import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus,
    entropy_from_logits,
    entropy_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    ppo_clip_loss,
    value_loss,
)

F64 = torch.float64


def row(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=F64)


def test_ppo_clip_hand_values() -> None:
    """ε = 0.2, one token each (log π_old = 0, so ρ = e^{log π}):
    A = 1, ρ = 1.5: max(−1.5, −1.2) = −1.2 (clipped);  A = −1, ρ = 0.5: max(0.5, 0.8) = 0.8 (clipped);
    A = 1, ρ = 0.5: max(−0.5, −0.8) = −0.5 (not clipped);  A = −1, ρ = 5: max(5, 1.2) = 5 (not clipped)."""
    ratios = row(1.5, 0.5, 0.5, 5.0)
    adv = row(1.0, -1.0, 1.0, -1.0)
    mask = torch.ones_like(adv, dtype=torch.bool)
    out = ppo_clip_loss(ratios.log(), torch.zeros_like(ratios), adv, mask, clip_low=0.2)
    torch.testing.assert_close(out.losses, row(-1.2, 0.8, -0.5, 5.0), rtol=1e-15, atol=1e-15)
    assert out.metrics["policy/clip_frac"].item() == 0.5
    approx_kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(5.0) ** 2) / 4
    torch.testing.assert_close(out.metrics["policy/approx_kl"], torch.tensor(approx_kl, dtype=F64))


def test_ppo_asymmetric_and_dual_clip_hand_values() -> None:
    """Clip-higher ε_high = 0.28: A = 1, ρ = 1.5 ⇒ −1.28. Dual clip c = 3: A = −1, ρ = 5 ⇒
    min(5, 3·1) = 3; A = −1, ρ = 2 ⇒ min(2, 3) = 2 (dual clip inactive); A = 1 is never dual-clipped."""
    ratios = row(1.5, 5.0, 2.0, 5.0)
    adv = row(1.0, -1.0, -1.0, 1.0)
    mask = torch.ones_like(adv, dtype=torch.bool)
    old = torch.zeros_like(ratios)
    out = ppo_clip_loss(ratios.log(), old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(out.losses, row(-1.28, 3.0, 2.0, -1.28), rtol=1e-15, atol=1e-15)
    assert out.metrics["policy/dual_clip_frac"].item() == 0.25
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(ratios.log(), ratios.log(), adv, mask, dual_clip=0.5)


def test_ppo_sequence_advantages_broadcast() -> None:
    """A (B,) advantage is the same as repeating it on every token."""
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 5, generator=gen, dtype=F64)
    old = -torch.rand(3, 5, generator=gen, dtype=F64)
    adv = torch.randn(3, generator=gen, dtype=F64)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    a = ppo_clip_loss(logprobs, old, adv, mask).losses
    b = ppo_clip_loss(logprobs, old, adv[:, None].expand(3, 5), mask).losses
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_value_loss_counts_no_clipping_inside_the_range() -> None:
    """V_old = 0.1, V = 1e-9, R = 2e-9 (float32): |V − V_old| < ε = 0.2, so nothing is clipped and the
    loss is ½(V − R)² = ½·1e-18. Written as V_old + clamp(V − V_old), the clipped V rounds to 0 (V − V_old
    = −0.1 in float32), its error 4e-18 > 1e-18 would be taken and the token counted as clipped."""
    values, old, returns = (torch.tensor([[x]]) for x in (1e-9, 0.1, 2e-9))
    mask = torch.ones_like(values, dtype=torch.bool)
    out = value_loss(values, old, returns, mask, clip_range=0.2)
    assert out.metrics["value/clip_frac"].item() == 0.0
    torch.testing.assert_close(out.losses, 0.5 * (values - returns) ** 2, rtol=0, atol=0)
    rounded = old + (values - old).clamp(-0.2, 0.2)
    assert rounded.item() == 0.0 and ((rounded - returns) ** 2 > (values - returns) ** 2).item()


def test_value_loss_hand_values() -> None:
    """V = 1.5, V_old = 1, R = 2, ε = 0.2: (V − R)² = 0.25, clipped V = 1.2 ⇒ 0.64 ⇒ ½·0.64 = 0.32.
    V = 1.1 (inside the range): ½·max(0.81, 0.81) = 0.405. Unclipped: ½·0.25 = 0.125."""
    values, old, returns = row(1.5, 1.1), row(1.0, 1.0), row(2.0, 2.0)
    mask = torch.ones_like(values, dtype=torch.bool)
    out = value_loss(values, old, returns, mask, clip_range=0.2)
    torch.testing.assert_close(out.losses, row(0.32, 0.405), rtol=1e-14, atol=1e-15)
    assert out.metrics["value/clip_frac"].item() == 0.5
    unclipped = value_loss(values, old, returns, mask, clip_range=None).losses
    torch.testing.assert_close(unclipped[0, 0], torch.tensor(0.125, dtype=F64))


def test_entropy_hand_values_and_reference() -> None:
    """Uniform logits over V = 4: H = ln 4. A −inf logit (banned token) is a zero-probability entry:
    (0, 0, −inf) has H = ln 2. Random logits agree with torch.distributions.Categorical."""
    logits = torch.zeros(1, 1, 4, dtype=F64)
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4)]], dtype=F64))
    banned = torch.tensor([[[0.0, 0.0, float("-inf")]]], dtype=F64, requires_grad=True)
    torch.testing.assert_close(entropy_from_logits(banned).detach(), torch.tensor([[math.log(2)]], dtype=F64))
    entropy_from_logits(banned).sum().backward()
    assert torch.isfinite(banned.grad).all()
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=F64) * 3
    reference = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), reference, rtol=1e-13, atol=1e-14)
    assert torch.autograd.gradcheck(entropy_from_logits, (logits[:1, :2].clone().requires_grad_(True),))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = entropy_loss(logits, mask, coef=0.5)
    torch.testing.assert_close(out.losses, -0.5 * reference * mask)
    torch.testing.assert_close(out.metrics["policy/entropy"], reference[mask].mean())
    bonus = entropy_bonus(torch.where(mask, entropy_from_logits(logits), float("nan")), mask, coef=0.5)
    torch.testing.assert_close(bonus.losses, out.losses, rtol=0, atol=0)
    torch.testing.assert_close(bonus.metrics["policy/entropy"], out.metrics["policy/entropy"], rtol=0, atol=0)


def test_kl_estimators_hand_values() -> None:
    """log π = ln(1/2), log π_ref = ln(1/4) ⇒ d = −ln 2: k1 = ln 2, k2 = ½(ln 2)², k3 = ½ + ln 2 − 1."""
    lp, ref = row(math.log(0.5)), row(math.log(0.25))
    mask = torch.ones_like(lp, dtype=torch.bool)
    ln2 = math.log(2)
    torch.testing.assert_close(kl_k1(lp, ref, mask), row(ln2), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(kl_k2(lp, ref, mask), row(0.5 * ln2**2), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(kl_k3(lp, ref, mask), row(ln2 - 0.5), rtol=1e-15, atol=1e-15)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k1_and_k3_are_unbiased_under_exact_expectation() -> None:
    """Independent check: for categorical π and π_ref, Σ_y π(y)·k(y) equals KL(π‖π_ref) exactly for
    k1 and k3 (the expectation is a finite sum, no sampling)."""
    gen = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(1, 6, generator=gen, dtype=F64), -1)
    logq = torch.log_softmax(torch.randn(1, 6, generator=gen, dtype=F64), -1)
    mask = torch.ones_like(logp, dtype=torch.bool)
    exact = (logp.exp() * (logp - logq)).sum()
    for estimator in (kl_k1, kl_k3):
        torch.testing.assert_close((logp.exp() * estimator(logp, logq, mask)).sum(), exact, rtol=1e-13, atol=1e-15)


def test_k3_clamp_and_gradcheck() -> None:
    """d = 50 is clamped to 10 before exp: k3 = e^10 − 11 (finite); gradcheck in float64 away from the clamp."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    torch.testing.assert_close(kl_k3(row(0.0), row(50.0), mask), row(math.exp(10) - 11), rtol=1e-15, atol=0)
    gen = torch.Generator().manual_seed(3)
    lp = (-torch.rand(2, 4, generator=gen, dtype=F64) * 2).requires_grad_(True)
    ref = -torch.rand(2, 4, generator=gen, dtype=F64) * 2
    full = torch.ones(2, 4, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: kl_k3(x, ref, full), (lp,))


def test_padding_never_changes_policy_terms() -> None:
    """Garbage on padded positions (nan, ±inf, 1e30) gives the same per-token results, zeros on padding,
    the same metrics, and finite gradients that are exactly zero on padding."""
    gen = torch.Generator().manual_seed(4)
    shape = (4, 6)
    mask = torch.rand(shape, generator=gen) > 0.4
    mask[:, 0] = True
    clean = [-torch.rand(shape, generator=gen, dtype=F64) for _ in range(2)]
    clean.append(torch.randn(shape, generator=gen, dtype=F64))
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30], dtype=F64)
    pick = torch.randint(0, 4, shape, generator=gen)
    dirty = [torch.where(mask, x, garbage[pick]) for x in clean]

    def run(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        lp = tensors[0].clone().requires_grad_(True)
        out = ppo_clip_loss(lp, tensors[1], tensors[2], mask, clip_high=0.28, dual_clip=3.0)
        value = value_loss(tensors[0], tensors[1], tensors[2], mask)
        kls = [fn(lp, tensors[1], mask) for fn in KL_ESTIMATORS.values()]
        total = out.losses.sum() + sum(k.sum() for k in kls)
        total.backward()
        stacked = torch.stack([out.losses.detach(), value.losses] + [k.detach() for k in kls])
        return stacked, out.metrics, lp.grad

    a, metrics_a, grad_a = run(clean)
    b, metrics_b, grad_b = run(dirty)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (b[:, ~mask] == 0).all()
    for key in metrics_a:
        torch.testing.assert_close(metrics_a[key], metrics_b[key], rtol=0, atol=0)
    assert torch.isfinite(grad_b).all() and (grad_b[~mask] == 0).all()
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
    logits = torch.randn(*shape, 5, generator=gen, dtype=F64)
    dirty_logits = torch.where(mask[..., None], logits, float("nan")).requires_grad_(True)
    out = entropy_loss(dirty_logits, mask)
    torch.testing.assert_close(out.losses, entropy_loss(logits, mask).losses, rtol=0, atol=0)
    out.losses.sum().backward()
    assert torch.isfinite(dirty_logits.grad).all() and (dirty_logits.grad[~mask] == 0).all()


def test_gradcheck_ppo_and_value_loss() -> None:
    """float64 gradcheck of PPO-clip (dual clip on) and of the clipped value loss, with random inputs
    that stay away from the clip kinks."""
    gen = torch.Generator().manual_seed(5)
    logprobs = (-torch.rand(3, 4, generator=gen, dtype=F64)).requires_grad_(True)
    old = -torch.rand(3, 4, generator=gen, dtype=F64)
    adv = torch.randn(3, 4, generator=gen, dtype=F64)
    mask = torch.rand(3, 4, generator=gen) > 0.2
    assert torch.autograd.gradcheck(lambda x: ppo_clip_loss(x, old, adv, mask, dual_clip=3.0).losses, (logprobs,))
    values = torch.randn(3, 4, generator=gen, dtype=F64).requires_grad_(True)
    old_values = torch.randn(3, 4, generator=gen, dtype=F64)
    returns = torch.randn(3, 4, generator=gen, dtype=F64)
    assert torch.autograd.gradcheck(lambda v: value_loss(v, old_values, returns, mask).losses, (values,))


def test_kl_controllers() -> None:
    """Adaptive: β = 0.1, target 6, horizon 10000, KL = 9 over 1000 steps: e = clip(9/6 − 1, ±0.2) = 0.2
    ⇒ β = 0.1·(1 + 0.2·0.1) = 0.102; then KL = 5.4: e = −0.1 ⇒ β = 0.102·(1 − 0.01) = 0.10098.
    Fixed never moves."""
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    assert controller.update(9.0, 1000) == pytest.approx(0.102, rel=1e-15)
    assert controller.update(5.4, 1000) == pytest.approx(0.10098, rel=1e-14)
    assert FixedKLController(0.05).update(100.0, 1000) == 0.05
    assert KL_CONTROLLERS["adaptive"] is AdaptiveKLController
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(value=0.1, target=0.0, horizon=10)
