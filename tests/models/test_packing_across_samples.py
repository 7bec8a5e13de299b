"""Several prompts (each with its completions) in one row: exact against one prompt per row.

``completion_logprobs(..., pack_length=n)`` puts consecutive prompts in rows of at most ``n``
tokens, keeps them apart with the ``samples`` ids in the attention mask and restarts positions
(Qwen's 3-row mRoPE positions included) at each prompt. Each completion then sees exactly the
keys, at exactly the positions, it sees in a row of its own, so the per-token log-probs and every
parameter gradient must agree with the one-prompt-per-row layout to float rounding (float32,
1e-5, the tolerance of ``tests/models/test_logprobs.py``). Three prompts with 1, 2 and 1 images
and different questions make the rows ragged and put the vision inputs of several prompts in one
row; Gemma3 adds bidirectional image blocks and sliding-window layers.
"""

from __future__ import annotations

import pytest
import torch

from vlalign.data.collate import EncodedPrompts, encode_completions, encode_prompts, pad_token_id_of
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.losses import dpo_loss, ppo_clip_loss
from vlalign.losses.advantages import grpo_advantages
from vlalign.losses.preference import PreferenceLogps
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.packed_inputs import PACKABLE
from vlalign.models.packing import block_attention_mask, mrope_positions, pack_prompts, packed_layout
from vlalign.models.tiny import ARCHITECTURES

TOL = 1e-5
ARCHS = tuple(a for a in ARCHITECTURES if a in PACKABLE)
QUESTIONS = ["Is there a red circle?", "Describe every shape in the image, from left to right, with its colour."]
PAIRS = [["Yes.", "No, there is a blue square."], ["A red disc and a green triangle.", "Nothing."], ["Two", "One."]]
GROUP = ["Yes", "No", "A red disc.", "3", "The square is blue and small.", "I see a triangle"]


def _prompts(processor, images):
    samples = [
        PromptSample(
            id=f"p{i}", images=[images[(i + j) % 4] for j in range(n)], prompt=user_prompt(QUESTIONS[i % 2], n)
        )
        for i, n in enumerate((1, 2, 1))
    ]
    return encode_prompts(processor, samples)


def _dpo(result):
    sums = result.by_prompt(result.sums)  # (B, 2)
    ref = torch.tensor([-3.0, -5.0, -4.0])
    logps = PreferenceLogps(
        chosen_logps=sums[:, 0], rejected_logps=sums[:, 1], ref_chosen_logps=ref, ref_rejected_logps=ref - 1.0
    )
    return dpo_loss(logps, beta=0.5).losses.mean()


def _grpo(result):
    rewards = torch.arange(len(result), dtype=torch.float32) % 3
    adv = grpo_advantages(rewards, group_size=len(GROUP))
    old = result.logps.detach() + 0.01 * torch.linspace(-1, 1, result.logps.numel()).reshape(result.logps.shape)
    out = ppo_clip_loss(result.logps, old, adv, result.mask)
    return out.losses.sum() / result.mask.sum()


def _run(model, prompts, completions, loss_fn, pad, pack_length):
    model.zero_grad(set_to_none=True)
    result = completion_logprobs(model, prompts, completions, pad_token_id=pad, pack_length=pack_length)
    loss_fn(result).backward()
    return result, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_equal_one_prompt_per_row(arch, tiny_model, shape_images):
    """Pairs (DPO loss) and groups of 6 (GRPO loss): all three prompts in one row, and a budget
    that fits two of them in the first row and the third alone, against one prompt per row."""
    model, processor = tiny_model(arch, gradient_checkpointing=arch == "qwen2_vl")
    model.train()
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    for groups, loss_fn in ((PAIRS, _dpo), ([GROUP, GROUP[::-1], GROUP[1:] + GROUP[:1]], _grpo)):
        completions = encode_completions(processor, groups)
        totals = [len(p) + sum(len(c) for c in g) for p, g in zip(prompts.input_ids, completions)]
        base, g_base = _run(model, prompts, completions, loss_fn, pad, None)
        assert base.mode == "shared" and base.num_slots == 3 * max(totals)
        for budget, rows in ((sum(totals), 1), (totals[0] + totals[1], 2)):
            groups_ = pack_prompts(totals, budget)
            assert len(groups_) == rows
            packed, g_packed = _run(model, prompts, completions, loss_fn, pad, budget)
            assert packed.mode == "shared" and packed.num_slots == rows * max(
                sum(totals[i] for i in g) for g in groups_
            )
            assert packed.num_tokens == base.num_tokens == sum(totals)
            torch.testing.assert_close(packed.logps, base.logps, atol=TOL, rtol=0)
            assert torch.equal(packed.token_ids, base.token_ids) and torch.equal(packed.mask, base.mask)
            assert g_packed.keys() == g_base.keys()
            worst = max((g_packed[n] - g_base[n]).abs().max().item() for n in g_base)
            assert worst <= TOL, worst
            if rows == 1:  # one row, no padding: the useful-token fraction is 1
                assert packed.num_slots == packed.num_tokens and base.num_slots > base.num_tokens


