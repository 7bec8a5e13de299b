"""Images that become a variable number of tokens: InternVL's tiles, LLaVA-OneVision's and NeXT's any-res grids.

The registry-following tests feed square images only, which these architectures turn into a fixed
number of tokens. Here a batch mixes a square image, a wide one (96 x 40), a tall one (40 x 96), a
prompt with two images and a prompt without any, so that each prompt carries its own number of
``pixel_values`` rows and image tokens through collation, the shared-prefix engine and generation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlalign.data.chat import feature_token_ids
from vlalign.data.collate import PromptCollator, SupervisedCollator, encode_completions, encode_prompts
from vlalign.data.schema import DataError, PromptSample, SupervisedSample, user_prompt
from vlalign.models.generate import generate
from vlalign.models.load import load_model_and_processor
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.packing import concat_prompts
from vlalign.models.tiny_init import sincos_2d

ARCHS = ("internvl", "llava_onevision", "llava_next")
VIDEO_ARCHS = ("internvl", "llava_onevision")
TOL = 1e-5

EXPECTED_TOKENS = {
    "internvl": [6, 14, 14, 20, 0],
    "llava_onevision": [10, 14, 16, 10, 0],
    "llava_next": [10, 14, 16, 26, 0],
}
"""Image tokens of the prompts of :func:`_samples` at the ``tiny`` size (n = 4 features per tile).

InternVL (``<img>``, 4 per tile, ``</img>``; tiles of 32 px, at most 2 and a thumbnail): square
48 x 48 -> 1 x 1 grid, 1 tile: 6; wide h 40 x w 96 -> 2 x 1 grid + thumbnail, 3 tiles: 3 * 4 + 2 =
14; tall: 14; square + tall: 6 + 14 = 20; no image: 0.
LLaVA-OneVision (2 x 2 features per 32 px tile, base tile first): square -> 1 x 1 grid: base 4 +
tile 2 x 2 + a newline per row 2 = 10; wide -> best grid [32, 64] (1 x 2 tiles, features 2 x 4,
nothing to un-pad: round(40 * 4 / 96) = 2 rows): 4 + 8 + 2 = 14; tall -> [64, 32], features 4 x 2:
4 + 8 + 4 = 16; two images in one prompt -> no tiles, base 4 + 1 newline each: 10.
LLaVA-NeXT: as OneVision (CLIP's class token dropped), but two images keep their tiles: 10 + 16 = 26."""

EXPECTED_ROWS = {
    "internvl": {"pixel_values": [(0, 1), (1, 4), (4, 7), (7, 11), (11, 11)]},
    "llava_onevision": {
        "pixel_values": [(0, 1), (1, 2), (2, 3), (3, 5), (5, 5)],
        "image_sizes": [(0, 1), (1, 2), (2, 3), (3, 5), (5, 5)],
        "batch_num_images": [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)],
    },
    "llava_next": {
        "pixel_values": [(0, 1), (1, 2), (2, 3), (3, 5), (5, 5)],
        "image_sizes": [(0, 1), (1, 2), (2, 3), (3, 5), (5, 5)],
    },
}
"""Rows of each vision tensor per prompt: InternVL stacks tiles (1, 3, 3, 1 + 3); OneVision one
entry per image (its tiles along the second dimension) and ``batch_num_images`` one per prompt; NeXT
as OneVision, without ``batch_num_images``."""


