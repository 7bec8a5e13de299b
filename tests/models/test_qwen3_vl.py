"""What is particular to the tiny Qwen3-VL and Qwen3-VL-MoE: interleaved mRoPE, DeepStack, the MoE block."""

from __future__ import annotations

import pytest
import torch

from vlalign.data.collate import SupervisedCollator
from vlalign.data.schema import SupervisedSample, user_prompt
from vlalign.models.tiny import SIZES, make_config, tokenizer_spec
from vlalign.models.tiny_archs.qwen3_vl import N_EXPERTS, TOP_K, interleaved_mrope_section
from vlalign.models.tiny_tokenizer import train_tokenizer


def test_interleaved_mrope_sections():
    """h and w each get 5/16 of the head's frequencies, t the rest: Qwen3-VL's 64 -> [24, 20, 20];
    interleaving needs 3 h <= head_dim / 2 (frequency i goes to h when i % 3 == 1 and i < 3 h)."""
    assert interleaved_mrope_section(128) == [24, 20, 20]
    assert interleaved_mrope_section(32) == [6, 5, 5]
    assert interleaved_mrope_section(64) == [12, 10, 10]
    for head_dim in (32, 64, 128):
        t, h, w = interleaved_mrope_section(head_dim)
        assert t + h + w == head_dim // 2 and 3 * h <= head_dim // 2


@pytest.mark.parametrize("size", ["tiny", "small", "bench"])
def test_configs_per_size(size):
    tok = train_tokenizer(tokenizer_spec("qwen3_vl"), ["a b c"])
    config = make_config("qwen3_vl", size, tok)
    spec = SIZES[size]
    text, vision = config.text_config, config.vision_config
    assert text.rope_parameters["mrope_interleaved"] is True
    assert text.head_dim == spec.text_hidden // spec.text_heads
    assert vision.num_position_embeddings == (spec.image_px // spec.patch) ** 2
    assert list(vision.deepstack_visual_indexes) == list(range(min(3, spec.vision_layers)))
    moe = make_config("qwen3_vl_moe", size, tok).text_config
    assert (moe.num_experts, moe.num_experts_per_tok) == (N_EXPERTS, TOP_K)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_deepstack_features_reach_the_decoder(arch, tiny_model, shape_images):
    """Zeroing the DeepStack mergers' output layers changes the logits at the answer (they are live,
    not a degenerate init), and leaves a prompt without images unchanged."""
    model, processor = tiny_model(arch)
    model.eval()
    samples = [
        SupervisedSample("i", [shape_images[0]], user_prompt("What colour is the circle?"), "red"),
        SupervisedSample("t", [], user_prompt("What colour is the circle?", 0), "red"),
    ]
    batch = SupervisedCollator(processor)(samples)
    with torch.no_grad():
        before = model(**batch.model_inputs()).logits
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
        after = model(**batch.model_inputs()).logits
    assert (before[0] - after[0]).abs().max() > 1e-3
    torch.testing.assert_close(before[1], after[1], atol=1e-6, rtol=0)  # MoE: grouped matmuls, same values


def test_moe_block_routes_to_few_experts(tiny_model):
    model, _ = tiny_model("qwen3_vl_moe")
    mlp = model.model.language_model.layers[0].mlp
    assert type(mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock"
    assert mlp.experts.gate_up_proj.shape[0] == N_EXPERTS
    assert float(mlp.gate.weight.detach().std()) > 1e-3  # the router is not left at a constant