def test_packed_layout_of_two_prompts_by_hand():
    """Prompts [5, 6, 7] (completions [8, 9], [10]) and [11, 12] (completion [13]) in one row:

    row = [5 6 7 8 9 10 11 12 13], segments 0 0 0 1 1 2 0 0 1, samples 0 0 0 0 0 0 1 1 1,
    positions 0 1 2 3 4 3 0 1 2 (restarting at the second prompt). Kept logits: prompt 0's three
    from its last prompt token (positions 2, 3, 4: 2 predicts 8 and 10, 3 predicts 9), then prompt
    1's one (position 7, its last prompt token, predicts 13): width 4, and 13's logits are kept
    entry 3. Padding entries of the gather indices point at each prompt's last token (2, 7).
    mRoPE: prompt 0's positions end at max 5, so its completions run 6, 7 and 6; prompt 1's (max
    1) continue at 2.
    """
    prompts = EncodedPrompts(
        sample_ids=["a", "b"],
        input_ids=[[5, 6, 7], [11, 12]],
        token_fields={},
        vision={},
        vision_rows={},
        num_images=[0, 0],
        image_token_count=[0, 0],
    )
    completions = [[[8, 9], [10]], [[13]]]
    assert pack_prompts([6, 3], None) == [[0], [1]] and pack_prompts([6, 3], 9) == [[0, 1]]
    assert pack_prompts([6, 3, 4], 8) == [[0], [1, 2]]  # a prompt over the budget gets its own row
    packed = packed_layout(prompts, completions, pad_token_id=0, pack_length=9)
    lay = packed.layout
    assert lay.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert packed.segments.tolist() == [[0, 0, 0, 1, 1, 2, 0, 0, 1]]
    assert packed.samples.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2]]
    assert packed.prompt_rows.tolist() == [0, 0] and packed.prompt_starts.tolist() == [0, 6]
    # kept: prompt 0 keeps 3 positions from its last prompt token (2, 3, 4), prompt 1 one (7)
    assert lay.keep.tolist() == [[2, 3, 4, 7]]
    assert lay.source.tolist() == [[0, 1], [0, 0], [3, 0]]
    assert lay.predictor.tolist() == [[2, 3], [2, 2], [7, 7]]
    assert lay.target.tolist() == [[3, 4], [5, 2], [8, 7]]
    assert lay.last.tolist() == [4, 5, 8]
    visible = block_attention_mask(packed.segments, samples=packed.samples)[0, 0].int()
    assert visible[8].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]  # token 13 sees its own prompt only
    assert visible[6].tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0]  # prompt 1 starts afresh
    assert visible[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0]  # completion [10] skips its sibling
    pos = [torch.tensor([[0, 1, 5], [0, 2, 5], [0, 1, 5]]), torch.tensor([[0, 1], [0, 1], [0, 1]])]
    assert mrope_positions(pos, packed)[0, 0].tolist() == [0, 1, 5, 6, 7, 6, 0, 1, 2]
    assert mrope_positions(pos, packed)[1, 0].tolist() == [0, 2, 5, 6, 7, 6, 0, 1, 2]


def test_flex_mask_mod_keeps_prompts_apart_like_the_dense_mask():
    """Two prompts in row 0 (samples 0 and 1), one in row 1: FlexAttention's rule equals the dense mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from vlalign.models.packing import flex_mask_mod

    segments = torch.tensor([[0, 0, 1, 2, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 2, -1, -1, -1]])
    samples = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, -1, -1, -1]])
    positions = torch.tensor([[0, 1, 2, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 3, 0, 0, 0]])
    blocks = torch.tensor([[-1, -1, -1, -1, -1, 0, 0, -1, -1], [-1] * 9])
    for window in (None, 2):
        kw = {"samples": samples, "positions": positions, "blocks": blocks, "sliding_window": window}
        dense = block_attention_mask(segments, **kw)
        assert torch.equal(flex.create_mask(flex_mask_mod(segments, **kw), 2, 1, 9, 9, device="cpu"), dense)
        assert not dense[0, 0, 4:, :4].any()  # prompt 1 never sees prompt 0
