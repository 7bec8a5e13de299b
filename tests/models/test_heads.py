"""Scalar heads: where they read the backbone, initialisation, and saved reward models reopening.

The reference for "where a head reads" is independent of the engine: one plain forward of the
model per (prompt, completion) row with ``output_hidden_states=True``, the row's hidden state
taken at hand-computed positions (the last completion token for a reward head, the position
before each completion token for a value head).
"""

from __future__ import annotations

import json

import pytest
import torch

from vlalign.data.collate import build_rows, encode_completions, encode_prompts, pad_token_id_of
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.models.heads import (
    CriticModel,
    RewardModel,
    RewardModelInfo,
    ScalarHead,
    load_head,
    load_reward_model,
    new_head,
    read_info,
    save_head,
    save_reward_model,
)
from vlalign.models.load import LoraSpec
from vlalign.models.logprobs import completion_logprobs

TEXTS = [["The image shows a red circle.", "No"], ["Two squares and a very small green triangle."]]


def _batch(processor, images):
    samples = [
        PromptSample(id="a", images=[images[0]], prompt=user_prompt("Describe the image.")),
        PromptSample(id="b", images=[images[1], images[2]], prompt=user_prompt("How many squares?", 2)),
    ]
    return encode_prompts(processor, samples), encode_completions(processor, TEXTS)


def _row_hidden(model, prompts, completions, pad):
    """Last-layer hidden states of every naive row ``(R, T, H)`` and the rows' prompt / completion lengths."""
    rows = build_rows(prompts, completions, pad_token_id=pad)
    with torch.no_grad():
        out = model(**rows.model_inputs(), output_hidden_states=True)
    return out.hidden_states[-1], rows.prompt_lengths, rows.completion_lengths


