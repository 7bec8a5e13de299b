"""Llama-3.2-Vision (mllama): cross-attention to the image, through every layout of the engine.

The image is not in the token sequence: one ``<|image|>`` token per image, and a per-token
``cross_attention_mask`` ``(rows, tokens, images, tiles)`` saying which images' tiles each token's
cross-attention sees. The processor marks every token from an image's ``<|image|>`` to the end of
the sequence; so a completion after the prompt sees the prompt's images, and every layout (naive
rows, packed rows, left-padded generation rows) gives each completion token the prompt's last
entry. In the packed layout one row holds a prompt and its k completions, so the vision tower and
the cross-attention keys and values run once per prompt, not once per completion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from vlalign.data.collate import (
    PromptCollator,
    SupervisedCollator,
    build_prompt_rows,
    build_rows,
    encode_completions,
    encode_prompts,
    pad_token_id_of,
)
from vlalign.data.schema import PromptSample, SupervisedSample, user_prompt
from vlalign.models.generate import generate_batch
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.packed_inputs import shared_inputs
from vlalign.models.packing import packed_layout
from vlalign.models.tiny_archs.mllama import MAX_TILES, cross_layers

TOL = 1e-5


def _prompts(processor, shape_images):
    """Prompt 0: one square image (one tile and a padding tile); prompt 1: a wide image (two tiles) and
    a square one."""
    wide = shape_images[1].resize((96, 40))
    samples = [
        PromptSample(id="p0", images=[shape_images[0]], prompt=user_prompt("Is there a red circle?")),
        PromptSample(id="p1", images=[wide, shape_images[2]], prompt=user_prompt("Describe both images.", 2)),
    ]
    return encode_prompts(processor, samples)


def test_cross_layers_spread_evenly():
    """2 self layers -> [1] of 3; 4 -> [2] of 5; 6 -> [2, 6] of 8; 8 -> [2, 7] of 10 (the docstring's table)."""
    assert [cross_layers(n) for n in (2, 4, 6, 8)] == [[1], [2], [2, 6], [2, 7]]


def test_cross_attention_gates_are_opened_and_needed(tiny_model, shape_images):
    """The builder sets every cross-attention gate to pi/4 (the real init leaves them at 0). Put back at 0,
    the model ignores the image: two different images give identical logits (so the repair is needed)."""
    model, processor = tiny_model("mllama")
    model.eval()
    layers = model.config.text_config.cross_attention_layers
    gates = [
        getattr(model.model.language_model.layers[i], g)
        for i in layers
        for g in ("cross_attn_attn_gate", "cross_attn_mlp_gate")
    ]
    assert gates and all(torch.equal(g, torch.full((1,), math.pi / 4)) for g in gates)
    samples = [
        SupervisedSample(id=f"s{i}", images=[im], prompt=user_prompt("What is it?"), completion="A disc.")
        for i, im in enumerate(shape_images[:2])
    ]
    batch = SupervisedCollator(processor)(samples)
    with torch.no_grad():
        opened = model(**batch.model_inputs()).logits
        for g in gates:
            g.zero_()
        closed = model(**batch.model_inputs()).logits
    assert (opened[0] - opened[1]).abs().max() > 1e-2
    torch.testing.assert_close(closed[0], closed[1], rtol=0, atol=1e-6)


def _visible(mask):
    """Per token, the visible (image, tile) pairs as a string: ``"00.00"`` nothing, ``"10.11"`` ..."""
    return [".".join("".join(str(int(v)) for v in image) for image in token) for token in mask]


def test_cross_attention_mask_in_every_layout(tiny_model, shape_images):
    """Hand-written masks. Prompt 0's square image is tile 1 of 2 (``10``), no second image (``00``);
    prompt 1's wide image is 2 tiles (``11``), its square one ``10``; its two ``<|image|>`` tokens are
    consecutive: the first sees the first image (``11.00``), both are seen from the second one on (the
    processor's rule: a run of image tokens is seen to the end). Before the image nothing is seen;
    every completion token sees what the prompt's last token sees; padding sees nothing."""
    model, processor = tiny_model("mllama")
    prompts = _prompts(processor, shape_images)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    starts = [ids.index(image_id) for ids in prompts.input_ids]
    lengths = prompts.lengths
    seen = ["10.00", "11.10"]
    completions = encode_completions(processor, [["Yes.", "No."], ["Two shapes: a disc and a square."]])
    c_len = [[len(c) for c in group] for group in completions]

    def expected(i, prompt_at, n_after, width):
        row = ["00.00"] * width
        for t in range(prompt_at + starts[i], prompt_at + lengths[i] + n_after):
            row[t] = seen[i]
        if i == 1:
            row[prompt_at + starts[i]] = "11.00"
        return row

    naive = build_rows(prompts, completions, pad_token_id=0)
    width = naive.input_ids.shape[1]
    want = [expected(0, 0, c_len[0][0], width), expected(0, 0, c_len[0][1], width), expected(1, 0, c_len[1][0], width)]
    assert [_visible(m) for m in naive.vision["cross_attention_mask"]] == want
    packed = packed_layout(prompts, completions, pad_token_id=0)
    inputs = shared_inputs(model, prompts, packed, torch.device("cpu"))
    width = packed.segments.shape[1]
    want = [expected(0, 0, sum(c_len[0]), width), expected(1, 0, sum(c_len[1]), width)]
    assert [_visible(m) for m in inputs["cross_attention_mask"]] == want
    left = build_prompt_rows(prompts, pad_token_id=0)
    width = left.input_ids.shape[1]
    want = [expected(i, width - lengths[i], 0, width) for i in range(2)]
    assert [_visible(m) for m in left.vision["cross_attention_mask"]] == want
    assert prompts.vision["cross_attention_mask"].shape[-1] == MAX_TILES


def test_shared_equals_the_processor_rule_on_whole_sequences(tiny_model, shape_images):
    """An independent reference: each (prompt + completion) as one sequence, its cross-attention mask
    built by transformers' own ``get_cross_attention_token_mask`` / ``convert_sparse_cross_attention_mask_to_dense``
    (what the processor does for a whole text), one forward per sequence, log_softmax of the full logits.
    The packed rows' per-token log-probs agree within 1e-5."""
    model, processor = tiny_model("mllama")
    model.eval()
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, [["Yes.", "No, a blue square."], ["Two.", "A disc and a bar."]])
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    with torch.no_grad():
        shared = completion_logprobs(model, prompts, completions, pad_token_id=pad_token_id_of(processor))
        r = 0
        for i, group in enumerate(completions):
            vision = {k: v[prompts.vision_rows[k][i]] for k, v in prompts.vision.items() if k != "cross_attention_mask"}
            tiles = vision["aspect_ratio_mask"][0].sum(-1).tolist()[: prompts.num_images[i]]
            for tokens in group:
                ids = prompts.input_ids[i] + tokens
                sparse = [get_cross_attention_token_mask(ids, image_id)]
                dense = convert_sparse_cross_attention_mask_to_dense(sparse, [tiles], MAX_TILES, len(ids))
                slots = vision["pixel_values"].shape[1]  # the batch's image slots (prompt 0: one of two used)
                mask = F.pad(torch.from_numpy(dense), (0, 0, 0, slots - dense.shape[2]))
                logits = model(input_ids=torch.tensor([ids]), cross_attention_mask=mask, **vision).logits[0]
                p = len(prompts.input_ids[i])
                logp = F.log_softmax(logits[p - 1 : p - 1 + len(tokens)].float(), -1)
                ref = logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
                assert shared.mode == "shared"
                torch.testing.assert_close(shared.logps[r, : len(tokens)], ref, atol=TOL, rtol=0)
                r += 1


