"""Tests of the advantage estimators: hand values, loop reference implementations (written here, in
plain Python over lists), the exact identities between estimators, padding invariance, and
data-parallel whitening."""

from __future__ import annotations

import math

import pytest
import torch

from vlalign.losses import (
    ADVANTAGE_ESTIMATORS,
    TOKEN_ADVANTAGE_ESTIMATORS,
    dapo_group_filter,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    kl_penalized_token_rewards,
    masked_whiten,
    overlong_reward_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
)
from vlalign.losses.advantages import masked_var

F64 = torch.float64


# ----------------------------------------------------------------------------- loop references


def loop_grpo(rewards: list[list[float]], eps: float) -> list[list[float]]:
    out = []
    for group in rewards:
        n = len(group)
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        out.append([(r - mean) / (std + eps) for r in group])
    return out


def loop_dr_grpo(rewards: list[list[float]]) -> list[list[float]]:
    return [[r - sum(group) / len(group) for r in group] for group in rewards]


def loop_rloo(rewards: list[list[float]]) -> list[list[float]]:
    out = []
    for group in rewards:
        row = []
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            row.append(r - sum(others) / len(others))
        out.append(row)
    return out


def loop_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Textbook GAE over one compact sequence (episode ends after the last token)."""
    n = len(rewards)
    advantages = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


def loop_returns(rewards: list[float], gamma: float) -> list[float]:
    return [sum(gamma ** (s - t) * rewards[s] for s in range(t, len(rewards))) for t in range(len(rewards))]


def scatter(rows: list[list[float]], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Place each row's values at random sorted positions of a wider row; padding holds nan."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((len(rows), width), float("nan"), dtype=F64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        slots = torch.randperm(width, generator=gen)[: len(row)].sort().values
        out[i, slots] = torch.tensor(row, dtype=F64)
        mask[i, slots] = True
    return out, mask


def gather(padded: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [padded[i][mask[i]].tolist() for i in range(padded.shape[0])]


def random_sequences(seed: int, count: int = 5, max_len: int = 7) -> tuple[list[list[float]], list[list[float]]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=gen).tolist()
    rewards = [torch.randn(n, generator=gen, dtype=F64).tolist() for n in lengths]
    values = [torch.randn(n, generator=gen, dtype=F64).tolist() for n in lengths]
    return rewards, values


# ----------------------------------------------------------------------------- group estimators


def test_group_estimators_hand_values() -> None:
    """Group (1, 0, 0, 1): mean ½, Bessel std √(4·¼/3) = 1/√3.
    GRPO (ε = 0): ±½·√3. Dr.GRPO: ±½. RLOO: 1 − (0+0+1)/3 = 2/3 and 0 − 2/3 = −2/3."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=F64)
    s = 0.5 * math.sqrt(3)
    torch.testing.assert_close(grpo_advantages(rewards, eps=0.0), torch.tensor([[s, -s, -s, s]], dtype=F64))
    torch.testing.assert_close(dr_grpo_advantages(rewards), torch.tensor([[0.5, -0.5, -0.5, 0.5]], dtype=F64))
    third = 2.0 / 3.0
    torch.testing.assert_close(rloo_advantages(rewards), torch.tensor([[third, -third, -third, third]], dtype=F64))


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_group_estimators_match_loops_flat_and_grouped(name: str) -> None:
    """Vectorised = loop reference on random groups (3 groups of 5), for (N, G) and flat input."""
    gen = torch.Generator().manual_seed(10)
    rewards = torch.randn(3, 5, generator=gen, dtype=F64)
    loops = {"grpo": lambda r: loop_grpo(r, 1e-6), "dr_grpo": loop_dr_grpo, "rloo": loop_rloo}
    expected = torch.tensor(loops[name](rewards.tolist()), dtype=F64)
    fn = ADVANTAGE_ESTIMATORS[name]
    torch.testing.assert_close(fn(rewards), expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(fn(rewards.flatten(), group_size=5), expected.flatten(), rtol=1e-13, atol=1e-14)


def test_rloo_is_scaled_centred_reward() -> None:
    """RLOO = G/(G−1)·(r − mean) = G/(G−1)·Dr.GRPO, exactly up to rounding."""
    rewards = torch.randn(4, 6, generator=torch.Generator().manual_seed(11), dtype=F64)
    expected = 6 / 5 * dr_grpo_advantages(rewards)
    torch.testing.assert_close(rloo_advantages(rewards), expected, rtol=1e-13, atol=1e-14)


def test_group_estimator_errors() -> None:
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(6, dtype=F64))
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(7, dtype=F64), group_size=3)
    with pytest.raises(ValueError, match="G >= 2"):
        rloo_advantages(torch.zeros(3, 1, dtype=F64))


