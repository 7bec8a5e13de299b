"""Every row checked at load time: lines that are not JSON, numbers a loss reads, images the
processor cannot take, images given as a dict, high bit depths, paths that leave the data folder,
missing files and a data set of which no sample fits max_length."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlalign.data.collate import SupervisedCollator, check_some_fit
from vlalign.data.io import load_samples_with_report
from vlalign.data.schema import DataError, DataFileNotFoundError, SupervisedSample, load_image, user_prompt


def _row(image: str = "a.png", **extra) -> dict:
    return {"images": [image], "prompt": "<image>How many squares?", "completion": "Two.", **extra}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_line_that_is_not_json_is_skipped_and_counted_or_named(image_dir):
    path = _write(image_dir / "d.jsonl", [json.dumps(_row()), '{"images": ["a.png"], "prompt": ', json.dumps(_row())])
    samples, report = load_samples_with_report(path, "supervised", skip_bad_rows=True)
    assert len(samples) == 2 and report.skipped == {"not JSON": 1} and report.rows == 3
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not valid JSON"):
        load_samples_with_report(path, "supervised")


@pytest.mark.parametrize("bad", ["NaN", "Infinity", '"high"', "null"])
def test_numbers_a_loss_reads_are_checked_at_load_with_the_right_line(image_dir, bad):
    """Line 3 holds the bad severity (NaN and Infinity are what Python's json writes for them)."""
    lines = [
        json.dumps(_row(severity=1.0)),
        json.dumps(_row(severity=2)),
        json.dumps(_row())[:-1] + f', "severity": {bad}}}',
    ]
    path = _write(image_dir / "d.jsonl", lines)
    with pytest.raises(DataError, match=r"d\.jsonl line 3: column 'severity' is"):
        load_samples_with_report(path, "supervised", numeric_columns=["severity"])
    samples, report = load_samples_with_report(path, "supervised", numeric_columns=["severity"], skip_bad_rows=True)
    assert [s.meta["severity"] for s in samples] == [1.0, 2] and report.skipped == {"bad number": 1}
    assert len(load_samples_with_report(path, "supervised")[0]) == 3  # not read by a loss: not checked


def test_an_image_of_extreme_aspect_ratio_is_refused_per_row(image_dir):
    """2000x4 px is an aspect ratio of 500; Qwen2-VL's processor refuses anything above 200."""
    Image.new("RGB", (2000, 4)).save(image_dir / "strip.png")
    Image.new("RGB", (800, 4)).save(image_dir / "ok_strip.png")  # ratio 200: accepted
    path = _write(image_dir / "d.jsonl", [json.dumps(_row("strip.png")), json.dumps(_row("ok_strip.png"))])
    with pytest.raises(DataError, match=r"line 1 image 0: image .*strip\.png' is 2000x4 px.*aspect ratio above 200"):
        load_samples_with_report(path, "supervised")
    samples, report = load_samples_with_report(path, "supervised", skip_bad_rows=True)
    assert len(samples) == 1 and report.skipped == {"unusable image size": 1}


def test_images_given_as_a_dict_are_refused(image_dir):
    path = _write(image_dir / "d.jsonl", [json.dumps(_row() | {"images": {"first": "a.png"}})])
    with pytest.raises(DataError, match=r"column 'images' is a dict \(keys \['first'\]\); it must be a list"):
        load_samples_with_report(path, "supervised")
    hf_form = _write(image_dir / "e.jsonl", [json.dumps(_row() | {"images": [{"path": "a.png", "bytes": None}]})])
    assert len(load_samples_with_report(hf_form, "supervised")[0]) == 1  # Hugging Face's image form is fine


def test_a_16_bit_gradient_becomes_a_full_range_8_bit_gradient(tmp_path):
    """Values 257*k (k = 0..255) of a 16-bit image become k: 0 -> 0, 257 -> 1, 32896 -> 128,
    65535 -> 255 (PIL's own convert("RGB") clips them at 255: all but the first are white)."""
    gradient = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (2, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    eight = np.asarray(load_image(tmp_path / "g16.png"))
    assert eight.shape == (2, 256, 3) and eight.dtype == np.uint8
    assert eight[0, :, 0].tolist() == list(range(256))
    assert (eight[..., 0] == eight[..., 2]).all()
    mid = np.asarray(load_image(Image.fromarray(np.full((1, 1), 1000, dtype=np.uint16))))
    assert mid[0, 0, 0] == 4  # round(1000 / 257) = round(3.89)


def test_paths_that_leave_the_data_folder_are_counted_and_reported_once(tmp_path, image_dir, caplog):
    data = tmp_path / "data"
    data.mkdir()
    (data / "link.png").symlink_to(image_dir / "a.png")
    (data / "own.png").write_bytes((image_dir / "a.png").read_bytes())
    rows = [_row(str(image_dir / "a.png")), _row("../b.png"), _row("link.png"), _row("own.png")]
    path = _write(data / "d.jsonl", [json.dumps(r) for r in rows])
    with caplog.at_level(logging.WARNING):
        samples, report = load_samples_with_report(path, "supervised")
    assert len(samples) == 4 and report.outside == 3
    assert caplog.text.count("lead outside") == 1


def test_a_missing_data_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"nope\.jsonl: no such file") as info:
        load_samples_with_report(tmp_path / "nope.jsonl", "supervised")
    assert isinstance(info.value, FileNotFoundError)


def test_zero_usable_samples_stop_before_training(tiny_processor, shape_images):
    """No sample fits max_length 8 (each has dozens of image tokens): the check says so, and the
    collator's drop counter (logged as data/dropped_overlong) is left as it was."""
    samples = [
        SupervisedSample(f"s{i}", [shape_images[i]], user_prompt("Describe the image."), "A red square.")
        for i in range(3)
    ]
    collator = SupervisedCollator(tiny_processor("qwen2_vl"), max_length=8)
    with pytest.raises(
        DataError, match=r"^0 of 3 samples usable: 3 longer than data.max_length 8; raise data.max_length$"
    ):
        check_some_fit(collator, samples, max_length=8)
    assert collator.num_dropped == 0 and collator.dropped_ids == []
    roomy = SupervisedCollator(tiny_processor("qwen2_vl"), max_length=4096)
    assert check_some_fit(roomy, samples, max_length=4096, probe=2) == 2


def test_a_collator_that_dropped_every_sample_stops_the_run(tiny_processor, shape_images):
    """The safety net where no recipe called check_some_fit: 64 samples seen, 64 dropped -> stop;
    one sample that fitted first and the collator never stops (drops are then counted as before)."""
    from vlalign.data.collate import GIVE_UP_AFTER

    long_ones = [
        SupervisedSample(f"s{i}", [shape_images[0]], user_prompt("Describe the image."), "A red square.")
        for i in range(GIVE_UP_AFTER)
    ]
    collator = SupervisedCollator(tiny_processor("qwen2_vl"), max_length=8)
    for start in range(0, GIVE_UP_AFTER - 16, 16):  # 48 samples dropped: not yet
        assert len(collator(long_ones[start : start + 16])) == 0
    with pytest.raises(DataError, match=r"^0 of 64 samples usable: 64 longer than data.max_length 8"):
        collator(long_ones[-16:])
    fits = SupervisedSample("short", [], user_prompt("Hi?", 0), "Yes.")
    measured = SupervisedCollator(tiny_processor("qwen2_vl"))([fits, long_ones[0]])
    short, long = (measured.prompt_lengths + measured.completion_lengths).tolist()
    assert short < long
    lenient = SupervisedCollator(tiny_processor("qwen2_vl"), max_length=short)
    assert len(lenient([fits])) == 1
    for start in range(0, GIVE_UP_AFTER, 16):
        lenient(long_ones[start : start + 16])
    assert lenient.num_dropped == GIVE_UP_AFTER
