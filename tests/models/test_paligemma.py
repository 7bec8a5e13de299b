"""PaliGemma 2 (tiny): the prefix-LM layout, its one-based positions, and where sharing falls back.

The registry-following tests (``tests/models/test_logprobs.py`` and friends) check shared ==
naive; these check that the naive rows are PaliGemma's own layout, which its processor builds
when given a ``suffix``, so that both engines score what PaliGemma was trained to read.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlalign.data.collate import build_rows, encode_completions, encode_prompts, pad_token_id_of, render_prompt
from vlalign.data.schema import DataError, PromptSample, user_prompt
from vlalign.models import logprobs as engine
from vlalign.models.arch import position_base
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.packed_inputs import shared_inputs
from vlalign.models.packing import packed_layout
from vlalign.models.tiny_init import sincos_2d

QUESTION = "What colour is the circle?"
ANSWERS = ["It is red.", "Blue"]


def _prompts(processor, images):
    samples = [PromptSample(id=f"p{i}", images=[images[i]], prompt=user_prompt(QUESTION)) for i in range(2)]
    return samples, encode_prompts(processor, samples)


def test_naive_rows_are_the_processors_own_prefix_and_suffix(tiny_processor, shape_images):
    """The processor given ``suffix=answer`` builds ``[image x4, <bos>, question, \\n | answer, <eos>]``
    with ``token_type_ids`` 0 on the prefix and 1 on the suffix; our row (prompt encoded alone,
    completion appended) is the same ids and the same token types."""
    processor = tiny_processor("paligemma")
    samples, prompts = _prompts(processor, shape_images)
    batch = build_rows(prompts, encode_completions(processor, [[a] for a in ANSWERS]), pad_token_id=0)
    for r, (sample, answer) in enumerate(zip(samples, ANSWERS)):
        text = render_prompt(processor, sample.prompt)
        own = processor(text=[text], images=[[shape_images[r]]], suffix=[answer], return_tensors="pt")
        n = int(batch.attention_mask[r].sum())
        assert batch.input_ids[r, :n].tolist() == own["input_ids"][0].tolist()
        assert batch.vision["token_type_ids"][r, :n].tolist() == own["token_type_ids"][0].tolist()
        p = int(batch.prompt_lengths[r])
        assert set(own["token_type_ids"][0, :p].tolist()) == {0} and set(own["token_type_ids"][0, p:].tolist()) == {1}
    tok = processor.tokenizer
    assert tok.decode(batch.input_ids[0, 4:7].tolist()).startswith("<bos>What")  # bos after the 4 image tokens


def test_the_prefix_sees_itself_both_ways_and_the_completion_is_causal(tiny_model, shape_images):
    """Bidirectional prefix: changing the question's LAST word changes the hidden state of its
    FIRST word (it sees the future); causal suffix: changing a later completion token leaves an
    earlier one untouched. Positions start at 1 (the model's default; generation and the packed
    rows follow it)."""
    model, processor = tiny_model("paligemma")
    model.eval()
    assert position_base(model) == 1
    rows = []
    for question, answer in [("Is it red?", "Yes it is"), ("Is it blue?", "Yes it was")]:
        sample = PromptSample(id="a", images=[shape_images[0]], prompt=user_prompt(question))
        prompts = encode_prompts(processor, [sample])
        rows.append((prompts, build_rows(prompts, encode_completions(processor, [[answer]]), pad_token_id=0)))
    with torch.no_grad():
        states = [model(**b.model_inputs(), output_hidden_states=True).hidden_states[-1][0] for _, b in rows]
    first_word = 5  # 4 image tokens, <bos>, then the question
    assert (states[0][first_word] - states[1][first_word]).abs().max() > 1e-3
    p = int(rows[0][1].prompt_lengths[0])
    # same prompt, completions differing only in their last word: the first completion token agrees
    prompts = rows[0][0]
    batch = build_rows(prompts, encode_completions(processor, [["Yes it is", "Yes it was"]]), pad_token_id=0)
    with torch.no_grad():
        out = model(**batch.model_inputs(), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out[0, : p + 2], out[1, : p + 2], atol=1e-6, rtol=0)
    packed = packed_layout(prompts, encode_completions(processor, [["Yes"]]), pad_token_id=0)
    assert shared_inputs(model, prompts, packed, torch.device("cpu"))["position_ids"][0, 0].item() == 1


def test_log_probs_equal_the_processors_own_suffix_layout(tiny_model, shape_images):
    """Independent reference: log_softmax of the model's logits on the processor's own prefix /
    suffix rows (``suffix=``, its ``labels``) equals the engine's per-token log-probs, shared and naive."""
    model, processor = tiny_model("paligemma")
    model.eval()
    samples, prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, [[a] for a in ANSWERS])
    with torch.no_grad():
        shared = completion_logprobs(model, prompts, completions, pad_token_id=pad_token_id_of(processor))
        texts = [render_prompt(processor, s.prompt) for s in samples]
        own = processor(
            text=texts, images=[[im] for im in shape_images[:2]], suffix=ANSWERS, return_tensors="pt", padding=True
        )
        labels = own.pop("labels")
        logits = model(**own).logits[:, :-1].float()
    token = F.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    for r in range(2):
        ref = token[r][labels[r, 1:] != -100]
        assert shared.mode == "shared"
        torch.testing.assert_close(shared.logps[r, : ref.numel()], ref, atol=1e-5, rtol=0)