def test_hidden_states_are_the_input_of_lm_head(tiny_model, shape_images):
    """``lm_head`` applied to the engine's per-token hidden states gives back its log-probs, so a head
    reads the same (final-norm) states as the vocabulary projection."""
    model, processor = tiny_model("qwen2_vl")
    prompts, completions = _batch(processor, shape_images)
    with torch.no_grad():
        out = completion_logprobs(model, prompts, completions, return_hidden=True)
        logits = model.get_output_embeddings()(out.hidden).float()
    logps = torch.log_softmax(logits, -1).gather(-1, out.token_ids.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(logps * out.mask, out.logps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_reward_head_reads_each_completions_last_token(tiny_model, shape_images, arch):
    """R(x, y) = head(h[prompt_len + |y| - 1]) of the plain forward, for every (prompt, completion)."""
    model, processor = tiny_model(arch)
    pad = pad_token_id_of(processor)
    prompts, completions = _batch(processor, shape_images)
    rm = RewardModel(model, new_head(model, seed=3))
    with torch.no_grad():
        rewards = rm(prompts, completions, pad_token_id=pad)
        naive = rm(prompts, completions, pad_token_id=pad, mode="naive")
        hidden, p_len, c_len = _row_hidden(model, prompts, completions, pad)
        expected = torch.stack([rm.head(hidden[r, p_len[r] + c_len[r] - 1]) for r in range(len(p_len))])
    assert rewards.shape == (3,) and rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(naive, expected, rtol=0, atol=1e-5)


def test_value_head_reads_the_state_before_each_token(tiny_model, shape_images):
    """V(s_t) = head(h[prompt_len + t - 1]): the position that predicts token t; exactly 0 on padding."""
    model, processor = tiny_model("qwen2_vl")
    pad = pad_token_id_of(processor)
    prompts, completions = _batch(processor, shape_images)
    critic = CriticModel(model, new_head(model, seed=4))
    with torch.no_grad():
        values = critic(prompts, completions, pad_token_id=pad)
        hidden, p_len, c_len = _row_hidden(model, prompts, completions, pad)
    assert values.shape == (3, int(c_len.max()))
    for r in range(3):
        n = int(c_len[r])
        expected = critic.head(hidden[r, p_len[r] - 1 : p_len[r] - 1 + n])
        torch.testing.assert_close(values[r, :n], expected, rtol=0, atol=1e-5)
        assert bool((values[r, n:] == 0).all())


def test_gradients_reach_head_and_backbone(tiny_model, shape_images):
    model, processor = tiny_model("qwen2_vl")
    prompts, completions = _batch(processor, shape_images)
    rm = RewardModel(model, new_head(model, seed=0))
    rm(prompts, completions, pad_token_id=pad_token_id_of(processor)).sum().backward()
    assert rm.head.score.weight.grad is not None and rm.head.score.weight.grad.abs().sum() > 0
    embed = model.get_input_embeddings().weight
    assert embed.grad is not None and embed.grad.abs().sum() > 0


def test_head_initialisation_is_seeded_and_small():
    """w ~ N(0, 1/(H+1)^2), b = 0: with H = 4095 the sample std of the 4095 weights is 1/4096 within
    a few per cent; the same seed gives the same head, another seed another."""
    a, b, c = ScalarHead(4095, seed=1), ScalarHead(4095, seed=1), ScalarHead(4095, seed=2)
    assert torch.equal(a.score.weight, b.score.weight) and not torch.equal(a.score.weight, c.score.weight)
    assert float(a.score.bias.detach()) == 0.0
    assert abs(float(a.score.weight.detach().std()) * 4096 - 1.0) < 0.05
    x = torch.ones(2, 3, 4095, dtype=torch.bfloat16)
    out = a(x)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, a.score.weight.sum().expand(2, 3), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="width 4095"):
        a(torch.ones(2, 8))
    with pytest.raises(ValueError, match="dropout"):
        ScalarHead(8, dropout=1.0)


def test_head_save_load_round_trip(tmp_path):
    head = ScalarHead(16, seed=5)
    path = save_head(head, tmp_path / "h.safetensors")
    again = load_head(path)
    assert torch.equal(again.score.weight, head.score.weight) and torch.equal(again.score.bias, head.score.bias)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_head(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("lora", [False, True])
def test_saved_reward_model_scores_the_same(tiny_model, shape_images, tmp_path, lora):
    """A reward model saved (full weights, or a LoRA adapter beside its base) and reopened gives the same
    rewards, and its info (normalisation, facts column) comes back."""
    model, processor = tiny_model("qwen2_vl", lora=LoraSpec(r=4, dropout=0.0) if lora else None)
    if lora:  # move the adapter away from its zero init, so that saving it matters
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    pad = pad_token_id_of(processor)
    prompts, completions = _batch(processor, shape_images)
    rm = RewardModel(model, new_head(model, seed=7)).eval()
    with torch.no_grad():
        before = rm(prompts, completions, pad_token_id=pad)
    info = RewardModelInfo(hidden_size=rm.head.hidden_size, offset=0.25, scale=2.0, facts_column="objects")
    out = save_reward_model(rm, processor, tmp_path / "rm", info)
    assert (out / "adapter_config.json").is_file() == lora
    again, proc2, info2 = load_reward_model(out, device="cpu", dtype="float32")
    assert info2 == info and not any(p.requires_grad for p in again.parameters()) and not again.training
    with torch.no_grad():
        after = again(
            encode_prompts(
                proc2,
                [
                    PromptSample(id="a", images=[shape_images[0]], prompt=user_prompt("Describe the image.")),
                    PromptSample(
                        id="b", images=[shape_images[1], shape_images[2]], prompt=user_prompt("How many squares?", 2)
                    ),
                ],
            ),
            encode_completions(proc2, TEXTS),
            pad_token_id=pad,
        )
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(info2.normalise(torch.tensor([2.25])), torch.tensor([1.0]))


def test_reward_model_info_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vlalign rm"):
        read_info(tmp_path)
    (tmp_path / "reward_model.json").write_text(json.dumps({"hidden_size": 8, "scale": 0.0}))
    with pytest.raises(ValueError, match="scale > 0"):
        read_info(tmp_path)
    (tmp_path / "reward_model.json").write_text(json.dumps({"hidden_size": 8, "colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        read_info(tmp_path)