def test_dapo_group_filter_and_equal_groups_have_zero_advantage() -> None:
    """Keep groups whose rewards differ: (1,1,1) no, (0,1,0) yes, (0,0,0) no; equal groups have 0
    advantage under every estimator (which is why they are dropped)."""
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    assert dapo_group_filter(rewards).tolist() == [False, True, False]
    assert dapo_group_filter(rewards.flatten(), group_size=3).tolist() == [False, True, False]
    for fn in ADVANTAGE_ESTIMATORS.values():
        assert (fn(rewards)[[0, 2]] == 0).all()


def test_overlong_penalty_hand_values() -> None:
    """L_max = 20, L_cache = 4 (free up to 16): 10 → 0, 16 → 0, 18 → (16 − 18)/4 = −½, 20 → −1, 25 → −1."""
    lengths = torch.tensor([10, 16, 18, 20, 25])
    penalty = overlong_reward_penalty(lengths, max_length=20, cache_length=4)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    halved = overlong_reward_penalty(lengths, max_length=20, cache_length=4, penalty_factor=0.5)
    torch.testing.assert_close(halved[2], torch.tensor(-0.25))
    with pytest.raises(ValueError, match="cache_length"):
        overlong_reward_penalty(lengths, max_length=20, cache_length=0)


# ----------------------------------------------------------------------------- token estimators


