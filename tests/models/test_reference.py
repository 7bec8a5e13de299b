"""Reference strategies: frozen copy, adapter disabled, and the precomputed on-disk cache.

Forwards are counted with a global module hook on every ``*ForConditionalGeneration`` call, so a
"no forward" claim covers any copy of the model, not only the strategy's own counter.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlalign.data.collate import encode_completions, encode_prompts, pad_token_id_of
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.models.fingerprints import model_fingerprint, prompt_content_hash, sample_content_hash
from vlalign.models.load import LoraSpec
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.reference import (
    AdapterDisabledReference,
    FrozenCopyReference,
    PrecomputedReference,
    ReferenceCacheMiss,
    make_reference,
)

COMPLETIONS = [["Yes.", "No, a blue square."], ["A red disc and a bar.", "Nothing.", "Two shapes."]]


@pytest.fixture
def forward_calls():
    """A list that grows by one at every top-level model forward (any instance)."""
    calls: list[str] = []

    def hook(module, args):
        if type(module).__name__.endswith("ForConditionalGeneration"):
            calls.append(type(module).__name__)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    yield calls
    handle.remove()


def _batch(processor, images, questions=("Is there a red circle?", "Describe the image.")):
    samples = [
        PromptSample(id=f"s{i}", images=[img], prompt=user_prompt(q))
        for i, (img, q) in enumerate(zip(images, questions))
    ]
    return encode_prompts(processor, samples), encode_completions(processor, COMPLETIONS)


def _direct(model, prompts, completions, pad, temperature=1.0):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = completion_logprobs(model, prompts, completions, pad_token_id=pad, temperature=temperature)
    model.train(was)
    return out


def _perturb_lora(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_frozen_copy_keeps_the_model_of_its_creation(tiny_model, shape_images):
    model, processor = tiny_model("qwen2_vl")
    pad = pad_token_id_of(processor)
    prompts, completions = _batch(processor, shape_images[:2])
    ref = make_reference("copy", model, pad_token_id=pad)
    assert isinstance(ref, FrozenCopyReference)
    before = _direct(model, prompts, completions, pad)
    first = ref.logprobs(prompts, completions)
    torch.testing.assert_close(first.logps, before.logps, atol=0, rtol=0)
    assert not first.logps.requires_grad and not any(p.requires_grad for p in ref.model.parameters())
    # a training step moves the policy, not the reference
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    completion_logprobs(model, prompts, completions, pad_token_id=pad).sums.sum().backward()
    opt.step()
    moved = _direct(model, prompts, completions, pad)
    assert (moved.logps - before.logps).abs().max() > 1e-3
    torch.testing.assert_close(ref.logprobs(prompts, completions).logps, first.logps, atol=0, rtol=0)
    assert ref.num_forwards == 2 and model.training


def test_adapter_disabled_reference_is_the_base_model(tiny_model, shape_images):
    base, processor = tiny_model("llava")
    pad = pad_token_id_of(processor)
    policy, _ = tiny_model("llava", lora=LoraSpec(r=4, alpha=8.0, dropout=0.0))
    _perturb_lora(policy)
    policy.train()
    prompts, completions = _batch(processor, shape_images[:2])
    ref = make_reference("adapter", policy, pad_token_id=pad)
    assert isinstance(ref, AdapterDisabledReference)
    policy_before = _direct(policy, prompts, completions, pad)
    got = ref.logprobs(prompts, completions)
    expected = _direct(base, prompts, completions, pad)
    torch.testing.assert_close(got.logps, expected.logps, atol=1e-6, rtol=0)
    assert (policy_before.logps - expected.logps).abs().max() > 1e-3  # the adapter matters
    # afterwards the adapter is active again and every module is back in training mode
    torch.testing.assert_close(_direct(policy, prompts, completions, pad).logps, policy_before.logps, atol=0, rtol=0)
    assert all(m.training for m in policy.modules())
    # the adapter-disabled model fingerprints like the plain base model
    assert ref.fingerprint() == model_fingerprint(base) == model_fingerprint(policy, base_only=True)
    assert model_fingerprint(policy) != model_fingerprint(base)
    with pytest.raises(ValueError, match="'copy' reference"):
        make_reference("adapter", base)


def test_precomputed_second_run_runs_no_reference_forward(tiny_model, shape_images, tmp_path, forward_calls):
    """Run 1 fills the cache (one forward per batch); run 2, a fresh model from the same weights
    and a fresh reference object, performs no forward at all and returns the same numbers."""
    model, processor = tiny_model("qwen2_vl")
    pad = pad_token_id_of(processor)
    batches = [_batch(processor, shape_images[:2]), _batch(processor, shape_images[2:4])]
    ref = make_reference("precomputed", model, cache_dir=tmp_path, pad_token_id=pad)
    assert isinstance(ref, PrecomputedReference)
    stats = ref.precompute(batches)
    assert stats == {"hits": 0, "computed": 10} and len(forward_calls) == 2
    first = [ref.logprobs(p, c) for p, c in batches]
    assert len(forward_calls) == 2 and ref.num_hits == 10  # read back from the cache
    for (p, c), got in zip(batches, first):
        torch.testing.assert_close(got.logps, _direct(model, p, c, pad).logps, atol=1e-6, rtol=0)
    forward_calls.clear()
    fresh, _ = tiny_model("qwen2_vl")
    second = make_reference("precomputed", fresh, cache_dir=tmp_path, pad_token_id=pad)
    second.release_source()  # it could not compute even if it wanted to
    again = [second.logprobs(p, c) for p, c in batches]
    assert forward_calls == [] and second.num_forwards == 0 and second.num_hits == 10
    for a, b in zip(first, again):
        assert torch.equal(a.logps, b.logps) and torch.equal(a.mask, b.mask) and torch.equal(a.token_ids, b.token_ids)
        assert a.mode == "cache"


def test_reload_reads_shards_another_process_wrote(tiny_model, shape_images, tmp_path, forward_calls):
    """Two references on one cache folder (the main process writing, another reading): the reader
    keeps the entries it has read until reload(), after which it finds the writer's new shards and
    runs no forward."""
    model, processor = tiny_model("qwen2_vl")
    pad = pad_token_id_of(processor)
    first, second = _batch(processor, shape_images[:2]), _batch(processor, shape_images[2:4])
    writer = make_reference("precomputed", model, cache_dir=tmp_path, pad_token_id=pad)
    reader = make_reference("precomputed", model, cache_dir=tmp_path, pad_token_id=pad)
    assert isinstance(reader, PrecomputedReference)
    reader.release_source()
    writer.precompute([first])
    reader.logprobs(*first)  # reads the folder once
    writer.precompute([second])
    with pytest.raises(ReferenceCacheMiss):
        reader.logprobs(*second)
    forward_calls.clear()
    reader.reload()
    got = reader.logprobs(*second)
    assert forward_calls == [] and torch.equal(got.logps, writer.logprobs(*second).logps)


def test_changed_image_or_model_invalidates_entries(tiny_model, shape_images, tmp_path, forward_calls):
    model, processor = tiny_model("qwen2_vl")
    pad = pad_token_id_of(processor)
    prompts, completions = _batch(processor, shape_images[:2])
    ref = make_reference("precomputed", model, cache_dir=tmp_path, pad_token_id=pad)
    ref.logprobs(prompts, completions)
    # sample 1's image changes: its 3 completions are recomputed (one forward), sample 0's 2 are hits
    changed, _ = _batch(processor, [shape_images[0], shape_images[3]])
    assert prompt_content_hash(changed, 0) == prompt_content_hash(prompts, 0)
    assert prompt_content_hash(changed, 1) != prompt_content_hash(prompts, 1)
    forward_calls.clear()
    hits, computed = ref.num_hits, ref.num_computed
    got = ref.logprobs(changed, completions)
    assert len(forward_calls) == 1 and ref.num_computed - computed == 3 and ref.num_hits - hits == 2
    torch.testing.assert_close(got.logps, _direct(model, changed, completions, pad).logps, atol=1e-6, rtol=0)
    # another temperature is another entry
    forward_calls.clear()
    warm = ref.logprobs(prompts, completions, temperature=0.7)
    assert len(forward_calls) == 1
    torch.testing.assert_close(warm.logps, _direct(model, prompts, completions, pad, 0.7).logps, atol=1e-6, rtol=0)
    # a changed model: a new fingerprint, so nothing of the old cache is used
    other, _ = tiny_model("qwen2_vl")
    with torch.no_grad():
        other.get_output_embeddings().weight[:5] += 0.05
    ref2 = make_reference("precomputed", other, cache_dir=tmp_path, pad_token_id=pad)
    assert ref2.fingerprint() != ref.fingerprint()
    forward_calls.clear()
    got2 = ref2.logprobs(prompts, completions)
    assert len(forward_calls) == 1 and ref2.num_computed == 5 and ref2.num_hits == 0
    torch.testing.assert_close(got2.logps, _direct(other, prompts, completions, pad).logps, atol=1e-6, rtol=0)
    # released source + a miss: a clear error naming the sample
    ref2.release_source()
    with pytest.raises(ReferenceCacheMiss, match="sample 's1'.*precompute"):
        ref2.logprobs(changed, completions)


def test_content_hashes_and_factory_errors(shape_images, tmp_path, tiny_model):
    prompt = user_prompt("What is it?")
    assert sample_content_hash(prompt, [shape_images[0]]) == sample_content_hash(prompt, [shape_images[0].copy()])
    assert sample_content_hash(prompt, [shape_images[0]]) != sample_content_hash(prompt, [shape_images[1]])
    other_text = sample_content_hash(user_prompt("What?"), [shape_images[0]])
    assert sample_content_hash(prompt, [shape_images[0]]) != other_text
    model, _ = tiny_model("llava")
    with pytest.raises(ValueError, match="cache_dir"):
        make_reference("precomputed", model)
    with pytest.raises(ValueError, match="unknown reference strategy 'frozen'"):
        make_reference("frozen", model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source model or an explicit fingerprint"):
        PrecomputedReference(None, tmp_path)