def _samples(shape_images: list) -> list[PromptSample]:
    square, tall_src = shape_images[0], shape_images[2]
    wide = shape_images[1].resize((96, 40))
    tall = tall_src.resize((40, 96))
    return [
        PromptSample("square", [square], user_prompt("Is there a red circle?")),
        PromptSample("wide", [wide], user_prompt("Describe the image.")),
        PromptSample("tall", [tall], user_prompt("What colour is the triangle?")),
        PromptSample("two", [square, tall], user_prompt("How many shapes are there?", 2)),
        PromptSample("text", [], user_prompt("Name a colour.", 0)),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_image_tokens_and_vision_rows_follow_each_image(arch: str, tiny_processor: Callable, shape_images) -> None:
    """Token counts and vision rows per prompt as derived in :data:`EXPECTED_TOKENS` / :data:`EXPECTED_ROWS`."""
    prompts = encode_prompts(tiny_processor(arch), _samples(shape_images))
    assert prompts.image_token_count == EXPECTED_TOKENS[arch]
    rows = {k: [(s.start, s.stop) for s in v] for k, v in prompts.vision_rows.items()}
    assert rows == EXPECTED_ROWS[arch]
    if arch == "llava_onevision":  # images per prompt, the text-only prompt included (the processor drops it)
        assert prompts.vision["batch_num_images"].tolist() == [1, 1, 1, 2, 0]
        assert prompts.vision["image_sizes"].tolist() == [[48, 48], [40, 96], [96, 40], [48, 48], [96, 40]]


def _weighted(result: Any) -> torch.Tensor:
    """A token-mean loss touching every completion token with its own weight (gradients mix rows)."""
    weights = torch.linspace(0.5, 1.5, result.logps.numel()).reshape(result.logps.shape)
    return (result.logps * weights * result.mask).sum() / result.mask.sum()


@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_equals_naive_with_variable_image_tokens(arch: str, k: int, tiny_model, shape_images) -> None:
    """k completions per prompt on the mixed batch: shared and naive per-token log-probs and every
    parameter gradient agree within 1e-5 (fp32), the vision tower included."""
    model, processor = tiny_model(arch)
    prompts = encode_prompts(processor, _samples(shape_images))
    texts = ["Yes.", "A red disc and a blue square.", "Green.", "3", "No", "Two", "A wide bar.", "It is tall."]
    completions = encode_completions(processor, [[texts[(i + j) % 8] for j in range(k)] for i in range(len(prompts))])
    out, grads = {}, {}
    for mode in ("shared", "naive"):
        model.zero_grad(set_to_none=True)
        out[mode] = completion_logprobs(model, prompts, completions, mode=mode, pad_token_id=0)
        _weighted(out[mode]).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert out["shared"].mode == "shared" and out["naive"].mode == "naive"
    torch.testing.assert_close(out["shared"].logps, out["naive"].logps, atol=TOL, rtol=0)
    assert torch.equal(out["shared"].mask, out["naive"].mask)
    assert grads["shared"].keys() == grads["naive"].keys()
    assert any(".vision_tower." in n for n in grads["shared"])
    worst = max((grads["shared"][n] - grads["naive"][n]).abs().max().item() for n in grads["shared"])
    assert worst <= TOL, worst


@pytest.mark.parametrize("arch", ARCHS)
def test_concatenated_batches_score_as_apart(arch: str, tiny_model, shape_images) -> None:
    """Two processor batches with different tile maxima (OneVision pads tiles to the batch's most),
    joined by ``concat_prompts`` as the rollouts do, score as each batch alone."""
    model, processor = tiny_model(arch)
    samples = _samples(shape_images)
    first, second = encode_prompts(processor, samples[:1]), encode_prompts(processor, samples[1:3])
    joined = concat_prompts(first, second)
    completions = encode_completions(processor, [["Yes.", "No"]] * 3)
    with torch.no_grad():
        together = completion_logprobs(model, joined, completions, mode="shared", pad_token_id=0)
        a = completion_logprobs(model, first, completions[:1], mode="shared", pad_token_id=0)
        b = completion_logprobs(model, second, completions[1:], mode="shared", pad_token_id=0)
    torch.testing.assert_close(together.sums, torch.cat([a.sums, b.sums]), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_model_generate(arch: str, tiny_model, shape_images) -> None:
    """Greedy decoding of the mixed batch gives ``model.generate``'s tokens for every prompt."""
    model, processor = tiny_model(arch)
    samples = _samples(shape_images)
    gens = generate(model, processor, samples, max_new_tokens=6, batch_size=len(samples))
    batch = PromptCollator(processor)(samples)
    with torch.no_grad():
        ref = model.generate(
            **batch.model_inputs(), do_sample=False, max_new_tokens=6, suppress_tokens=feature_token_ids(processor)
        )
    ref = ref[:, batch.input_ids.shape[1] :].tolist()
    for i, ids in enumerate(gens.token_ids):
        assert ids[0] == ref[i][: len(ids[0])], samples[i].id


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_is_seeded_per_completion(arch: str, tiny_model, shape_images) -> None:
    """Sampled completions do not depend on the batch: the mixed batch equals each prompt alone."""
    model, processor = tiny_model(arch)
    samples = _samples(shape_images)
    kw = dict(n=2, temperature=1.0, max_new_tokens=5, seed=11)
    together = generate(model, processor, samples, batch_size=len(samples), **kw)
    for i, sample in enumerate(samples):
        assert generate(model, processor, [sample], **kw).token_ids[0] == together.token_ids[i], sample.id


def test_internvl_position_table_starts_geometric(tiny_model_dir) -> None:
    """InternViT's zero-initialised ``(1, 1 + side^2, D)`` position table starts as 2-D sine-cosine
    codes after the class token's zero row (tiny: 32 px / 8 px patches, side 4, D 64)."""
    weights = load_file(tiny_model_dir("internvl") / "model.safetensors")
    (table,) = [v for k, v in weights.items() if k.endswith("embeddings.position_embeddings")]
    assert table.shape == (1, 17, 64)
    torch.testing.assert_close(table[0, 1:], sincos_2d(4, 64), rtol=0, atol=0)
    assert not bool(table[0, 0].any())


@pytest.mark.parametrize("arch", VIDEO_ARCHS)
def test_processor_takes_a_video(arch: str, tiny_model, shape_images) -> None:
    """A 4-frame video: InternVL gives each frame one tile's tokens (``Frame1: <img>`` 4 ``</img>``)
    and stacks the frames in ``pixel_values``; OneVision pools each frame's 2 x 2 features to one
    ``<video>`` token plus one newline: 4 + 1 = 5. The model's output depends on the frames."""
    model, processor = tiny_model(arch)
    model.eval()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    clips = [np.stack([np.asarray(shape_images[(i + f) % 4]) for f in range(4)]) for i in (0, 1)]
    outs = [processor(text=[text], videos=[clip], return_tensors="pt") for clip in clips]
    ids = outs[0]["input_ids"][0].tolist()
    if arch == "internvl":
        assert ids.count(processor.image_token_id) == 16 and outs[0]["pixel_values"].shape[0] == 4
    else:
        assert ids.count(processor.video_token_id) == 5 and outs[0]["pixel_values_videos"].shape[:2] == (1, 4)
    with torch.no_grad():
        last = [model(**out).logits[0, -1] for out in outs]
    assert (last[0] - last[1]).abs().max() > 1e-3


def test_tile_tokens_checked_per_prompt(tiny_model, shape_images) -> None:
    """InternVL: a prompt's context tokens are its own tiles times 4; one token removed from the wide
    prompt (12 -> 11 for 3 tiles) is named before any forward, although the rows still add up."""
    model, processor = tiny_model("internvl")
    prompts = encode_prompts(processor, _samples(shape_images)[:3])
    prompts.input_ids[1].remove(processor.image_token_id)
    completions = encode_completions(processor, [["Yes."]] * 3)
    with pytest.raises(DataError, match=r"'wide': its prompt holds 11 image tokens for 1 image\(s\) \(12 for its 3"):
        completion_logprobs(model, prompts, completions, pad_token_id=0)


@pytest.mark.parametrize("arch", ["llava_onevision", "llava_next"])
def test_unpadding_of_a_very_wide_image(arch: str, tiny_model_dir, shape_images) -> None:
    """``small`` (96 px tiles, 3 x 3 features each), an image w 200 x h 40: grid [96, 192] (1 x 2
    tiles, features 3 x 6); un-padded rows round(40 * 6 / 200) = 1, padding (3 - 1) // 2 = 1 on each
    side -> 1 x 6 features + 1 newline = 7, after the base tile's 9: 16 tokens. The model places
    exactly that many features (its own check) and its loss is finite."""
    model, processor = load_model_and_processor(tiny_model_dir(arch, "small"), device="cpu", dtype="float32")
    sample = SupervisedSample("wide", [shape_images[3].resize((200, 40))], user_prompt("Describe."), "A bar.")
    batch = SupervisedCollator(processor)([sample])
    assert batch.input_ids[0].tolist().count(processor.image_token_id) == 16
    with torch.no_grad():
        assert torch.isfinite(model(**batch.model_inputs(), labels=batch.labels).loss)


@pytest.mark.parametrize("arch", VIDEO_ARCHS)
def test_video_rows_score_shared_as_naive(arch: str, tiny_model, shape_images, tmp_path) -> None:
    """A 4-frame video prompt (frame files) next to a wide-image prompt, through the engine.

    InternVL stacks the frames with the image tiles in ``pixel_values``: rows 0:4 (frames) and 4:7
    (2 tiles + thumbnail); its image tokens are 4 frames x (``<img>`` 4 ``</img>``) = 24 and 14.
    OneVision keeps ``pixel_values_videos`` (1 video of 4 frames) apart from the image's grid.
    Shared and naive log-probs agree within 1e-5."""
    frames = []
    for i in range(4):
        frames.append(str(tmp_path / f"f{i}.png"))
        shape_images[i].save(frames[-1])
    model, processor = tiny_model(arch)
    question = {"type": "text", "text": "What moves?"}
    samples = [
        PromptSample("video", [], [{"role": "user", "content": [{"type": "video", "video": frames}, question]}]),
        _samples(shape_images)[1],
    ]
    prompts = encode_prompts(processor, samples)
    if arch == "internvl":
        assert [(s.start, s.stop) for s in prompts.vision_rows["pixel_values"]] == [(0, 4), (4, 7)]
        assert prompts.image_token_count == [24, 14]
    else:
        assert [(s.start, s.stop) for s in prompts.vision_rows["pixel_values_videos"]] == [(0, 1), (1, 1)]
        assert prompts.image_token_count == [0, 14] and prompts.vision["pixel_values_videos"].shape[:2] == (1, 4)
    completions = encode_completions(processor, [["Yes.", "A bar moves."]] * 2)
    with torch.no_grad():
        shared = completion_logprobs(model, prompts, completions, mode="shared", pad_token_id=0)
        naive = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=0)
    assert shared.mode == "shared"
    torch.testing.assert_close(shared.logps, naive.logps, atol=TOL, rtol=0)