def test_gae_hand_values() -> None:
    """r = (0, 0, 1), V = ½ everywhere. γ = λ = 1: A_t = Σr − V_t = ½, R_t = 1.
    γ = λ = ½: δ₂ = 1 − ½ = ½, δ₁ = 0 + ¼ − ½ = −¼, δ₀ = −¼; A₂ = ½, A₁ = −¼ + ¼·½ = −⅛,
    A₀ = −¼ + ¼·(−⅛) = −0.28125; R = A + V = (0.21875, 0.375, 1)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)
    values = torch.full((1, 3), 0.5, dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.full((1, 3), 0.5, dtype=F64))
    torch.testing.assert_close(ret, torch.ones(1, 3, dtype=F64))
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.28125, -0.125, 0.5]], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(ret, torch.tensor([[0.21875, 0.375, 1.0]], dtype=F64), rtol=0, atol=1e-15)


def test_gae_lambda_one_gamma_one_is_returns_minus_values() -> None:
    """λ = γ = 1: A_t = Σ_{s≥t} r_s − V_t (the value terms telescope)."""
    rewards_list, values_list = random_sequences(seed=12)
    rewards, mask = scatter(rewards_list, 9, seed=1)
    values, _ = scatter(values_list, 9, seed=1)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    expected = discounted_returns(rewards, mask, gamma=1.0) - torch.where(mask, values, 0.0)
    torch.testing.assert_close(adv, expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ret, discounted_returns(rewards, mask, gamma=1.0), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_loop_with_random_padding(gamma: float, lam: float) -> None:
    """Vectorised GAE on sequences scattered into wider rows (nan on padding) = the loop on the
    compact sequences; padded positions are exactly 0."""
    rewards_list, values_list = random_sequences(seed=13)
    rewards, mask = scatter(rewards_list, 11, seed=2)
    values, _ = scatter(values_list, 11, seed=2)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i, (r, v) in enumerate(zip(rewards_list, values_list)):
        want_adv, want_ret = loop_gae(r, v, gamma, lam)
        torch.testing.assert_close(adv[i][mask[i]], torch.tensor(want_adv, dtype=F64), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(ret[i][mask[i]], torch.tensor(want_ret, dtype=F64), rtol=1e-13, atol=1e-14)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_kl_penalized_token_rewards_hand_values() -> None:
    """R = 1, β = ½, KL = (0.1, 0.2, 0.3): r = (−0.05, −0.1, −0.15 + 1, 0 on padding). With a gap in
    the mask (1, 0, 1, 1) the sequence reward lands on the last valid position, 3. An empty row gets 0."""
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 9.0, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    rewards = kl_penalized_token_rewards(torch.tensor([1.0, 2.0, 5.0], dtype=F64), kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, 0.85, 0.0], [-0.05, 0.0, -0.15, 1.8], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-15)


def test_reinforce_pp_hand_value_and_loop() -> None:
    """Hand: r = (0, 0, 1), γ = 1 ⇒ G = (1, 1, 1); γ = ½ ⇒ G = (¼, ½, 1). Whitened over a batch with a
    second row G = (0, 0): values (1, 1, 1, 0, 0), mean 3/5, population var 6/25 ⇒ (G − 0.6)/√0.24.
    Loop: random rows, padding scattered, γ = 0.9, with and without the group baseline."""
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 7.0]], dtype=F64)
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=1.0, eps=0.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=F64))
    scale = 1 / math.sqrt(0.24)
    expected = torch.tensor([[0.4, 0.4, 0.4], [-0.6, -0.6, 0.0]], dtype=F64) * scale
    torch.testing.assert_close(adv, expected, rtol=1e-14, atol=1e-15)
    _, ret = reinforce_pp_advantages(rewards[:1], mask[:1], gamma=0.5, whiten=False)
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.5, 1.0]], dtype=F64))

    gen = torch.Generator().manual_seed(14)
    outcome = torch.randn(2, 3, generator=gen, dtype=F64)  # 2 prompts × 3 completions
    for baseline in (False, True):
        seq_rewards = dr_grpo_advantages(outcome) if baseline else outcome
        kl_list = [torch.rand(n, generator=gen, dtype=F64).tolist() for n in (3, 5, 1, 4, 2, 6)]
        kl, mask = scatter(kl_list, 9, seed=3)
        token_rewards = kl_penalized_token_rewards(seq_rewards.flatten(), kl, mask, kl_coef=0.05)
        adv, _ = reinforce_pp_advantages(token_rewards, mask, gamma=0.9)
        # loop: per-token rewards, discounted returns, then whitening over all tokens of the batch
        loop_returns_all = []
        for i, kls in enumerate(kl_list):
            r = [-0.05 * k for k in kls]
            r[-1] += seq_rewards.flatten()[i].item()
            loop_returns_all.append(loop_returns(r, 0.9))
        flat = [g for row in loop_returns_all for g in row]
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((g - mean) ** 2 for g in flat) / len(flat) + 1e-8)
        for i, row in enumerate(loop_returns_all):
            want = torch.tensor([(g - mean) / std for g in row], dtype=F64)
            torch.testing.assert_close(adv[i][mask[i]], want, rtol=1e-12, atol=1e-13)
        assert (adv[~mask] == 0).all()


def test_reinforce_pp_moments_give_the_statistics_of_the_returns() -> None:
    """``moments`` receives the returns and the mask and its (mean, var) whiten them: the hand example
    above (G = (1, 1, 1, 0, 0), mean 3/5, var 6/25) with moments computing exactly those equals the
    default local whitening; a moments function returning (0, 1) leaves the returns unwhitened
    (up to the eps); giving moments and mean together is an error."""
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 7.0]], dtype=F64)
    seen = []

    def local(returns, m):
        seen.append(returns.clone())
        return torch.tensor(0.6, dtype=F64), torch.tensor(0.24, dtype=F64)

    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=1.0, eps=0.0, moments=local)
    torch.testing.assert_close(seen[0], ret, rtol=0, atol=0)
    expected, _ = reinforce_pp_advantages(rewards, mask, gamma=1.0, eps=0.0)
    torch.testing.assert_close(adv, expected, rtol=1e-14, atol=1e-15)
    unit = lambda r, m: (torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    same, ret = reinforce_pp_advantages(rewards, mask, gamma=1.0, eps=0.0, moments=unit)
    torch.testing.assert_close(same, ret, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        reinforce_pp_advantages(rewards, mask, moments=unit, mean=torch.tensor(0.0))


def test_whitening_hand_value_and_data_parallel_statistics() -> None:
    """[1, 2, 3, ·]: mean 2, population var 2/3 ⇒ (−1, 0, 1)·√(3/2). Two shards whitened with the
    global mean/var (from all-reduced sums) equal whole-batch whitening; shift_mean=False keeps μ."""
    values = torch.tensor([[1.0, 2.0, 3.0, float("nan")]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    s = math.sqrt(1.5)
    torch.testing.assert_close(masked_whiten(values, mask, eps=0.0), torch.tensor([[-s, 0.0, s, 0.0]], dtype=F64))
    kept_mean = masked_whiten(values, mask, eps=0.0, shift_mean=False)
    torch.testing.assert_close(kept_mean, torch.tensor([[2 - s, 2.0, 2 + s, 0.0]], dtype=F64))

    gen = torch.Generator().manual_seed(15)
    data = torch.randn(8, 6, generator=gen, dtype=F64)
    full_mask = torch.rand(8, 6, generator=gen) > 0.3
    whole = masked_whiten(data, full_mask)
    shards = list(zip(data.split(4), full_mask.split(4)))
    total = sum(torch.where(m, v, 0.0).sum() for v, m in shards)
    count = sum(m.sum() for _, m in shards)
    mean = total / count
    var = sum(torch.where(m, (v - mean) ** 2, 0.0).sum() for v, m in shards) / count
    parts = torch.cat([masked_whiten(v, m, mean=mean, var=var) for v, m in shards])
    torch.testing.assert_close(parts, whole, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(var, masked_var(data, full_mask), rtol=1e-13, atol=0)


def test_token_estimators_registry_and_gradcheck() -> None:
    """The registry exposes both token estimators; whitening is differentiable (float64 gradcheck)."""
    assert set(TOKEN_ADVANTAGE_ESTIMATORS) == {"gae", "reinforce_pp"}
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(2, 5, generator=gen, dtype=F64).requires_grad_(True)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    assert torch.autograd.gradcheck(lambda v: masked_whiten(v, mask), (x,))
