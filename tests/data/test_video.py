"""Videos in prompts: ``{"type": "video", "video": [frames] | file, "fps": ...}`` parts through the
schema, the readers, the processor call, the log-prob engine and generation (tiny Qwen3-VL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from vlalign.data.chat import feature_token_ids
from vlalign.data.collate import (
    PromptCollator,
    SupervisedCollator,
    encode_completions,
    encode_prompts,
    image_token_ids,
    pad_token_id_of,
)
from vlalign.data.io import load_samples
from vlalign.data.schema import DataError, PromptSample, SupervisedSample, prompt_messages, user_prompt
from vlalign.data.video import video_rows
from vlalign.models.generate import generate
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.tiny_archs.qwen3_vl import QWEN3_VL_TEMPLATE

ARCH = "qwen3_vl"
TOL = 1e-5


def write_frames(folder: Path, n: int = 4, *, moving: bool = True, px: int = 32) -> list[str]:
    """``n`` frames of a red disc moving right by 4 px a frame (or standing still), as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in range(n):
        image = Image.new("RGB", (px, px), "white")
        x = 4 + (4 * t if moving else 0)
        ImageDraw.Draw(image).ellipse([x, 8, x + 10, 18], fill=(220, 30, 30))
        ImageDraw.Draw(image).rectangle([20, 22, 28, 30], fill=(30, 60, 220))
        path = folder / f"frame{t}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def video_prompt(frames: list[str], text: str = "Which shape moved?", **extra) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": frames, **extra}, {"type": "text", "text": text}]}]


VIDEO_ARCHS = ("qwen3_vl", "qwen2_vl", "qwen2_5_vl")
"""Tiny architectures whose processors take videos."""


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_frames(tmp_path_factory.mktemp("video-frames"))


def test_video_parts_are_checked():
    prompt = prompt_messages(video_prompt(["a.png", "b.png"], fps=2), 0)
    assert prompt[0]["content"][0] == {"type": "video", "video": ["a.png", "b.png"], "fps": 2.0}
    assert prompt_messages(video_prompt("clip.mp4"), 0)[0]["content"][0] == {"type": "video", "video": "clip.mp4"}
    for bad, match in (
        (video_prompt(["only.png"]), "at least two frame paths"),
        (video_prompt([]), "at least two frame paths"),
        (video_prompt(["a.png", 3]), "at least two frame paths"),
        (video_prompt(["a.png", "b.png"], fps=0), "positive number"),
        (video_prompt(["a.png", "b.png"], fps=True), "positive number"),
    ):
        with pytest.raises(DataError, match=match):
            prompt_messages(bad, 0, where="row 3")


