"""Mistral 3 (Pixtral tower): images of different sizes in one batch, through the shared-prefix engine.

The tiny model's processor fits an image into 32 px (never enlarging it) with sides rounded up to
16 px (8 px patches, 2 x 2 merge), then writes one ``[IMG]`` per 16 px cell, row by row, each row
closed by ``[IMG_BREAK]`` and the last by ``[IMG_END]``:

- 48 x 48 (square): scaled by 1/1.5 to 32 x 32, 2 x 2 cells: ``I I B I I E`` (6 tokens);
- 64 wide x 24 high: scaled by 1/2 to 32 x 12, rounded to 32 x 16, 1 x 2 cells: ``I I E`` (3 tokens);
- 20 wide x 40 high: scaled by 1/1.25 to 16 x 32, 2 x 1 cells: ``I B I E`` (4 tokens).

``image_sizes`` carries each (height, width) after resizing to the model.
"""

from __future__ import annotations

import torch
from PIL import Image

from vlalign.data.collate import encode_completions, encode_prompts, pad_token_id_of
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.losses import dpo_loss
from vlalign.losses.preference import PreferenceLogps
from vlalign.models.logprobs import completion_logprobs

TOL = 1e-5


def _images(shape_images):
    square = shape_images[0]
    wide = shape_images[1].resize((64, 24))
    tall = shape_images[2].resize((20, 40))
    return [square, wide, tall]


def _prompts(processor, shape_images):
    questions = ["Is there a red circle?", "Describe the image.", "How many shapes?"]
    samples = [
        PromptSample(id=f"p{i}", images=[image], prompt=user_prompt(questions[i]))
        for i, image in enumerate(_images(shape_images))
    ]
    return encode_prompts(processor, samples)


def test_image_rows_and_sizes_follow_each_image(tiny_processor, shape_images):
    """Each prompt's image markup is the hand-worked one above; image_sizes holds the resized sizes."""
    processor = tiny_processor("mistral3")
    prompts = _prompts(processor, shape_images)
    tok = processor.tokenizer
    short = {"[IMG]": "I", "[IMG_BREAK]": "B", "[IMG_END]": "E"}
    markup = [" ".join(short[t] for t in tok.convert_ids_to_tokens(ids) if t in short) for ids in prompts.input_ids]
    assert markup == ["I I B I I E", "I I E", "I B I E"]
    assert prompts.vision["image_sizes"].tolist() == [[32, 32], [16, 32], [32, 16]]
    assert prompts.vision["pixel_values"].shape == (3, 3, 32, 32)  # padded to the batch's largest
    assert prompts.image_token_count == [6, 3, 4]


def test_shared_equals_naive_with_images_of_different_sizes(tiny_model, shape_images):
    """Three prompts whose images give 4, 2 and 2 features, k = 2 completions each: per-token log-probs
    and every gradient (vision tower included) of a DPO loss agree within 1e-5 between the packed
    rows and the naive rows; the packed rows process fewer tokens."""
    model, processor = tiny_model("mistral3")
    model.train()
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(
        processor, [["Yes.", "No, a blue square."], ["A disc.", "Nothing at all."], ["Two.", "Three shapes."]]
    )
    pad = pad_token_id_of(processor)
    results, grads = {}, {}
    for mode in ("shared", "naive"):
        model.zero_grad(set_to_none=True)
        out = completion_logprobs(model, prompts, completions, mode=mode, pad_token_id=pad)
        sums = out.by_prompt(out.sums)
        ref = torch.tensor([-3.0, -4.0, -5.0])
        logps = PreferenceLogps(sums[:, 0], sums[:, 1], ref, ref - 1.0)
        dpo_loss(logps, beta=0.5).losses.mean().backward()
        results[mode] = out
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    shared, naive = results["shared"], results["naive"]
    assert (shared.mode, naive.mode) == ("shared", "naive")
    torch.testing.assert_close(shared.logps, naive.logps, atol=TOL, rtol=0)
    assert torch.equal(shared.token_ids, naive.token_ids)
    assert grads["shared"].keys() == grads["naive"].keys()
    assert any(".vision_tower." in n for n in grads["shared"])
    worst = max((grads["shared"][n] - grads["naive"][n]).abs().max().item() for n in grads["shared"])
    assert worst <= TOL, worst
    assert shared.num_tokens < naive.num_tokens


def test_output_depends_on_the_image_size(tiny_model, shape_images):
    """The same picture at two sizes (48 px and 12 px: 2 x 2 cells, and one 16 px cell, ``I E``) gives other
    log-probs."""
    model, processor = tiny_model("mistral3")
    model.eval()
    small = shape_images[0].resize((12, 12), Image.BICUBIC)
    samples = [
        PromptSample(id=f"s{i}", images=[im], prompt=user_prompt("What is it?"))
        for i, im in enumerate([shape_images[0], small])
    ]
    prompts = encode_prompts(processor, samples)
    assert prompts.image_token_count == [6, 2]
    completions = encode_completions(processor, [["Yes"], ["Yes"]])
    with torch.no_grad():
        out = completion_logprobs(model, prompts, completions, pad_token_id=pad_token_id_of(processor))
    assert (out.logps[0] - out.logps[1]).abs().max() > 1e-3