def test_rows_longer_than_the_sliding_window_fall_back_with_a_reason(tiny_model, shape_images, caplog):
    """Gemma2's forward takes one mask for all layers inside PaliGemma (no dict of masks), so a packed
    row longer than the sliding window cannot be expressed: the engine scores it the naive way and
    says why, once; the result is the naive one."""
    model, processor = tiny_model("paligemma")
    model.config.text_config.sliding_window = 12  # shorter than a prompt (4 image tokens + question)
    _, prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, [ANSWERS, ANSWERS])
    pad = pad_token_id_of(processor)
    engine._logged.clear()
    with caplog.at_level(logging.WARNING, logger="vlalign.models.logprobs"), torch.no_grad():
        result = completion_logprobs(model, prompts, completions, pad_token_id=pad)
        naive = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
    assert result.mode == "naive"
    (message,) = [r.getMessage() for r in caplog.records if "sliding-window" in r.getMessage()]
    assert "paligemma has sliding-window layers" in message and "naive way" in message
    torch.testing.assert_close(result.logps, naive.logps, atol=0, rtol=0)


def test_text_without_images_is_refused_naming_the_samples(tiny_processor):
    """PaliGemma's processor refuses a prompt without an image; the batch fails with the sample ids."""
    processor = tiny_processor("paligemma")
    with pytest.raises(DataError, match=r"rejected the batch of samples \['t0'\].*images"):
        encode_prompts(processor, [PromptSample(id="t0", images=[], prompt=user_prompt("Hello?", 0))])


def test_sdpa_is_refused_so_the_model_loads_with_eager_attention(tiny_model_dir, caplog):
    """Gemma2 (PaliGemma 2's decoder) does not support sdpa: the default sdpa load falls back to
    eager attention with a warning instead of failing."""
    from vlalign.models.arch import attention_implementation
    from vlalign.models.load import load_model_and_processor

    with caplog.at_level(logging.WARNING, logger="vlalign.models.load_checks"):
        model, _ = load_model_and_processor(tiny_model_dir("paligemma"), device="cpu", dtype="float32")
    assert attention_implementation(model) == "eager"
    assert any("does not support sdpa" in r.getMessage() for r in caplog.records)


def test_siglip_position_table_starts_geometric(tiny_model_dir):
    """PaliGemma's SigLIP tower gets the 2-D sine-cosine position table the other SigLIP towers get."""
    weights = load_file(tiny_model_dir("paligemma") / "model.safetensors")
    (table,) = [v for k, v in weights.items() if k.endswith("position_embedding.weight") and "vision" in k]
    assert table.shape[0] == 4  # 2 x 2 patches at tiny
    torch.testing.assert_close(table, sincos_2d(2, table.shape[1]), rtol=0, atol=0)