def test_rows_resolve_frame_paths_and_missing_frames_are_named(tmp_path):
    write_frames(tmp_path / "clips" / "c0", n=2)
    rows = [
        {"id": "v0", "prompt": video_prompt(["clips/c0/frame0.png", "clips/c0/frame1.png"]), "completion": "red disc"},
        {"id": "v1", "prompt": video_prompt(["clips/c0/frame0.png", "clips/c0/nope.png"]), "completion": "x"},
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    (sample,) = load_samples(data, "supervised")
    assert sample.images == []
    assert sample.prompt[0]["content"][0]["video"] == [
        str(tmp_path / "clips/c0/frame0.png"),
        str(tmp_path / "clips/c0/frame1.png"),
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"video 0 frame 1.*nope\.png"):
        load_samples(data, "supervised")


def test_encode_prompts_rows_tokens_and_timestamps(tiny_processor, frames, shape_images):
    """Prompts (video of 4 frames at 1 fps | image + video of 2 frames at 2 fps | image only).

    Tiny Qwen3-VL: 32 px frames, 8 px patches, 2 frames per temporal patch, 2x2 merge. A 4-frame video
    is a (2, 4, 4) grid: 32 patch rows, 2 groups of 4 video tokens, timestamped at the middle of each
    frame pair: frames (0, 1) at 1 fps -> 0.5 s, (2, 3) -> 2.5 s; 2 frames at 2 fps -> (0 + 0.5) / 2 = 0.25 s,
    written "0.2" (round half to even)."""
    processor = tiny_processor(ARCH)
    samples = [
        PromptSample("v", [], video_prompt(frames)),
        PromptSample(
            "iv",
            [shape_images[0]],
            [{"role": "user", "content": [{"type": "image"}, *video_prompt(frames[:2], fps=2)[0]["content"]]}],
        ),
        PromptSample("i", [shape_images[1]], user_prompt("What colour is the disc?")),
    ]
    enc = encode_prompts(processor, samples)
    assert enc.num_videos == [1, 1, 0] and enc.num_images == [0, 1, 1]
    assert enc.vision["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 4]]
    assert enc.vision_rows["video_grid_thw"] == [slice(0, 1), slice(1, 2), slice(2, 2)]
    assert enc.vision_rows["pixel_values_videos"] == [slice(0, 32), slice(32, 48), slice(48, 48)]
    assert enc.vision_rows["pixel_values"] == [slice(0, 0), slice(0, 16), slice(16, 32)]
    video_id = processor.video_token_id
    assert [sum(t == video_id for t in ids) for ids in enc.input_ids] == [8, 4, 0]
    assert [sum(t == 2 for t in row) for row in enc.token_fields["mm_token_type_ids"]] == [8, 4, 0]
    texts = processor.tokenizer.batch_decode(enc.input_ids)
    assert "<0.5 seconds>" in texts[0] and "<2.5 seconds>" in texts[0] and "<0.2 seconds>" in texts[1]
    # a prompt subset keeps its own video rows
    sub = enc.select([1])
    assert sub.num_videos == [1] and sub.vision["pixel_values_videos"].shape[0] == 16
    assert torch.equal(sub.vision["pixel_values_videos"], enc.vision["pixel_values_videos"][32:48])


def test_video_rows_without_a_grid_are_per_video():
    """LLaVA-OneVision-style ``pixel_values_videos`` (videos, frames, C, H, W): one row per video."""
    vision = {"pixel_values_videos": torch.zeros(3, 4, 3, 8, 8)}
    assert video_rows(vision, [2, 0, 1]) == {"pixel_values_videos": [slice(0, 2), slice(2, 2), slice(2, 3)]}
    with pytest.raises(DataError, match="which video"):
        video_rows({"pixel_values_videos": torch.zeros(5, 2)}, [2, 0, 1])


def test_chatml_renders_video_parts_as_qwen2_vl_does(tiny_processor):
    """The tiny Qwen2-VL / Qwen2.5-VL template writes a video part as the real Qwen2-VL template
    does, ``<|vision_start|><|video_pad|><|vision_end|>``, and an image part as before."""
    prompt = [{"role": "user", "content": [{"type": "image"}, *video_prompt(["a.png", "b.png"])[0]["content"]]}]
    for arch in ("qwen2_vl", "qwen2_5_vl"):
        text = tiny_processor(arch).apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert text == (
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
            "<|vision_start|><|video_pad|><|vision_end|>Which shape moved?<|im_end|>\n<|im_start|>assistant\n"
        )


def test_feature_tokens_add_the_video_token_of_video_processors(tiny_processor):
    """What generation must not write: the image feature tokens, and the video token where the
    processor takes videos (a generated ``<|video_pad|>`` fed back would be one video token too many)."""
    tok = tiny_processor("qwen2_vl").tokenizer
    assert feature_token_ids(tiny_processor("qwen2_vl")) == tok.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>"]
    )
    gemma3 = tiny_processor("gemma3")
    assert feature_token_ids(gemma3) == image_token_ids(gemma3)  # no video processor: the image tokens only


def test_a_template_without_video_parts_is_refused(tiny_model, frames):
    """A chat template that renders no video part (Qwen3-VL's with its video branch removed): named,
    not passed on silently."""
    _, processor = tiny_model(ARCH)
    processor.chat_template = QWEN3_VL_TEMPLATE.replace("{{ '<|video_pad|>' }}", "")
    with pytest.raises(DataError, match="0 video token"):
        encode_prompts(processor, [PromptSample("v", [], video_prompt(frames))])


def test_videos_after_the_first_answer_are_refused(tiny_processor, frames):
    """A multi-turn sample's later turns are laid out as text pieces: a video there could not reach the processor."""
    prompt = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
        *video_prompt(frames),
    ]
    with pytest.raises(DataError, match="videos after the first assistant turn"):
        SupervisedCollator(tiny_processor(ARCH))([SupervisedSample("m", [], prompt, "red circle")])


