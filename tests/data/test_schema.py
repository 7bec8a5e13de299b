"""Sample normalisation and validation: prompts, completions, images, and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlalign.data.schema import (
    DataError,
    PreferenceSample,
    PromptSample,
    SupervisedSample,
    UnpairedSample,
    completion_text,
    count_image_placeholders,
    data_error,
    load_image,
    prompt_messages,
    user_prompt,
    validate_sample,
    verify_image,
)

IMG, TEXT = {"type": "image"}, lambda t: {"type": "text", "text": t}


def test_plain_string_prompt_gets_placeholders_prepended():
    assert prompt_messages("How many squares?", 2) == [
        {"role": "user", "content": [IMG, IMG, TEXT("How many squares?")]}
    ]
    assert prompt_messages("Hello", 0) == [{"role": "user", "content": [TEXT("Hello")]}]


def test_image_markers_become_placeholders_in_order():
    got = prompt_messages("<image>\nLeft: <image> which is bigger?", 2)
    assert got == [{"role": "user", "content": [IMG, TEXT("Left:"), IMG, TEXT("which is bigger?")]}]


def test_messages_are_normalised_to_parts():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What colour?"}]},
    ]
    assert prompt_messages(messages, 1) == [
        {"role": "system", "content": [TEXT("Be brief.")]},
        {"role": "user", "content": [IMG, TEXT("What colour?")]},
    ]
    # no placeholder anywhere: images go to the first user message, not the system one
    got = prompt_messages([{"role": "system", "content": "Hi"}, {"role": "user", "content": "Q?"}], 1)
    assert got[1]["content"] == [IMG, TEXT("Q?")] and count_image_placeholders(got) == 1


@pytest.mark.parametrize(
    ("prompt", "n_images", "message"),
    [
        ("<image> and <image>?", 1, "row 3: the prompt has 2 image placeholder(s) but the row has 1 image(s)"),
        ([{"role": "user", "content": [IMG, TEXT("q")]}], 0, "has 1 image placeholder(s) but the row has 0"),
        ([{"role": "robot", "content": "q"}], 0, "message 0 has role 'robot'"),
        ([{"content": "q"}], 0, "message 0 must be a dict with 'role' and 'content'"),
        ([{"role": "user", "content": [{"type": "video"}]}], 0, "message 0 part 0 must be"),
        ([{"role": "user", "content": 5}], 0, "content must be a string or a list of parts, got int"),
        ([], 0, "the prompt must be a non-empty string or list of messages"),
        ("<image>", 1, "the prompt has no text"),
        ([{"role": "assistant", "content": "hi"}], 1, "no user message to attach 1 image(s) to"),
    ],
)
def test_prompt_errors_name_the_row_and_problem(prompt, n_images, message):
    with pytest.raises(DataError) as err:
        prompt_messages(prompt, n_images, where="row 3")
    assert str(err.value).startswith("row 3: ") and message in str(err.value)


def test_placeholder_mismatch_has_its_reason():
    with pytest.raises(DataError) as err:
        prompt_messages("<image><image> q", 3)
    assert err.value.reason == "image count mismatch"
    assert data_error("empty text", "x").reason == "empty text" and DataError("x").reason == "invalid row"


def test_completion_text_forms():
    assert completion_text("Yes", field="completion") == "Yes"
    msgs = [{"role": "assistant", "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "red"}]}]
    assert completion_text(msgs, field="chosen") == "Two red"
    assert completion_text({"role": "assistant", "content": "3"}, field="completion") == "3"
    with pytest.raises(DataError, match=r"row 9: 'rejected' is empty; every rejected needs some text") as err:
        completion_text("  ", field="rejected", where="row 9")
    assert err.value.reason == "empty text"
    with pytest.raises(DataError, match="'chosen' message 0 has role 'user'; expected 'assistant'"):
        completion_text([{"role": "user", "content": "x"}], field="chosen")
    with pytest.raises(DataError, match="'completion' must be a string or assistant message"):
        completion_text(3, field="completion")


def test_load_and_verify_images(image_dir: Path, png_bytes):
    red = load_image(image_dir / "a.png")
    assert red.mode == "RGB" and red.getpixel((0, 0)) == (200, 10, 10)
    assert load_image(png_bytes((1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    verify_image(str(image_dir / "a.png"))
    verify_image(png_bytes())
    with pytest.raises(DataError, match="row 1 image 0: image '.*bad.png' is unreadable or corrupt") as err:
        verify_image(image_dir / "bad.png", where="row 1 image 0")
    assert err.value.reason == "unreadable image"
    with pytest.raises(DataError, match="missing.png' does not exist"):
        verify_image(image_dir / "missing.png")
    with pytest.raises(DataError, match="cannot read image <5 bytes>"):
        load_image(b"12345")


def test_validate_sample(image_dir: Path):
    good = SupervisedSample("s1", [str(image_dir / "a.png")], user_prompt("q"), "a")
    validate_sample(good, check_images=True)
    with pytest.raises(DataError, match="sample 's1': the prompt has 1 image placeholder"):
        validate_sample(SupervisedSample("s1", [], user_prompt("q"), "a"))
    with pytest.raises(DataError, match="'rejected_extra\\[0\\]' is empty"):
        validate_sample(PreferenceSample("p", [], user_prompt("q", 0), "a", "b", rejected_extra=[""]))
    with pytest.raises(DataError, match="'completion' is empty"):
        validate_sample(UnpairedSample("u", [], user_prompt("q", 0), " ", True))
    with pytest.raises(DataError, match="image 0: image .*bad.png"):
        validate_sample(PromptSample("q", [str(image_dir / "bad.png")], user_prompt("q")), check_images=True)
