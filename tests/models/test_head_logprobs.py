"""Chunked log-probs from hidden states: hand-worked values, then autograd's full computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlalign.models.head_logprobs import BLOCK_ROWS, head_logprobs


def test_hand_worked_two_token_vocabulary():
    """H = 1, V = 2, h = 1, W = [[0], [ln 3]]: logits (0, ln 3), p = (1/4, 3/4).

    log p(1) = ln(3/4); entropy = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3.
    d log p(1) / dW = ([v = 1] - p_v) h = (-1/4, 1/4); d log p(1) / dh = sum_v ([v = 1] - p_v) W_v = (1/4) ln 3.
    At temperature 2: logits (0, ln 3 / 2), p(1) = sqrt 3 / (1 + sqrt 3).
    """
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)
    logps, entropy = head_logprobs(hidden, weight, torch.tensor([1]), return_entropy=True)
    assert logps.item() == pytest.approx(math.log(0.75), abs=1e-7)
    assert entropy is not None and entropy.item() == pytest.approx(math.log(4) - 0.75 * math.log(3), abs=1e-7)
    logps.sum().backward()
    torch.testing.assert_close(weight.grad, torch.tensor([[-0.25], [0.25]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(hidden.grad, torch.tensor([[0.25 * math.log(3.0)]]), atol=1e-7, rtol=0)
    warm, _ = head_logprobs(hidden, weight, torch.tensor([1]), temperature=2.0)
    assert warm.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-7)


def _reference(hidden, weight, bias, targets, temperature, softcap):
    """Autograd's full computation: the logits of every token at once, log-softmax, gather."""
    y = F.linear(hidden, weight, bias)
    if softcap is not None:
        y = torch.tanh(y / softcap) * softcap
    logp = F.log_softmax(y.float() / temperature, dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("block_rows", [1, 3, 7, None])
@pytest.mark.parametrize("softcap,bias", [(None, False), (5.0, True)], ids=["plain", "softcap-bias"])
@pytest.mark.parametrize("temperature,entropy", [(0.7, True), (1.0, True), (0.7, False), (1.0, False)])
def test_equals_full_logits_with_gradients(block_rows, softcap, bias, temperature, entropy):
    """N = 7 tokens, V = 50, H = 8, temperature 0.7: log-probs, entropies and the gradients of
    hidden states, weight and bias of a loss using both equal the full computation (float32).
    Also at temperature 1 (no division) and without the entropy (the exponentials in place)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 8, generator=g)
    weight = torch.randn(50, 8, generator=g)
    b = torch.randn(50, generator=g) if bias else None
    targets = torch.randint(0, 50, (7,), generator=g)
    coef_lp, coef_ent = torch.randn(7, generator=g), torch.randn(7, generator=g)
    grads = []
    for fn in ("chunked", "full"):
        params = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
        bias_ = params[2] if bias else None
        if fn == "chunked":
            lp, ent = head_logprobs(
                params[0],
                params[1],
                targets,
                bias=bias_,
                temperature=temperature,
                softcap=softcap,
                block_rows=block_rows,
                return_entropy=entropy,
            )
            assert (ent is not None) == entropy
        else:
            lp, ent = _reference(params[0], params[1], bias_, targets, temperature, softcap)
        ent = ent if entropy else torch.zeros(7)
        ((coef_lp * lp).sum() + (coef_ent * ent).sum()).backward()
        grads.append((lp.detach(), ent.detach(), [p.grad for p in params]))
    (lp_c, ent_c, g_c), (lp_f, ent_f, g_f) = grads
    # worst over 20 seeds of these draws (logits of standard deviation ~4): log-probs 1.9e-6,
    # entropies 3.7e-6, gradients 1.6e-5 (blocks of the vocabulary summed in another order)
    torch.testing.assert_close(lp_c, lp_f, atol=2e-6, rtol=0)
    torch.testing.assert_close(ent_c, ent_f, atol=4e-6, rtol=0)
    for a, b_ in zip(g_c, g_f):
        torch.testing.assert_close(a, b_, atol=1.6e-5, rtol=0)


def test_no_grad_and_frozen_head():
    """Under no_grad nothing is saved; with a frozen head only the hidden states get a gradient."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 6, generator=g, requires_grad=True)
    weight = torch.randn(30, 6, generator=g)
    targets = torch.tensor([0, 5, 29, 7])
    with torch.no_grad():
        lp, ent = head_logprobs(hidden, weight, targets, block_rows=2)
    assert not lp.requires_grad and ent is None
    lp, _ = head_logprobs(hidden, weight, targets, block_rows=3)
    lp.sum().backward()
    ref = hidden.detach().clone().requires_grad_()
    _reference(ref, weight, None, targets, 1.0, None)[0].sum().backward()
    torch.testing.assert_close(hidden.grad, ref.grad, atol=1e-6, rtol=0)
    assert weight.grad is None


def test_default_block_and_bad_arguments():
    assert BLOCK_ROWS == 8192  # 19 blocks of Qwen's 151,936-token vocabulary
    with pytest.raises(ValueError, match="temperature"):
        head_logprobs(torch.zeros(1, 2), torch.zeros(3, 2), torch.tensor([0]), temperature=0.0)
    with pytest.raises(ValueError, match="block_rows"):
        head_logprobs(torch.zeros(1, 2), torch.zeros(3, 2), torch.tensor([0]), block_rows=0)