def test_output_depends_on_the_video(tiny_model, tmp_path):
    """Same prompt, videos (moving, still, moving): rows 0 and 2 agree exactly, 0 and 1 differ."""
    model, processor = tiny_model(ARCH)
    model.eval()
    moving = write_frames(tmp_path / "m")
    still = write_frames(tmp_path / "s", moving=False)
    samples = [PromptSample(f"r{i}", [], video_prompt(f)) for i, f in enumerate([moving, still, moving])]
    batch = PromptCollator(processor)(samples)
    with torch.no_grad():
        last = model(**batch.model_inputs()).logits[:, -1]
    assert torch.allclose(last[0], last[2], atol=1e-5)
    assert (last[0] - last[1]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", VIDEO_ARCHS)
def test_shared_equals_naive_with_videos(arch, tiny_model, frames, shape_images):
    """k = 2 and k = 8 completions of a video prompt and an image + video prompt: the shared layout
    (each video through the vision tower once, Qwen3-VL's DeepStack features at the video tokens, mRoPE
    from ``get_rope_index`` with ``video_grid_thw`` and Qwen2.5-VL's ``second_per_grid_ts``) gives the
    naive rows' per-token log-probs and gradients."""
    model, processor = tiny_model(arch)
    model.train()
    pad = pad_token_id_of(processor)
    samples = [
        PromptSample("v", [], video_prompt(frames)),
        PromptSample(
            "iv",
            [shape_images[0]],
            [{"role": "user", "content": [{"type": "image"}, *video_prompt(frames[:2])[0]["content"]]}],
        ),
    ]
    prompts = encode_prompts(processor, samples)
    groups_list = (
        [["the red disc", "the blue square"], ["No.", "A disc moved right."]],
        [["red"] * 4 + ["a", "b c", "disc", "no"]] * 2,
    )
    for groups in groups_list:
        completions = encode_completions(processor, groups)
        grads, results = [], []
        for mode in ("shared", "naive"):
            model.zero_grad(set_to_none=True)
            result = completion_logprobs(model, prompts, completions, mode=mode, pad_token_id=pad)
            (result.logps * torch.linspace(0.5, 1.5, result.logps.shape[-1])).sum().backward()
            results.append(result)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        shared, naive = results
        assert shared.mode == "shared" and naive.mode == "naive"
        torch.testing.assert_close(shared.logps, naive.logps, atol=TOL, rtol=0)
        assert grads[0].keys() == grads[1].keys()
        assert any("visual" in n and grads[0][n].abs().max() > 0 for n in grads[0])
        assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= TOL


@pytest.mark.parametrize("arch", VIDEO_ARCHS)
def test_greedy_generation_with_videos_equals_model_generate(arch, tiny_model, frames, shape_images):
    model, processor = tiny_model(arch)
    prompts = [
        PromptSample("v", [], video_prompt(frames)),
        PromptSample(
            "iv",
            [shape_images[0]],
            [{"role": "user", "content": [{"type": "image"}, *video_prompt(frames[:2], "Is it red?")[0]["content"]]}],
        ),
    ]
    gens = generate(model, processor, prompts, max_new_tokens=8, batch_size=2)
    batch = PromptCollator(processor)(prompts)
    with torch.no_grad():
        ref = model.generate(
            **batch.model_inputs(), do_sample=False, max_new_tokens=8, suppress_tokens=image_token_ids(processor)
        )
    ref = ref[:, batch.input_ids.shape[1] :].tolist()
    for i, ids in enumerate(gens.token_ids):
        assert ids[0] == ref[i][: len(ids[0])]
    assert len({t for ids in gens.token_ids for t in ids[0]}) >= 3
