"""Tiny Qwen3.5 / Qwen3.5-MoE: the hybrid layer mix, the vision position grid, and decoding groups
through the hybrid cache (the registry tests in test_tiny / test_logprobs / test_generate cover the rest)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlalign.data.chat import feature_token_ids
from vlalign.data.collate import PromptCollator
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.models.generate import generate
from vlalign.models.moe import router_logits_off
from vlalign.models.tiny import SIZES, make_config, tokenizer_spec
from vlalign.models.tiny_archs.qwen3_5 import layer_types
from vlalign.models.tiny_init import sincos_2d
from vlalign.models.tiny_tokenizer import train_tokenizer


def test_layer_mix_has_both_kinds_at_every_size():
    """Every fourth layer and the last are full attention: 2 -> [L, F], 4 -> [L, L, L, F],
    6 -> [L, L, L, F, L, F]."""
    lin, full = "linear_attention", "full_attention"
    assert layer_types(2) == [lin, full]
    assert layer_types(4) == [lin, lin, lin, full]
    assert layer_types(6) == [lin, lin, lin, full, lin, full]
    from vlalign.shapes.world import tokenizer_corpus

    tok = train_tokenizer(tokenizer_spec("qwen3_5"), tokenizer_corpus())
    for arch in ("qwen3_5", "qwen3_5_moe"):
        for size, spec in SIZES.items():
            text = make_config(arch, size, tok).get_text_config()
            assert text.layer_types == layer_types(spec.text_layers) and text.num_hidden_layers == spec.text_layers
            # RoPE on a quarter of each head: the mRoPE sections share its half (t, h, w)
            assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 4 // 2


def test_vision_position_grid_starts_geometric(tiny_model_dir):
    """The learned (interpolated) position grid of the vision tower starts as 2-D sine-cosine codes."""
    for arch in ("qwen3_5", "qwen3_5_moe"):
        weights = load_file(tiny_model_dir(arch) / "model.safetensors")
        (table,) = [v for k, v in weights.items() if k.endswith("visual.pos_embed.weight")]
        side = int(table.shape[0] ** 0.5)
        assert side * side == table.shape[0] == (SIZES["tiny"].image_px // SIZES["tiny"].patch) ** 2
        torch.testing.assert_close(table, sincos_2d(side, table.shape[1]), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_greedy_groups_through_the_hybrid_cache(arch, tiny_model, shape_images):
    """n = 3 greedy completions per prompt (the prompt's cache expanded to its group, rows dropped as
    they stop): each equals model.generate's greedy completion of its prompt."""
    model, processor = tiny_model(arch)
    questions = ["What colour is the circle?", "Describe the image.", "How many shapes?"]
    prompts = [PromptSample(f"p{i}", [shape_images[i]], user_prompt(q)) for i, q in enumerate(questions)]
    gens = generate(model, processor, prompts, n=3, max_new_tokens=8, batch_size=3)
    batch = PromptCollator(processor)(prompts)
    with torch.no_grad():
        ref = model.generate(
            **batch.model_inputs(),
            do_sample=False,
            max_new_tokens=8,
            suppress_tokens=feature_token_ids(processor),
            **router_logits_off(model),
        )
    ref = ref[:, batch.input_ids.shape[1] :].tolist()
    for i, group in enumerate(gens.token_ids):
        assert len(group) == 3
        for ids in group:
            assert ids == ref[i][: len(ids)]
    assert len({tuple(g[0]) for g in gens.token_ids}) > 1, "identical outputs would make the comparison vacuous"
