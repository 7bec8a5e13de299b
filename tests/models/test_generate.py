"""Tests of batched generation (vlalign.models.generate): sampling math by hand, then the decode loop
against ``model.generate`` and against itself under other batchings."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from vlalign.data.chat import feature_token_ids
from vlalign.data.collate import PromptCollator
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.models.generate import (
    completion_uniforms,
    filter_logits,
    generate,
    generate_batch,
    sample_tokens,
    stop_token_ids,
    stream_seed,
)
from vlalign.models.load import find_parts
from vlalign.models.moe import router_logits_off
from vlalign.models.tiny import ARCHITECTURES as ARCHS

QUESTIONS = (
    "Describe the image.",
    "How many squares are there?",
    "What colour is the circle?",
    "Is there a red star in the image?",
    "Describe the image.",
)


@pytest.fixture
def prompts(shape_images: list) -> list[PromptSample]:
    """Five prompts over the four shape images (the last repeats an image with another id)."""
    return [PromptSample(f"p{i}", [shape_images[i % 4]], user_prompt(q)) for i, q in enumerate(QUESTIONS)]


# ----------------------------------------------------------------------------- sampling math


def test_filter_logits_hand_values() -> None:
    """probs (0.5, 0.3, 0.15, 0.05): top_p = 0.7 keeps the tokens whose preceding mass is below 0.7,
    i.e. 0.5 (before: 0) and 0.3 (before: 0.5), not 0.15 (before: 0.8); renormalised 0.625 / 0.375.
    top_k = 3 keeps 0.5, 0.3, 0.15 -> /0.95. Temperature 2 on logits log(p): p^(1/2) / sum p^(1/2)."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    logits = p.log()
    out = filter_logits(logits, temperature=1.0, top_p=0.7).exp()
    assert torch.allclose(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=out.dtype), atol=1e-6)
    out = filter_logits(logits, temperature=1.0, top_k=3).exp()
    assert torch.allclose(out, torch.tensor([[0.5, 0.3, 0.15, 0.0]], dtype=out.dtype) / 0.95, atol=1e-6)
    out = filter_logits(logits, temperature=2.0).exp()
    root = p.sqrt() / p.sqrt().sum()
    assert torch.allclose(out.double(), root, atol=1e-6)
    # top_p smaller than the largest probability keeps exactly one token
    out = filter_logits(logits, temperature=1.0, top_p=0.2).exp()
    assert out[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_sample_tokens_inverse_cdf() -> None:
    """probs (0.2, 0.5, 0.3) -> cdf (0.2, 0.7, 1.0): u < 0.2 -> 0, 0.2 <= u < 0.7 -> 1, else 2
    (points a rounding error away from a boundary are left out: exp(log p) is not exact)."""
    logp = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log().expand(6, 3)
    u = torch.tensor([0.0, 0.1999, 0.2001, 0.6999, 0.7001, 0.9999], dtype=torch.float64)
    assert sample_tokens(logp, u).tolist() == [0, 0, 1, 1, 2, 2]


def test_sample_tokens_frequencies() -> None:
    """40 000 draws follow the distribution: each frequency within 4 standard errors (<= 0.01)."""
    probs = torch.tensor([0.1, 0.6, 0.05, 0.25])
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = sample_tokens(probs.log().expand(len(u), 4), u)
    freq = torch.bincount(draws, minlength=4).double() / len(u)
    se = (probs.double() * (1 - probs.double()) / len(u)).sqrt()
    assert bool(((freq - probs.double()).abs() < 4 * se).all()), freq


def test_streams_are_per_completion() -> None:
    """Each completion's uniforms depend on (seed, sample id, k) only."""
    a = completion_uniforms(3, ["x", "y"], 2, 5)
    b = completion_uniforms(3, ["y"], 2, 5)
    assert a.shape == (4, 5) and torch.equal(a[2:], b)
    assert not torch.equal(a[0], a[1]) and stream_seed(3, "x", 0) != stream_seed(4, "x", 0)


# ----------------------------------------------------------------------------- the decode loop


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_model_generate(arch: str, tiny_model: Callable[..., Any], prompts: list) -> None:
    """Greedy decoding gives model.generate's tokens, on every architecture (left-padded batch)."""
    model, processor = tiny_model(arch)
    gens = generate(model, processor, prompts, max_new_tokens=8, batch_size=3)
    batch = PromptCollator(processor)(prompts)
    # an MoE config asking for router logits (tiny Qwen3.5-MoE) breaks model.generate (its aux loss
    # takes the whole attention mask at each one-token step): turned off, as our loop does
    with torch.no_grad():
        ref = model.generate(
            **batch.model_inputs(),
            do_sample=False,
            max_new_tokens=8,
            suppress_tokens=feature_token_ids(processor),
            **router_logits_off(model),
        )
    ref = ref[:, batch.input_ids.shape[1] :].tolist()
    stops = set(stop_token_ids(model, processor))
    distinct = set()
    for i, ids in enumerate(gens.token_ids):
        assert len(ids) == 1
        assert ids[0] == ref[i][: len(ids[0])]
        assert gens.stopped[i][0] == (ids[0][-1] in stops)
        distinct.update(ids[0])
    assert len(distinct) >= 3, "degenerate outputs would make the comparison vacuous"
    assert gens.new_tokens == sum(len(g[0]) for g in gens.token_ids) and gens.tokens_per_s > 0


def test_n_greedy_equals_per_row(tiny_model: Callable[..., Any], prompts: list) -> None:
    """n greedy completions in one batch equal each prompt generated alone."""
    model, processor = tiny_model("qwen2_vl")
    together = generate(model, processor, prompts, n=3, max_new_tokens=8, batch_size=5)
    for i, p in enumerate(prompts):
        alone = generate(model, processor, [p], max_new_tokens=8)
        assert together.token_ids[i] == alone.token_ids[0] * 3
        assert together.texts[i] == alone.texts[0] * 3


def test_sampling_reproducible_and_batch_invariant(tiny_model: Callable[..., Any], prompts: list) -> None:
    """Same seed -> same completions whatever the batch size or prompt order; another seed differs;
    the n samples of a prompt differ from each other."""
    model, processor = tiny_model("qwen2_vl")
    kw = dict(n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7)
    a = generate(model, processor, prompts, batch_size=5, **kw)
    b = generate(model, processor, prompts[::-1], batch_size=1, **kw)
    assert a.token_ids == b.token_ids[::-1]
    c = generate(model, processor, prompts, batch_size=5, **{**kw, "seed": 8})
    assert a.token_ids != c.token_ids
    assert all(len({tuple(x) for x in group}) > 1 for group in a.token_ids)


def test_image_processed_once_per_batch(tiny_model: Callable[..., Any], prompts: list) -> None:
    """With n = 4 samples: one processor call and one vision-tower pass per batch of prompts."""
    model, processor = tiny_model("qwen2_vl")
    vision = model.get_submodule(find_parts(model).vision)
    seen: list[int] = []
    handle = vision.register_forward_hook(lambda mod, args, out: seen.append(1))

    class CountingProcessor:
        """Delegates to the real processor and counts its calls."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.calls = inner, 0

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    counting = CountingProcessor(processor)
    try:
        generate(model, counting, prompts, n=4, temperature=1.0, max_new_tokens=4, batch_size=3)
    finally:
        handle.remove()
    assert counting.calls == 2 and len(seen) == 2  # ceil(5 / 3) batches


def test_stop_token_ends_rows_and_others_continue(tiny_model: Callable[..., Any], prompts: list) -> None:
    """Declaring row 0's second greedy token a stop token ends row 0 there (stop token kept, text
    without it); the other rows, decoded after row 0 left the batch, are unchanged."""
    model, processor = tiny_model("qwen2_vl")
    batch = PromptCollator(processor)(prompts)
    free, free_stop = generate_batch(model.eval(), batch, n=1, max_new_tokens=8, stop_ids=[-1])
    assert not any(free_stop)
    stop = free[0][1]
    cut, cut_stop = generate_batch(model, batch, n=1, max_new_tokens=8, stop_ids=[stop])
    assert cut[0] == free[0][:2] and cut_stop[0]
    for row in range(1, len(prompts)):
        end = free[row].index(stop) + 1 if stop in free[row] else len(free[row])
        assert cut[row] == free[row][:end]
        assert cut_stop[row] == (stop in free[row])


def test_kept_prompts_score_the_sampled_tokens(tiny_model: Callable[..., Any], prompts: list) -> None:
    """keep_prompts hands the processed prompts to the shared-prefix log-prob engine, which scores
    exactly the sampled token ids; the scores equal the simple one-row-per-completion computation."""
    from vlalign.eval.policy import completion_token_logprobs
    from vlalign.models.logprobs import completion_logprobs

    model, processor = tiny_model("qwen2_vl")
    gens = generate(
        model, processor, prompts[:3], n=2, temperature=1.0, max_new_tokens=5, batch_size=3, keep_prompts=True
    )
    assert len(gens.encoded) == 1 and gens.encoded[0].sample_ids == ["p0", "p1", "p2"]
    with torch.no_grad():
        shared = completion_logprobs(model.eval(), gens.encoded[0], gens.token_ids)
    flat_ids = [ids for group in gens.token_ids for ids in group]
    flat_samples = [p for p in prompts[:3] for _ in range(2)]
    naive = completion_token_logprobs(model, processor, flat_samples, flat_ids)
    for r, ref in enumerate(naive):
        assert torch.allclose(shared.logps[r, : len(ref)], ref, atol=1e-5)


def test_peft_wrapped_model(tiny_model: Callable[..., Any], prompts: list) -> None:
    """A LoRA-wrapped model generates (its adapters start at zero: the same tokens as the base)."""
    from vlalign.models.load import LoraSpec

    base, processor = tiny_model("qwen2_vl")
    wrapped, _ = tiny_model("qwen2_vl", lora=LoraSpec(r=4))
    a = generate(base, processor, prompts, n=2, temperature=1.0, max_new_tokens=6, seed=1)
    b = generate(wrapped, processor, prompts, n=2, temperature=1.0, max_new_tokens=6, seed=1)
    assert a.token_ids == b.token_ids


def test_training_mode_restored_and_bad_arguments(tiny_model: Callable[..., Any], prompts: list) -> None:
    model, processor = tiny_model("qwen2_vl")
    model.train()
    generate(model, processor, prompts[:1], max_new_tokens=2)
    assert model.training
    with pytest.raises(ValueError, match="top_p"):
        generate(model, processor, prompts, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, processor, prompts, max_new_tokens=0)
    assert math.isfinite(generate(model, processor, [], max_new_tokens=2).tokens_per_s)
