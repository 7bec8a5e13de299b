"""Gemma 4 (tiny): its vision position tables, and image blocks that are bidirectional on the
sliding-window layers only, and only when the config says ``use_bidirectional_attention="vision"``.

Shared == naive on the default tiny model is checked by ``tests/models/test_logprobs.py``; here the
other setting of the switch, and the masks the packed layout hands each layer type.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlalign.data.collate import encode_completions, encode_prompts, pad_token_id_of
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.packed_inputs import shared_inputs
from vlalign.models.packing import packed_layout
from vlalign.models.tiny_archs.gemma4 import axis_codes
from vlalign.models.tiny_init import sincos_2d

ANSWERS = ["Yes.", "No, a blue square.", "Red"]


def _prompts(processor, images):
    samples = [
        PromptSample(id=f"p{i}", images=[images[i]], prompt=user_prompt(q))
        for i, q in enumerate(["Is there a red circle?", "What is there?"])
    ]
    return encode_prompts(processor, samples)


def test_axis_codes_sum_to_the_2d_code():
    """x table [sin xw, cos xw, 0, 0] plus y table [0, 0, sin yw, cos yw] is sincos_2d's row (x, y);
    side 3, dim 8 (w = 1, 0.01): every (x, y) of the 3 x 3 grid, row-major with x fastest."""
    x, y = axis_codes(3, 8)
    grid = torch.stack([x[i % 3] + y[i // 3] for i in range(9)])
    torch.testing.assert_close(grid, sincos_2d(3, 8), rtol=0, atol=1e-7)
    assert x[1, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item()) and x[1, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="divisible by 4"):
        axis_codes(3, 6)


def test_position_tables_are_repaired(tiny_model_dir):
    """The random init leaves both position tables at all ones (every patch at the same place)."""
    weights = load_file(tiny_model_dir("gemma4") / "model.safetensors")
    (table,) = [v for k, v in weights.items() if k.endswith("position_embedding_table")]
    x, y = axis_codes(table.shape[1], table.shape[2])
    torch.testing.assert_close(table[0], x, rtol=0, atol=0)
    torch.testing.assert_close(table[1], y, rtol=0, atol=0)


def test_image_blocks_open_on_sliding_layers_only(tiny_model, shape_images):
    """The packed masks: on the sliding-window layers the first image token sees the last one (a
    later position); on the global layers it does not, and no token sees a later one."""
    model, processor = tiny_model("gemma4")
    prompts = _prompts(processor, shape_images)
    packed = packed_layout(prompts, encode_completions(processor, [ANSWERS[:2], ANSWERS[2:]]), pad_token_id=0)
    masks = shared_inputs(model, prompts, packed, torch.device("cpu"))["attention_mask"]
    image = torch.tensor(prompts.token_fields["mm_token_type_ids"][0]) == 1
    first, last = int(image.nonzero()[0]), int(image.nonzero()[-1])
    assert int(image.sum()) == 64
    assert bool(masks["sliding_attention"][0, 0, first, last])
    full = masks["full_attention"][0, 0]
    assert not bool(full[first, last]) and not bool(full.triu(1).any())


@pytest.mark.parametrize("setting", ["vision", None])
def test_shared_equals_naive_either_way_the_switch_is_set(setting, tiny_model, shape_images):
    """Gemma 4 decides per config whether image tokens see each other both ways; the packed layout
    follows it (log-probs within 1e-5 of the naive rows, whose masks the model builds itself), and
    the switch matters: the two settings give different log-probs."""
    model, processor = tiny_model("gemma4")
    model.eval()
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, [ANSWERS[:2], ANSWERS[2:]])
    pad = pad_token_id_of(processor)
    text = model.config.get_text_config()
    with torch.no_grad():
        default = completion_logprobs(model, prompts, completions, pad_token_id=pad)
        text.use_bidirectional_attention = setting
        shared = completion_logprobs(model, prompts, completions, pad_token_id=pad)
        naive = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
    assert shared.mode == "shared"
    torch.testing.assert_close(shared.logps, naive.logps, atol=1e-5, rtol=0)
    if setting is None:
        assert (default.logps - shared.logps).abs().max() > 1e-4
