"""Prefix sharing through the cache (vlalign.models.prefix_cache): exact against the naive rows.

Qwen3.5 (hybrid linear attention) takes this path through the registry (tests/models/test_logprobs.py
runs its shared == naive checks); here it is also forced onto a dense architecture (Qwen2-VL) as a
cross-check, its token count is worked by hand, and its two guards are pinned: autograd's
in-place check (the reason for ``keep_cache_copies``) and the gradient-checkpointing fallback.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from vlalign.data.chat import pad_token_id_of
from vlalign.data.collate import encode_completions, encode_prompts
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.models import arch as support
from vlalign.models.load import LoraSpec
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.prefix_cache import cache_sharing_problem, prompt_cache_inputs

TOL = 1e-5
QUESTIONS = ["Is there a red circle?", "Describe every shape in the image, from left to right, with its colour."]
PAIRS = [["Yes.", "No, there is a blue square."], ["A red disc and a green triangle.", "Nothing."]]
GROUP = ["Yes", "No", "A red disc.", "Two shapes.", "3", "The square is blue and small.", "I see", "A yellow bar."]


def _prompts(processor, images):
    """Two prompts of different lengths: one image, then two images."""
    samples = [
        PromptSample(id=f"p{i}", images=[images[(i + j) % 4] for j in range(n)], prompt=user_prompt(QUESTIONS[i], n))
        for i, n in enumerate((1, 2))
    ]
    return encode_prompts(processor, samples)


def _loss(result):
    """A loss weighing every token differently (so that a misplaced token changes the gradient)."""
    weights = torch.linspace(0.5, 1.5, result.logps.numel()).reshape(result.logps.shape)
    return (result.logps * weights * result.mask).sum() / result.mask.sum()


def _run(model, prompts, completions, mode, pad):
    model.zero_grad(set_to_none=True)
    result = completion_logprobs(model, prompts, completions, mode=mode, pad_token_id=pad)
    _loss(result).backward()
    return result, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_equal_to_naive(model, processor, images):
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, images)
    for groups in (PAIRS, [GROUP, GROUP[::-1]]):
        completions = encode_completions(processor, groups)
        cached, g_cached = _run(model, prompts, completions, "shared", pad)
        naive, g_naive = _run(model, prompts, completions, "naive", pad)
        assert (cached.mode, naive.mode) == ("shared", "naive")
        torch.testing.assert_close(cached.logps, naive.logps, atol=TOL, rtol=0)
        assert torch.equal(cached.mask, naive.mask) and torch.equal(cached.token_ids, naive.token_ids)
        assert g_cached.keys() == g_naive.keys() and any(".visual." in n for n in g_cached)
        worst = max((g_cached[n] - g_naive[n]).abs().max().item() for n in g_cached)
        assert worst <= TOL, worst
        assert cached.num_tokens < naive.num_tokens


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cache_path_on_a_dense_architecture_equals_naive(lora, tiny_model, shape_images, monkeypatch):
    """Qwen2-VL forced onto the cache path (pairs, groups of 8, with and without LoRA): per-token
    log-probs and every parameter gradient equal the naive rows' within 1e-5 (float32)."""
    monkeypatch.setitem(support.ARCHITECTURES, "qwen2_vl", support.ArchSupport(mrope=True, cache_sharing=True))
    spec = LoraSpec(r=4, alpha=8.0, dropout=0.0, freeze_vision=False) if lora else None
    model, processor = tiny_model("qwen2_vl", lora=spec)
    if lora:  # LoRA's B starts at zero: give it values so the adapter matters
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.train()
    _check_equal_to_naive(model, processor, shape_images)


def test_token_count_by_hand(tiny_model, shape_images):
    """Prompt pass: each prompt but its last token, once; completion pass: 1 + L per completion.
    Prompts of P = (P0, P1) tokens, completions of lengths l_ij: num_tokens = (P0 - 1) + (P1 - 1) +
    sum(1 + l_ij); the naive rows process sum(P_i + l_ij). Slots: 2 x (max P - 1) + 5 x (1 + max l)."""
    model, processor = tiny_model("qwen3_5")
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, [GROUP[:3], GROUP[3:5]])
    with torch.no_grad():
        cached = completion_logprobs(model, prompts, completions, pad_token_id=pad)
        naive = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
    p0, p1 = prompts.lengths
    lengths = [[len(c) for c in group] for group in completions]
    assert cached.num_tokens == (p0 - 1) + (p1 - 1) + sum(1 + n for group in lengths for n in group)
    assert naive.num_tokens == sum(p + n for p, group in zip((p0, p1), lengths) for n in group)
    longest = max(n for group in lengths for n in group)  # slots: 2 left-padded prompt rows, 5 completion rows
    assert cached.num_slots == 2 * (max(p0, p1) - 1) + 5 * (1 + longest)
    torch.testing.assert_close(cached.logps, naive.logps, atol=TOL, rtol=0)


def test_in_place_cache_updates_need_the_saved_copies(tiny_model, shape_images):
    """Without keep_cache_copies the backward through the cache fails: the linear-attention layers
    overwrite in place the recurrent state autograd saved (what the engine guards against)."""
    model, processor = tiny_model("qwen3_5")
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    rows = prompt_cache_inputs(
        model, prompts, encode_completions(processor, PAIRS), pad_token_id=pad, device=torch.device("cpu")
    )
    out = model(**rows.inputs, use_cache=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.logits.sum().backward()


def test_checkpointing_and_one_token_prompts_fall_back_with_a_reason(tiny_model, shape_images, caplog):
    """Checkpointed layers drop the cache while training: naive, with a one-line warning saying why;
    a one-token prompt leaves nothing to cache."""
    model, processor = tiny_model("qwen3_5", gradient_checkpointing=True)
    model.train()
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, PAIRS)
    with caplog.at_level(logging.WARNING, logger="vlalign.models.logprobs"):
        result = completion_logprobs(model, prompts, completions, pad_token_id=pad)
    assert result.mode == "naive"
    assert any("gradient-checkpointed layers drop" in r.getMessage() for r in caplog.records)
    model.eval()
    assert cache_sharing_problem(model, prompts) is None  # no backward to replay: the cache is kept
    short = replace(prompts, input_ids=[[5], prompts.input_ids[1]])
    assert "fewer than 2 tokens" in str(cache_sharing_problem(model, short))
