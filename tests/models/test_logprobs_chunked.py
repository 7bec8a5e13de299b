"""The chunked LM head of the log-prob engine equals the full logits, on every architecture.

``logits_mode="chunked"`` (what the default ``"auto"`` picks from 32,768 vocabulary rows) takes the last hidden
states from the model's forward and
computes the completion tokens' log-probs a chunk at a time
(:func:`vlalign.models.head_logprobs.head_logprobs`); ``"full"`` is the path before it (the kept
logits, a float32 log-softmax). Per-token log-probs, entropies and every parameter gradient of a
DPO loss (pairs) and of a GRPO loss with an entropy bonus (groups of 8) agree in float32.
Measured on the tiny models (chunks of 5 tokens, all five architectures): log-probs within
9.5e-7 (2 float32 ulps at |log p| < 8), entropies within 3.8e-7 relative (2.4e-6 absolute on
entropies of about 6.4: a sum over the vocabulary), gradients within 1.14e-6; the tolerances
below are those, rounded up.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_logprobs import GROUP, PAIRS, _dpo, _grads, _grpo, _perturb_lora, _prompts

from vlalign.data.collate import encode_completions, pad_token_id_of
from vlalign.models import arch as support
from vlalign.models import logprobs as engine
from vlalign.models.load import LoraSpec
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.tiny import ARCHITECTURES

LOGP_TOL, ENTROPY_RTOL, GRAD_TOL = 1e-6, 5e-7, 1.2e-6
GRAD_TOL_BY_ARCH = {"gemma4": 6e-6}
"""Gemma 4's gradients reach 5 (scaled embeddings, q/k/v norms): 5.0e-6 measured, ~1e-6 of their size."""


def _step(model, prompts, completions, loss_fn, pad, **kwargs):
    model.zero_grad(set_to_none=True)
    result = completion_logprobs(model, prompts, completions, pad_token_id=pad, return_entropy=True, **kwargs)
    (loss_fn(result) - 0.01 * (result.entropy * result.mask).sum() / result.mask.sum()).backward()
    return result, _grads(model)


def _compare(model, prompts, completions, loss_fn, pad, grad_tol=GRAD_TOL, **kwargs):
    full, g_full = _step(model, prompts, completions, loss_fn, pad, logits_mode="full", **kwargs)
    chunked, g_chunked = _step(model, prompts, completions, loss_fn, pad, logits_mode="chunked", block_rows=5, **kwargs)
    assert (full.logits_mode, chunked.logits_mode) == ("full", "chunked")
    assert chunked.mode == full.mode
    torch.testing.assert_close(chunked.logps, full.logps, atol=LOGP_TOL, rtol=0)
    torch.testing.assert_close(chunked.entropy, full.entropy, atol=0, rtol=ENTROPY_RTOL)
    assert torch.equal(chunked.mask, full.mask) and torch.equal(chunked.token_ids, full.token_ids)
    assert bool((chunked.logps[~chunked.mask] == 0).all())
    assert g_chunked.keys() == g_full.keys()
    head = model.get_output_embeddings().weight  # its gradient comes from the chunked backward
    assert (head.grad is not None and bool(head.grad.abs().max() > 0)) or not head.requires_grad
    worst = max((g_chunked[n] - g_full[n]).abs().max().item() for n in g_full)
    assert worst <= grad_tol, worst
    return chunked


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_equals_full_logits_pairs_and_groups(arch, tiny_model, shape_images):
    """Shared prefixes (the default), prompts with 1 and 2 images, ragged completions; k = 2 with
    a DPO loss and k = 8 with a GRPO loss, chunks of 5 tokens (several chunks per batch)."""
    model, processor = tiny_model(arch)
    model.train()
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    for groups, loss_fn in ((PAIRS, _dpo), ([GROUP, GROUP[::-1]], _grpo)):
        tol = GRAD_TOL_BY_ARCH.get(arch, GRAD_TOL)
        out = _compare(model, prompts, encode_completions(processor, groups), loss_fn, pad, grad_tol=tol)
        assert out.mode == ("shared" if arch in support.ARCHITECTURES else "naive")  # unshared archs fall back


def test_chunked_with_lora_and_naive_rows(tiny_model, shape_images):
    """LoRA (frozen head: only the hidden states carry the gradient) and the naive layout."""
    model, processor = tiny_model("qwen2_vl", lora=LoraSpec(r=4, alpha=8.0, dropout=0.0, freeze_vision=False))
    _perturb_lora(model)
    model.train()
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, PAIRS)
    _compare(model, prompts, completions, _dpo, pad)
    assert _compare(model, prompts, completions, _dpo, pad, mode="naive").mode == "naive"


def test_a_transform_after_the_head_falls_back_to_full_logits(tiny_model, shape_images, monkeypatch, caplog):
    """A model whose logits are not its head's output (here a forward hook doubling them) is caught
    by the probe: the full path runs, once logged, and gives the model's own (doubled) logits."""
    model, processor = tiny_model("llava")
    model.eval()
    monkeypatch.setattr(engine, "_logged", set())
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, PAIRS)
    with torch.no_grad():
        plain = completion_logprobs(model, prompts, completions, pad_token_id=pad, logits_mode="chunked")
        handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: out * 2.0)
        try:
            with caplog.at_level(logging.WARNING, logger="vlalign.models.logprobs"):
                doubled = completion_logprobs(model, prompts, completions, pad_token_id=pad, logits_mode="chunked")
                completion_logprobs(model, prompts, completions, pad_token_id=pad, logits_mode="chunked")
            reference = completion_logprobs(model, prompts, completions, pad_token_id=pad, logits_mode="full")
        finally:
            handle.remove()
    assert plain.logits_mode == "chunked" and doubled.logits_mode == "full"
    assert [r.getMessage() for r in caplog.records] == [
        "chunked log-probs unavailable: the model's logits differ from its LM head's output (a transform after "
        "the head?); computing the full logits (logits_mode='full')"
    ]
    torch.testing.assert_close(doubled.logps, reference.logps, atol=0, rtol=0)
    assert (doubled.logps - plain.logps).abs().max() > 1e-2


def test_autocast_bfloat16_uses_the_chunked_path(tiny_model, shape_images):
    """Under bf16 autocast the head computes in bf16 (the probe's dtype): the chunked path runs
    and matches the full path to bf16 rounding of the logits (log-probs within 2e-2 here)."""
    model, processor = tiny_model("qwen2_vl")
    model.eval()
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, PAIRS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = completion_logprobs(
            model, prompts, completions, pad_token_id=pad, logits_mode="chunked", block_rows=3
        )
        full = completion_logprobs(model, prompts, completions, pad_token_id=pad, logits_mode="full")
    assert chunked.logits_mode == "chunked"
    torch.testing.assert_close(chunked.logps, full.logps, atol=2e-2, rtol=0)


def test_bad_logits_mode_is_refused(tiny_model, shape_images):
    model, processor = tiny_model("llava")
    prompts = _prompts(processor, shape_images)
    with pytest.raises(ValueError, match="logits_mode must be 'chunked' or 'full'"):
        completion_logprobs(model, prompts, encode_completions(processor, PAIRS), logits_mode="sparse")