def test_cross_attention_keys_and_values_once_per_prompt(tiny_model, shape_images):
    """k = 8 completions for each of 2 prompts: the packed forward runs the vision tower and every
    cross-attention key / value projection on 2 rows (one per prompt; the projections see each row's
    image slots x tiles as rows); the naive one on 16."""
    model, processor = tiny_model("mllama")
    prompts = _prompts(processor, shape_images)
    group = ["Yes", "No", "A disc.", "Two.", "3", "A blue square.", "None", "A bar at the bottom."]
    completions = encode_completions(processor, [group, group[::-1]])
    rows: list[int] = []
    layers = model.config.text_config.cross_attention_layers
    modules = [model.model.language_model.layers[i].cross_attn.k_proj for i in layers] + [
        model.model.language_model.layers[i].cross_attn.v_proj for i in layers
    ]
    handles = [m.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0])) for m in modules]
    tower: list[int] = []
    handles.append(
        model.model.vision_model.register_forward_hook(
            lambda mod, args, kwargs, out: tower.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
        )
    )
    try:
        with torch.no_grad():
            for mode, n in (("shared", 2), ("naive", 16)):
                rows.clear()
                tower.clear()
                out = completion_logprobs(model, prompts, completions, mode=mode, pad_token_id=0)
                assert out.mode == mode
                slots = prompts.vision["pixel_values"].shape[1]  # image slots per row, each MAX_TILES tiles
                assert rows == [n * slots * MAX_TILES] * len(modules) and tower == [n]
    finally:
        for h in handles:
            h.remove()


def test_decoding_after_rows_leave_keeps_each_rows_mask(tiny_model, shape_images):
    """Greedy decoding of prompts whose images have 1 and 2 tiles, then again with row 0's second
    token declared a stop token: every row is its free decoding cut after its first stop token, so
    the rows that go on after others left the batch keep their own cross-attention mask (each new
    token gets its prompt's last entry, the rows are selected with the cache)."""
    model, processor = tiny_model("mllama")
    images = [shape_images[0], shape_images[1].resize((96, 40)), shape_images[2], shape_images[3].resize((40, 96))]
    samples = [
        PromptSample(id=f"p{i}", images=[im], prompt=user_prompt(q))
        for i, (im, q) in enumerate(zip(images, ["Hi?", "What colour is it?", "Describe the image.", "Count."]))
    ]
    batch = PromptCollator(processor)(samples)
    free, free_stop = generate_batch(model.eval(), batch, n=2, max_new_tokens=8, stop_ids=[-1])
    assert not any(free_stop)
    stop = free[0][1]
    cut, cut_stop = generate_batch(model, batch, n=2, max_new_tokens=8, stop_ids=[stop])
    for row, tokens in enumerate(free):
        end = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert cut[row] == tokens[:end] and cut_stop[row] == (stop in tokens)
    assert any(stop not in tokens for tokens in free)  # some rows went on after row 0 left
