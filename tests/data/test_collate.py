"""The collator: one processor pass per batch, exact spans and labels, vision rows, lengths, errors."""

from __future__ import annotations

import pytest
import torch

from vlalign.data.chat import end_of_turn_text
from vlalign.data.collate import (
    IGNORE_INDEX,
    PromptCollator,
    SupervisedCollator,
    build_rows,
    check_lengths,
    encode_completions,
    encode_prompts,
    render_prompt,
)
from vlalign.data.schema import DataError, PromptSample, SupervisedSample, user_prompt
from vlalign.models.tiny import ARCHITECTURES

END_OF_TURN = {
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "llava": "</s>",
    "idefics3": "<end_of_utterance>",
    "gemma3": "<end_of_turn>",
    "internvl": "<|im_end|>",
    "llava_onevision": "<|im_end|>",
    "llava_next": "</s>",
    "qwen3_5": "<|im_end|>",
    "qwen3_5_moe": "<|im_end|>",
    "mistral3": "</s>",
    "mllama": "<|eot_id|>",
    "qwen3_vl": "<|im_end|>",
    "qwen3_vl_moe": "<|im_end|>",
    "gemma4": "<turn|>",
    "paligemma": "<eos>",
}
VISION_KEYS = {
    "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "qwen2_5_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "llava": {"pixel_values"},
    "idefics3": {"pixel_values", "pixel_attention_mask"},
    "gemma3": {"pixel_values", "token_type_ids"},
    "internvl": {"pixel_values"},
    "llava_onevision": {"pixel_values", "image_sizes", "batch_num_images"},
    "llava_next": {"pixel_values", "image_sizes"},
    "qwen3_5": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "qwen3_5_moe": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "mistral3": {"pixel_values", "image_sizes"},
    "mllama": {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"},
    "qwen3_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "qwen3_vl_moe": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "gemma4": {"pixel_values", "image_position_ids", "mm_token_type_ids"},
    "paligemma": {"pixel_values", "token_type_ids"},
}
COMPLETIONS = ["Yes", "There are two red squares and a blue circle.", "3"]
QUESTIONS = ["Is there a red circle in the image?", "Describe the image.", "How many squares are there?"]


def _samples(images, n=3, n_images=None):
    n_images = n_images or [1] * n
    out, k = [], 0
    for i in range(n):
        imgs = [images[(k + j) % len(images)] for j in range(n_images[i])]
        k += n_images[i]
        out.append(
            SupervisedSample(
                id=f"s{i}",
                images=imgs,
                prompt=user_prompt(QUESTIONS[i % 3], n_images[i]),
                completion=COMPLETIONS[i % 3],
            )
        )
    return out


class CountingProcessor:
    """Wraps a processor and counts its calls (attribute access passes through)."""

    def __init__(self, processor):
        self.__dict__["_inner"] = processor
        self.__dict__["calls"] = 0

    def __call__(self, *args, **kwargs):
        self.__dict__["calls"] += 1
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_labels_cover_exactly_completion_and_end_of_turn(arch, tiny_processor, shape_images):
    processor = tiny_processor(arch)
    assert end_of_turn_text(processor) == END_OF_TURN[arch]
    counting = CountingProcessor(processor)
    batch = SupervisedCollator(counting)(_samples(shape_images))
    assert counting.calls == 1
    tok = processor.tokenizer
    for r, completion in enumerate(COMPLETIONS):
        labelled = batch.labels[r][batch.completion_mask[r]]
        assert tok.decode(labelled) == completion + END_OF_TURN[arch]
        p, c = int(batch.prompt_lengths[r]), int(batch.completion_lengths[r])
        assert c == labelled.numel()
        # labels sit on their own token ids, right after the prompt, then padding (mask 0)
        assert torch.equal(batch.input_ids[r, p : p + c], labelled)
        assert bool((batch.labels[r, :p] == IGNORE_INDEX).all()) and bool(
            (batch.labels[r, p + c :] == IGNORE_INDEX).all()
        )
        assert batch.attention_mask[r].tolist() == [1] * (p + c) + [0] * (batch.input_ids.shape[1] - p - c)
    assert batch.sample_ids == ["s0", "s1", "s2"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_prompts_equal_one_sample_processing(arch, tiny_processor, tiny_model, shape_images):
    """Each row's prompt ids equal the processor run on that sample alone; the vision dict is
    complete; each row's logits equal the single-sample forward (the vision rows are the row's own)."""
    processor = tiny_processor(arch)
    samples = _samples(shape_images)
    batch = SupervisedCollator(processor)(samples)
    assert set(batch.vision) == VISION_KEYS[arch]
    model, _ = tiny_model(arch)
    model.eval()
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
        for r, sample in enumerate(samples):
            alone = SupervisedCollator(processor)([sample])
            p, c = int(batch.prompt_lengths[r]), int(batch.completion_lengths[r])
            text = render_prompt(processor, sample.prompt)
            direct = processor(
                text=[text],
                images=[list(sample.images)],
                return_tensors="pt",
                add_special_tokens=not text.startswith(processor.tokenizer.bos_token or "\0"),
            )
            assert batch.input_ids[r, :p].tolist() == direct["input_ids"][0].tolist()
            single = model(**alone.model_inputs()).logits[0, : p + c]
            torch.testing.assert_close(logits[r, : p + c], single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "idefics3", "gemma3"])
def test_vision_rows_with_several_images_per_prompt(arch, tiny_processor, shape_images):
    """Prompts with 2, 1 and 3 images: each prompt's rows of every vision tensor are its own,
    checked against the processor run on that prompt alone; the naive layout repeats them."""
    processor = tiny_processor(arch)
    samples = _samples(shape_images, n=3, n_images=[2, 1, 3])
    prompts = encode_prompts(processor, samples)
    assert prompts.num_images == [2, 1, 3]
    for i, sample in enumerate(samples):
        alone = encode_prompts(processor, [sample])
        assert prompts.input_ids[i] == alone.input_ids[0]
        for key, tensor in prompts.vision.items():
            own = tensor[prompts.vision_rows[key][i]]
            ref = alone.vision[key]
            if (
                key in ("pixel_values", "pixel_attention_mask")
                and ref.ndim >= 4
                and tensor.ndim == ref.ndim
                and arch == "idefics3"
            ):
                own = own[:, : ref.shape[1]]  # the batch pads every prompt to 3 images
            torch.testing.assert_close(own, ref, atol=0, rtol=0, msg=key)
    completions = encode_completions(processor, [["a", "b"], ["c"], ["d", "e", "f"]])
    rows = build_rows(prompts, completions, pad_token_id=0)
    assert rows.row_prompt.tolist() == [0, 0, 1, 2, 2, 2]
    assert rows.row_completion.tolist() == [0, 1, 0, 0, 1, 2]
    repeated = prompts.vision_for([0, 0, 1, 2, 2, 2])
    for key, tensor in repeated.items():
        assert torch.equal(rows.vision[key], tensor), key
    if arch == "qwen2_vl":  # 16 patch rows per 32 px image: prompts own rows 0:32, 32:48, 48:96
        assert prompts.vision_rows["pixel_values"] == [slice(0, 32), slice(32, 48), slice(48, 96)]
        assert prompts.vision_rows["image_grid_thw"] == [slice(0, 2), slice(2, 3), slice(3, 6)]
        assert rows.vision["pixel_values"].shape[0] == 2 * 32 + 16 + 3 * 48


def test_per_token_fields_follow_the_layout(tiny_processor, shape_images):
    """mm_token_type_ids: 1 exactly on image tokens, 0 on completions and padding (right and left)."""
    processor = tiny_processor("qwen2_vl")
    batch = SupervisedCollator(processor)(_samples(shape_images))
    image_id = processor.image_token_id
    assert torch.equal(batch.vision["mm_token_type_ids"], (batch.input_ids == image_id).long())
    gen = PromptCollator(processor)(_samples(shape_images))
    assert torch.equal(gen.vision["mm_token_type_ids"], (gen.input_ids == image_id).long())


@pytest.mark.parametrize("arch", ["qwen2_vl", "gemma3"])
def test_prompt_collator_left_pads_and_generates(arch, tiny_processor, tiny_model, shape_images):
    processor = tiny_processor(arch)
    samples = [
        PromptSample(id=f"p{i}", images=[shape_images[i]], prompt=user_prompt(q))
        for i, q in enumerate(["Describe the image.", "Is there a star?"])
    ]
    batch = PromptCollator(processor)(samples)
    lengths = batch.prompt_lengths.tolist()
    width = batch.input_ids.shape[1]
    for r, n in enumerate(lengths):
        assert batch.attention_mask[r].tolist() == [0] * (width - n) + [1] * n
        alone = encode_prompts(processor, [samples[r]])
        assert batch.input_ids[r, width - n :].tolist() == alone.input_ids[0]
    model, _ = tiny_model(arch)
    out = model.generate(**batch.model_inputs(), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= width + 3


def test_over_long_samples_are_dropped_and_counted(tiny_processor, shape_images):
    processor = tiny_processor("qwen2_vl")
    samples = _samples(shape_images)
    full = SupervisedCollator(processor)(samples)
    totals = (full.prompt_lengths + full.completion_lengths).tolist()
    limit = sorted(totals)[1]  # keeps the two shortest, drops the longest
    longest = samples[totals.index(max(totals))].id
    collator = SupervisedCollator(processor, max_length=limit)
    batch = collator(samples)
    assert batch.dropped_ids == [longest] and collator.num_dropped == 1
    kept = [s for s in samples if s.id != longest]
    assert batch.sample_ids == [s.id for s in kept]
    reference = SupervisedCollator(processor)(kept)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(getattr(batch, key), getattr(reference, key)), key
    for key in reference.vision:
        assert torch.equal(batch.vision[key], reference.vision[key]), key
    collator(samples)
    assert collator.num_dropped == 2 and collator.dropped_ids == [longest, longest]
    # prompt-only: the limit applies to the prompt
    gen = PromptCollator(processor, max_length=min(full.prompt_lengths.tolist()))
    assert len(gen(samples)) == sum(int(n) == min(full.prompt_lengths.tolist()) for n in full.prompt_lengths)


def test_over_long_sample_raises_by_option(tiny_processor, shape_images):
    processor = tiny_processor("llava")
    with pytest.raises(DataError, match=r"sample 's1'.*exceed max_length 20.*never truncates"):
        SupervisedCollator(processor, max_length=20, on_overflow="raise")(_samples(shape_images)[1:2])
    prompts = encode_prompts(processor, _samples(shape_images)[:1])
    keep, dropped = check_lengths(prompts, [[[1] * 100]], max_length=None)
    assert keep == [0] and dropped == []


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_image_mismatch_names_the_sample(arch, tiny_processor, shape_images):
    processor = tiny_processor(arch)
    good = _samples(shape_images, n=1)[0]
    two_images = SupervisedSample(id="bad-count", images=shape_images[:2], prompt=user_prompt("Hi?"), completion="x")
    with pytest.raises(DataError, match=r"sample 'bad-count'.*1 image placeholder.*2 image"):
        SupervisedCollator(processor)([good, two_images])
    literal = SupervisedSample(
        id="bad-literal",
        images=[shape_images[0]],
        prompt=user_prompt(f"What is {processor.image_token}?"),
        completion="x",
    )
    with pytest.raises(DataError, match=r"sample 'bad-literal'.*2 image token"):
        SupervisedCollator(processor)([good, literal])
    empty = SupervisedSample(id="bad-empty", images=[shape_images[0]], prompt=user_prompt("Hi?"), completion="")
    with pytest.raises(DataError, match="sample 'bad-empty': empty completion"):
        SupervisedCollator(processor)([empty])


def test_batch_moves_to_a_device(tiny_processor, shape_images):
    batch = SupervisedCollator(tiny_processor("gemma3"))(_samples(shape_images))
    moved = batch.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.labels.device.type == "meta"
    assert all(v.device.type == "meta" for v in moved.vision.values())
    assert batch.input_ids.device.type == "cpu"  # the original is untouched
    assert moved.sample_ids == batch.sample_ids


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_prompt_without_image_in_a_batch(arch, tiny_processor, tiny_model, shape_images):
    """A text-only prompt owns no vision rows; its row's logits equal its single-sample forward."""
    processor = tiny_processor(arch)
    samples = [
        SupervisedSample(id="img", images=[shape_images[0]], prompt=user_prompt("Hi?"), completion="Yes"),
        SupervisedSample(id="txt", images=[], prompt=user_prompt("How many?", 0), completion="2"),
    ]
    prompts = encode_prompts(processor, samples)
    assert prompts.num_images == [1, 0] and prompts.image_token_count[1] == 0
    for key, rows in prompts.vision_rows.items():
        if arch == "qwen2_vl":
            assert rows[1].stop - rows[1].start == 0, key
    model, _ = tiny_model(arch)
    model.eval()
    batch = SupervisedCollator(processor)(samples)
    alone = SupervisedCollator(processor)(samples[1:])
    n = int(alone.attention_mask.sum())
    with torch.no_grad():
        both = model(**batch.model_inputs()).logits[1, :n]
        single = model(**alone.model_inputs()).logits[0, :n]
    torch.testing.assert_close(both, single, atol=1e-4, rtol=1e-4)
    text_only = prompts.select([1])  # no image left: no pixel tensors, as from the processor
    assert set(text_only.vision) == set(encode_prompts(processor, samples[1:]).vision)


def _conversation(image):
    """Three questions about one image, the first two answered inside the prompt."""
    prompt = user_prompt("Is there a red circle in the image?") + [
        {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]},
        {"role": "user", "content": [{"type": "text", "text": "How many squares are there?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "2"}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour is the star?"}]},
    ]
    return SupervisedSample(id="conv", images=[image], prompt=prompt, completion="blue")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_multi_turn_labels_cover_every_assistant_turn_only(arch, tiny_processor, shape_images):
    """A conversation is supervised on each assistant answer and its end of turn, never on the
    user turns between them; the whole row equals the template's rendering of the conversation."""
    processor = tiny_processor(arch)
    sample = _conversation(shape_images[0])
    batch = SupervisedCollator(processor)([sample, _samples(shape_images, 1)[0]])
    tok = processor.tokenizer
    eot = END_OF_TURN[arch]
    row = batch.labels[0]
    labelled = [t for t in row.tolist() if t != IGNORE_INDEX]
    runs, current = [], []  # maximal runs of consecutive labelled positions
    for t in row.tolist():
        if t == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    runs.append(current) if current else None
    assert [tok.decode(r).strip() for r in runs] == [f"Yes{eot}", f"2{eot}", f"blue{eot}"]
    assert len(labelled) == sum(len(r) for r in runs)
    full = processor.apply_chat_template(sample.prompt + [{"role": "assistant", "content": "blue"}], tokenize=False)
    decoded = tok.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    image_token = processor.image_token if arch != "gemma3" else processor.boi_token
    assert decoded.replace(" ", "").endswith(full.split(image_token)[-1].replace(" ", "").rstrip()[-40:])
    # the single-turn sample in the same batch is unaffected
    assert tok.decode([t for t in batch.labels[1].tolist() if t != IGNORE_INDEX]).strip() == f"Yes{eot}"


def test_images_after_the_first_answer_are_refused(tiny_processor, shape_images):
    sample = _conversation(shape_images[0])
    sample.prompt[2]["content"].insert(0, {"type": "image"})
    sample.images.append(shape_images[1])
    with pytest.raises(DataError, match="images after the first assistant turn"):
        SupervisedCollator(tiny_processor("qwen2_vl"))([sample])
