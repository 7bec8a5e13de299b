"""Tiny models of real architectures: build, offline reload, image dependence, one training step."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file

from vlalign.data.collate import SupervisedCollator, image_token_ids
from vlalign.data.schema import SupervisedSample, user_prompt
from vlalign.models.load import load_model_and_processor
from vlalign.models.tiny import (
    ARCHITECTURES,
    QWEN_VOCAB_SIZE,
    SIZES,
    STAMP_FILE,
    build_tiny_model,
    image_tokens,
    make_config,
    make_processor,
    tokenizer_spec,
)
from vlalign.models.tiny_init import sincos_2d
from vlalign.models.tiny_tokenizer import train_tokenizer

EXPECTED_CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor"),
    "internvl": ("InternVLForConditionalGeneration", "InternVLProcessor"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor"),
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", "Qwen3VLProcessor"),
    "mistral3": ("Mistral3ForConditionalGeneration", "PixtralProcessor"),
    "mllama": ("MllamaForConditionalGeneration", "MllamaProcessor"),
    "gemma4": ("Gemma4ForConditionalGeneration", "Gemma4Processor"),
    "paligemma": ("PaliGemmaForConditionalGeneration", "PaliGemmaProcessor"),
}


def _samples(images, n=2):
    questions = ["Is there a red circle in the image?", "Describe the image.", "How many squares are there?"]
    answers = ["Yes", "There is a blue square.", "2"]
    return [
        SupervisedSample(
            id=f"s{i}", images=[images[i]], prompt=user_prompt(questions[i % 3]), completion=answers[i % 3]
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reloads_offline_as_the_real_classes(arch, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_model_dir(arch)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", STAMP_FILE):
        assert (folder / name).is_file(), name
    model, processor = load_model_and_processor(folder, device="cpu", dtype="float32")
    assert (type(model).__name__, type(processor).__name__) == EXPECTED_CLASSES[arch]
    n_params = sum(p.numel() for p in model.parameters())
    assert 3e5 < n_params < 1.5e6, n_params
    # generation stops on the end-of-turn token as well as on eos
    end_of_turn = tokenizer_spec(arch).end_of_turn
    assert end_of_turn in processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}], tokenize=False
    )
    assert processor.tokenizer.convert_tokens_to_ids(end_of_turn) in model.generation_config.eos_token_id


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_output_depends_on_the_image(arch, tiny_model, shape_images):
    """Same prompt, images (A, B, A): rows 0 and 2 agree exactly, rows 0 and 1 clearly differ."""
    model, processor = tiny_model(arch)
    model.eval()
    images = [shape_images[0], shape_images[1], shape_images[0]]
    samples = [
        SupervisedSample(id=f"r{i}", images=[im], prompt=user_prompt("What colour is the circle?"), completion="red")
        for i, im in enumerate(images)
    ]
    batch = SupervisedCollator(processor)(samples)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits  # (3, T, V)
    last = batch.prompt_lengths - 1  # position predicting the first completion token
    at = logits[torch.arange(3), last]  # (3, V)
    assert torch.allclose(at[0], at[2], atol=1e-5)
    assert (at[0] - at[1]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_optimizer_step_lowers_the_loss(arch, tiny_model, shape_images):
    model, processor = tiny_model(arch)
    batch = SupervisedCollator(processor)(_samples(shape_images, n=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss0 = model(**batch.model_inputs(), labels=batch.labels).loss
    loss0.backward()
    vision_grads = [p.grad for n, p in model.named_parameters() if "vis" in n and p.grad is not None]
    assert vision_grads and any(bool(g.abs().sum() > 0) for g in vision_grads)  # the image is in the graph
    optimizer.step()
    with torch.no_grad():
        loss1 = model(**batch.model_inputs(), labels=batch.labels).loss
    assert loss1 < loss0 - 1e-3, (loss0.item(), loss1.item())


def test_no_weight_matrix_left_at_zero(tiny_model_dir):
    """Gemma3 zeroes its image projection at init; the builder re-initialises it (all archs checked)."""
    for arch in ARCHITECTURES:
        weights = load_file(tiny_model_dir(arch) / "model.safetensors")
        zero = [k for k, v in weights.items() if v.ndim >= 2 and not bool(v.any())]
        assert zero == [], (arch, zero)
    gemma = load_file(tiny_model_dir("gemma3") / "model.safetensors")
    projection = [v for k, v in gemma.items() if k.endswith("mm_input_projection_weight")]
    assert len(projection) == 1 and projection[0].std() > 0.01


def test_sincos_2d_hand_values():
    """side 2, dim 4 (one frequency, w = 1): rows are (x, y) = (0,0), (1,0), (0,1), (1,1) and each
    row is [sin x, cos x, sin y, cos y]; e.g. (1, 0) -> [sin 1, cos 1, 0, 1]."""
    s1, c1 = torch.sin(torch.tensor(1.0)).item(), torch.cos(torch.tensor(1.0)).item()
    expected = torch.tensor([[0, 1, 0, 1], [s1, c1, 0, 1], [0, 1, s1, c1], [s1, c1, s1, c1]])
    torch.testing.assert_close(sincos_2d(2, 4), expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 6)


def test_vision_position_tables_start_geometric(tiny_model_dir):
    """SigLIP (Gemma3, Idefics3) and CLIP (LLaVA, class row zero) position tables are 2-D sin-cos codes."""
    for arch in ("gemma3", "idefics3", "llava"):
        weights = load_file(tiny_model_dir(arch) / "model.safetensors")
        (table,) = [v for k, v in weights.items() if k.endswith("position_embedding.weight") and "vision" in k]
        side = int(table.shape[0] ** 0.5)
        patches = table[table.shape[0] - side * side :]
        torch.testing.assert_close(patches, sincos_2d(side, table.shape[1]), rtol=0, atol=0)
        if table.shape[0] == side * side + 1:
            assert not bool(table[0].any())  # CLIP's class-token row


def test_build_is_deterministic_and_cached(tmp_path):
    a = build_tiny_model("qwen2_vl", "tiny", tmp_path / "a", seed=3)
    b = build_tiny_model("qwen2_vl", "tiny", tmp_path / "b", seed=3)
    c = build_tiny_model("qwen2_vl", "tiny", tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # another seed, other weights
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    stamp = json.loads((a / STAMP_FILE).read_text())
    assert (stamp["arch"], stamp["size"], stamp["seed"]) == ("qwen2_vl", "tiny", 3)
    assert "vocab_size" not in stamp["spec"] and "text_mlp" not in stamp["spec"]  # older sizes keep their stamps
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_tiny_model("qwen2_vl", "tiny", a, seed=3) == a
    assert time.perf_counter() - start < 0.2  # cache hit: nothing rebuilt
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    build_tiny_model("qwen2_vl", "tiny", a, seed=5)  # another seed into the same folder: rebuilt
    assert json.loads((a / STAMP_FILE).read_text())["seed"] == 5


def test_unknown_arch_or_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'qwen9'.*qwen2_vl"):
        build_tiny_model("qwen9", "tiny", tmp_path)
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        build_tiny_model("llava", "huge", tmp_path)


IMAGE_TOKENS_BEYOND_THE_RULE = {
    "internvl": lambda n: n + 2,  # <img>, n context tokens, </img>
    "llava_onevision": lambda n: 2 * n + math.isqrt(n),  # base tile n, one any-res tile n, a newline per row
    "llava_next": lambda n: 2 * n + math.isqrt(n),  # as OneVision
    "mistral3": lambda n: n + math.isqrt(n),  # Pixtral: [IMG_BREAK] closes each row of [IMG], [IMG_END] the last
    "mllama": lambda n: 1,  # one <|image|>: its features go to cross-attention, not into the sequence
    "gemma4": lambda n: 256 if n == 256 else 64,  # its processor's smallest budget is 70 soft tokens: 8 x 8
}
"""Architectures whose square image is more tokens than its ``n`` merged features (``TinyArch.image_tokens``)."""


def _image_tokens_for(arch: str, n: int) -> int:
    return IMAGE_TOKENS_BEYOND_THE_RULE.get(arch, lambda m: m)(n)


@pytest.mark.parametrize("size", ["tiny", "small", "bench"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_image_token_count_per_size(arch, size, shape_images):
    """(image_px / patch / merge)^2 tokens per image: tiny 4, small 9, bench 256 (processor only);
    InternVL and LLaVA-OneVision add their delimiters / tiles (:data:`IMAGE_TOKENS_BEYOND_THE_RULE`)."""
    from vlalign.shapes.world import tokenizer_corpus

    merged = {"tiny": 4, "small": 9, "bench": 256}[size]
    expected = _image_tokens_for(arch, merged)
    assert image_tokens(arch, size) == expected
    spec = SIZES[size]
    assert (spec.image_px // spec.patch // spec.merge) ** 2 == merged
    processor = make_processor(arch, size, train_tokenizer(tokenizer_spec(arch), tokenizer_corpus()))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True, tokenize=False
    )
    image = shape_images[0].resize((spec.image_px, spec.image_px))  # Pixtral (Mistral 3) never enlarges an image
    out = processor(text=[text], images=[[image]], return_tensors="pt")
    ids = set(image_token_ids(processor))
    assert sum(int(t) in ids for t in out["input_ids"][0]) == expected


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bench_vocab_config_has_qwens_vocabulary(arch):
    """``bench-vocab``: 151,936 embedding / LM-head rows whatever the tokenizer knows, MLP 5x, 4 query
    heads per key head; ``bench`` keeps the tokenizer's size."""
    from vlalign.shapes.world import tokenizer_corpus

    tok = train_tokenizer(tokenizer_spec(arch), tokenizer_corpus())
    text = make_config(arch, "bench-vocab", tok).get_text_config()
    assert text.vocab_size == QWEN_VOCAB_SIZE == 151_936 and len(tok) < 2000
    # an MoE without a dense MLP (Qwen3.5-MoE): its active experts' width
    width = getattr(text, "intermediate_size", None) or text.moe_intermediate_size * text.num_experts_per_tok
    assert (width, text.num_attention_heads // text.num_key_value_heads) == (2560, 4)
    assert make_config(arch, "bench", tok).get_text_config().vocab_size == len(tok)
    assert image_tokens(arch, "bench-vocab") == _image_tokens_for(arch, 256)


@pytest.mark.slow
def test_bench_vocab_builds_and_reloads(tmp_path, monkeypatch):
    """Slow (15-45 s: 196M parameters, 785 MB written): the real-vocabulary model reloads with
    ``from_pretrained`` offline, with 151,936 rows in its embedding and LM head; a token id past
    the tokenizer's (a row no token maps to) still runs through the model."""
    from transformers import AutoModelForImageTextToText

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = build_tiny_model("qwen2_vl", "bench-vocab", tmp_path / "bv")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    _, processor = load_model_and_processor(folder, device="cpu", dtype="float32")
    assert model.get_input_embeddings().weight.shape == (QWEN_VOCAB_SIZE, 512)
    assert model.get_output_embeddings().weight.shape == (QWEN_VOCAB_SIZE, 512)
    assert len(processor.tokenizer) < 2000
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, QWEN_VOCAB_SIZE - 1]])).logits
    assert logits.shape == (1, 3, QWEN_VOCAB_SIZE) and bool(torch.isfinite(logits).all())
