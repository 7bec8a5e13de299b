"""Loading and writing datasets: every source format, the formats of RLAIF-V, VLFeedback and POVID,
the shapes world's own files, and the error message of every bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlalign.data.io import load_samples, load_samples_with_report, row_to_sample, sample_to_row, write_samples
from vlalign.data.schema import (
    DataError,
    PreferenceSample,
    PromptSample,
    SupervisedSample,
    UnpairedSample,
    load_image,
    user_prompt,
)

IMG, TEXT = {"type": "image"}, lambda t: {"type": "text", "text": t}


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [TEXT(text)]}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pixel(image) -> tuple[int, int, int]:
    return load_image(image).getpixel((0, 0))


def mixed_samples(image_dir: Path, png_bytes) -> list:
    """One sample of each kind, with images given as a path, bytes and a PIL image."""
    a = str(image_dir / "a.png")
    return [
        SupervisedSample("s/1", [a, png_bytes((0, 0, 250))], user_prompt("Two?", 2), "Yes", {"task": "x", "k": [1]}),
        PreferenceSample(
            "p1",
            [Image.new("RGB", (4, 4), (9, 9, 9))],
            user_prompt("Q"),
            "good",
            "bad",
            {"source": "inject"},
            ["worse", "worst"],
        ),
        UnpairedSample("u1", [a], user_prompt("Q"), "fine", False),
        PromptSample("q1", [a], user_prompt("Q"), {"answer": "3"}),
    ]


def kind_of(sample) -> str:
    return {
        SupervisedSample: "supervised",
        PreferenceSample: "preference",
        UnpairedSample: "unpaired",
        PromptSample: "prompt",
    }[type(sample)]


def assert_same(loaded, original) -> None:
    assert type(loaded) is type(original) and loaded.id == original.id
    assert loaded.prompt == original.prompt and loaded.meta == original.meta
    for name in ("completion", "chosen", "rejected", "rejected_extra", "label"):
        assert getattr(loaded, name, None) == getattr(original, name, None), name
    assert [pixel(i) for i in loaded.images] == [pixel(i) for i in original.images]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("conversational", [True, False])
def test_write_then_load_round_trip(tmp_path: Path, image_dir: Path, png_bytes, suffix: str, conversational: bool):
    for sample in mixed_samples(image_dir, png_bytes):
        path = tmp_path / f"{sample.id.replace('/', '_')}-{conversational}{suffix}"
        assert write_samples([sample], path, conversational=conversational) == 1
        (loaded,) = load_samples(path, kind_of(sample))
        assert_same(loaded, sample)
        if suffix == ".jsonl":  # images written beside the file, referenced by relative paths
            row = json.loads(path.read_text())
            assert all(not Path(p).is_absolute() for p in row["images"])
            assert (row["chosen"] == assistant("good")) if sample.id == "p1" and conversational else True


def test_hf_saved_dataset_and_dataset_dict(tmp_path: Path):
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "prompt": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
        }
    )
    rows = {
        "images": [[Image.new("RGB", (4, 4), (250, 0, 0))], [Image.new("RGB", (4, 4), (0, 250, 0))]],
        "prompt": ["Colour?", "Colour?"],
        "chosen": ["red", "green"],
        "rejected": ["blue", "red"],
    }
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "single"))
    before = sorted(p.name for p in (tmp_path / "single").iterdir())
    samples = load_samples(tmp_path / "single", "preference")
    assert [s.chosen for s in samples] == ["red", "green"] and [pixel(s.images[0]) for s in samples] == [
        (250, 0, 0),
        (0, 250, 0),
    ]
    assert isinstance(samples[0].images[0], bytes)  # lazy: still encoded
    assert samples[0].prompt == [{"role": "user", "content": [IMG, TEXT("Colour?")]}]
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == before  # nothing written into it
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_samples(tmp_path / "dict", "preference")) == 2  # train by default
    assert [s.chosen for s in load_samples(tmp_path / "dict", "preference", split="test")] == ["green"]
    with pytest.raises(DataError, match="choose a split with split=...; this dataset has train, test"):
        load_samples(tmp_path / "dict", "preference", split="dev")


def test_folder_of_parquet_shards_with_split(tmp_path: Path, png_bytes):
    (tmp_path / "data").mkdir()
    for split, colour in (("train", (250, 0, 0)), ("test", (0, 0, 250))):
        table = pa.Table.from_pylist(
            [{"image": {"bytes": png_bytes(colour), "path": "x.png"}, "question": "Q?", "answer": split}] * 3
        )
        pq.write_table(table, tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    test = load_samples(tmp_path, "supervised", split="test")
    assert len(test) == 3 and {s.completion for s in test} == {"test"} and pixel(test[0].images[0]) == (0, 0, 250)
    assert len(load_samples(tmp_path, "supervised")) == 6
    with pytest.raises(DataError, match="no .parquet/.jsonl/.json files for split 'dev' found"):
        load_samples(tmp_path, "supervised", split="dev")


# ----------------------------------------------------------------------------- other projects' formats


def test_rlaif_v_parquet_unchanged(tmp_path: Path, png_bytes):
    row = {
        "ds_name": "RLAIF-V",
        "image": {"bytes": png_bytes((1, 2, 3)), "path": None},
        "question": "What is in the image?",
        "chosen": "A cat.",
        "rejected": "A dog and a cat.",
        "origin_dataset": "COCO",
        "origin_split": '{"model": "m"}',
        "idx": "rlaif-7",
        "image_path": "coco/1.jpg",
    }
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "RLAIF-V-Dataset_000.parquet")
    (s,) = load_samples(tmp_path / "RLAIF-V-Dataset_000.parquet", "preference")
    assert isinstance(s, PreferenceSample) and s.id == "rlaif-7"
    assert s.prompt == [{"role": "user", "content": [IMG, TEXT("What is in the image?")]}]
    assert (s.chosen, s.rejected, pixel(s.images[0])) == ("A cat.", "A dog and a cat.", (1, 2, 3))
    assert s.meta == {
        "ds_name": "RLAIF-V",
        "origin_dataset": "COCO",
        "origin_split": '{"model": "m"}',
        "image_path": "coco/1.jpg",
        "idx": "rlaif-7",
    }


def _vlf(response: str, model: str, h, v, e) -> dict:
    return {
        "model": model,
        "response": response,
        "annotations": {
            "Helpfulness": {"Rating": h, "Rationale": "..."},
            "Visual Faithfulness": {"Rating": v, "Rationale": "..."},
            "Ethical Considerations": {"Rating": e, "Rationale": "..."},
        },
    }


def test_vlfeedback_rows_become_best_versus_worst(tmp_path: Path, image_dir: Path):
    """Mean ratings: A (4+5+5)/3 = 4.667, B (2+1+5)/3 = 2.667, C (3+5)/2 = 4.0 ("N/A" ignored),
    so chosen is A and rejected is B."""
    row = {
        "id": "vlf-1",
        "prompt": "Describe the image.",
        "models": ["ma", "mb", "mc"],
        "img_path": "a.png",
        "completions": [
            _vlf("A", "ma", "4", "5", "5"),
            _vlf("B", "mb", "2", "1", "5"),
            _vlf("C", "mc", "3", "N/A", "5"),
        ],
    }
    tie = dict(row, id="vlf-2", completions=[_vlf("A", "ma", "4", "4", "4"), _vlf("B", "mb", "4", "4", "4")])
    path = write_jsonl(image_dir / "vlfeedback_80k.jsonl", [row, tie])
    samples, report = load_samples_with_report(path, "preference", skip_bad_rows=True)
    (s,) = samples
    assert (s.id, s.chosen, s.rejected) == ("vlf-1", "A", "B")
    assert s.meta["chosen_model"] == "ma" and s.meta["rejected_model"] == "mb"
    assert s.meta["chosen_rating"] == pytest.approx(14 / 3, abs=1e-12) and s.meta["rejected_rating"] == 8 / 3
    assert s.meta["models"] == ["ma", "mb", "mc"] and "completions" not in s.meta
    assert pixel(s.images[0]) == (200, 10, 10) and s.prompt[0]["content"] == [IMG, TEXT("Describe the image.")]
    assert report.skipped == {"no preference": 1}
    assert "line 2: 'completions' has no two responses with different ratings" in report.examples[0]


def test_povid_json_array_with_image_root(tmp_path: Path, image_dir: Path):
    human = {"from": "human", "value": "<image>\nDescribe this image in detail."}
    rows = [
        {
            "id": "povid-1",
            "image": "b.png",
            "conversations": [human, {"from": "gpt", "value": "A green square."}],
            "rejected_conversations": [human, {"from": "gpt", "value": "A green square and a dog."}],
        }
    ]
    (tmp_path / "povid").mkdir()
    path = tmp_path / "povid" / "POVID_preference_data_for_VLLMs.json"
    path.write_text(json.dumps(rows, indent=2))
    (s,) = load_samples(path, "preference", image_root=image_dir)
    assert s.prompt == [{"role": "user", "content": [IMG, TEXT("Describe this image in detail.")]}]
    assert (s.chosen, s.rejected, pixel(s.images[0])) == ("A green square.", "A green square and a dog.", (10, 200, 10))
    with pytest.raises(DataError, match="b.png' does not exist"):  # without image_root: beside the data file
        load_samples(path, "preference")


def test_trl_messages_column(tmp_path: Path, image_dir: Path):
    row = {
        "images": ["a.png"],
        "messages": [
            {"role": "user", "content": [IMG, TEXT("How many?")]},
            {"role": "assistant", "content": [TEXT("2")]},
        ],
    }
    path = write_jsonl(image_dir / "sft.jsonl", [row])
    (s,) = load_samples(path, "supervised")
    assert s.prompt == [row["messages"][0]] and s.completion == "2" and s.id.endswith("sft.jsonl line 1")
    (p,) = load_samples(path, "prompt")
    assert p.prompt == [row["messages"][0]] and p.meta == {"completion": "2"}


def test_unpaired_rows(tmp_path: Path, image_dir: Path):
    rows = [
        {"images": ["a.png"], "prompt": "Q?", "completion": "A", "label": True},
        {"images": ["a.png"], "prompt": "Q?", "completion": "B", "label": "yes"},
    ]
    path = write_jsonl(image_dir / "kto.jsonl", rows)
    (s,) = load_samples(path, "unpaired", limit=1)
    assert s.label is True and s.completion == "A"
    with pytest.raises(DataError, match="kto.jsonl line 2: 'label' must be true or false, got 'yes'"):
        load_samples(path, "unpaired")


def test_shapes_world_files_load(world_dir: Path):
    sft = load_samples(world_dir / "train.jsonl", "supervised")
    prompts = load_samples(world_dir / "test_prompts.jsonl", "prompt")
    pope = load_samples(world_dir / "pope_test_popular.jsonl", "prompt")
    assert len(sft) == sum(1 for _ in (world_dir / "train.jsonl").open())
    assert all(s.completion == s.meta["answer"] for s in sft)
    assert {p.meta["task"] for p in prompts} == {"describe", "existence", "counting", "colour"}
    assert all(p.meta["pope_mode"] == "popular" and p.meta["answer"] in ("Yes", "No") for p in pope)
    assert load_image(sft[0].images[0]).size == (48, 48)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("row", "kind", "message"),
    [
        (
            {"images": ["a.png"], "prompt": "Q", "rejected": "b"},
            "preference",
            "bad.jsonl line 1: missing column 'chosen' (the row has: images, prompt, rejected)",
        ),
        ({"images": ["a.png"], "completion": "b"}, "supervised", "missing column 'prompt' (or question, query"),
        ({"images": ["a.png"], "prompt": "Q"}, "supervised", "missing column 'completion' (or response, answer)"),
        (
            {"images": ["nope.png"], "prompt": "Q", "completion": "c"},
            "supervised",
            "bad.jsonl line 1 image 0: image file '",
        ),
        ({"images": ["bad.png"], "prompt": "Q", "completion": "c"}, "supervised", "is unreadable or corrupt"),
        (
            {"images": ["a.png"], "prompt": "<image><image> Q", "completion": "c"},
            "supervised",
            "the prompt has 2 image placeholder(s) but the row has 1 image(s)",
        ),
        ({"images": ["a.png"], "prompt": "Q", "completion": ""}, "supervised", "'completion' is empty"),
        (
            {"images": ["a.png"], "prompt": "Q", "chosen": "x", "rejected": assistant(" ")},
            "preference",
            "bad.jsonl line 1: 'rejected' is empty",
        ),
        ({"images": ["http://x.org/a.png"], "prompt": "Q"}, "prompt", "is a URL; download it and give a local path"),
        ({"image": 5, "prompt": "Q"}, "prompt", "column 'image': cannot use 5 as an image"),
        (
            {"images": ["a.png"], "conversations": [{"from": "bot", "value": "x"}]},
            "supervised",
            "message 0 is from 'bot'; expected human, gpt or system",
        ),
        (
            {"images": ["a.png"], "messages": [{"role": "user", "content": "Q"}]},
            "supervised",
            "column 'messages' must end with an assistant (gpt) turn",
        ),
        (["not", "a", "dict"], "prompt", "bad.jsonl line 1: a row must be a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_row_and_problem(image_dir: Path, row, kind, message):
    path = write_jsonl(image_dir / "bad.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_samples(path, kind)
    assert message in str(err.value), str(err.value)


def test_bad_files(tmp_path: Path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "Q", "completion": "A"}\n{"prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl line 2: not valid JSON"):
        load_samples(tmp_path / "broken.jsonl", "supervised")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format '.csv'; use .jsonl, .json, .parquet"):
        load_samples(tmp_path / "data.csv", "supervised")
    with pytest.raises(FileNotFoundError, match="vlalign reads local data only"):
        load_samples(tmp_path / "openbmb/RLAIF-V-Dataset", "preference")
    with pytest.raises(ValueError, match="unknown dataset kind 'sft'"):
        row_to_sample({"prompt": "Q"}, "sft", where="x", base_dir=tmp_path)  # type: ignore[arg-type]


def test_skip_bad_rows_counts_reasons(image_dir: Path, caplog: pytest.LogCaptureFixture):
    good = {"images": ["a.png"], "prompt": "Q", "chosen": "x", "rejected": "y"}
    rows = [
        good,
        dict(good, chosen=""),
        {"images": ["bad.png"], "prompt": "Q", "chosen": "x", "rejected": "y"},
        {"prompt": "Q", "chosen": "x"},
        dict(good, prompt="<image> <image> Q"),
        good,
        dict(good, images=["gone.png"]),
    ]
    path = write_jsonl(image_dir / "mixed.jsonl", rows)
    with pytest.raises(DataError, match="mixed.jsonl line 2: 'chosen' is empty"):
        load_samples(path, "preference")
    with caplog.at_level(logging.WARNING, logger="vlalign.data.io"):
        samples, report = load_samples_with_report(path, "preference", skip_bad_rows=True)
    assert [s.id for s in samples] == [f"{path} line 1", f"{path} line 6"]
    assert (report.rows, report.loaded) == (7, 2)
    assert report.skipped == {"empty text": 1, "unreadable image": 2, "missing column": 1, "image count mismatch": 1}
    assert report.summary() == (
        f"{path}: 2 of 7 rows loaded as preference samples; 5 skipped (2 unreadable image, 1 empty text, "
        "1 missing column, 1 image count mismatch)"
    )
    assert report.summary() in caplog.text and "line 2: 'chosen' is empty" in caplog.text
    # without image checks, a missing file is only found when the image is opened
    assert len(load_samples(path, "preference", skip_bad_rows=True, check_images=False)) == 4


def test_keep_passes_over_rows_before_image_checks_and_the_limit(image_dir: Path):
    row = {"images": ["a.png"], "prompt": "Q", "completion": "x", "task": "describe"}
    rows = [dict(row, task="counting", images=["gone.png"]), row, dict(row, task="colour"), row, row]
    path = write_jsonl(image_dir / "tasks.jsonl", rows)
    samples, report = load_samples_with_report(path, "supervised", limit=2, keep=lambda s: s.meta["task"] == "describe")
    assert [s.id for s in samples] == [f"{path} line 2", f"{path} line 4"]  # line 1's missing image is never opened
    assert (report.rows, report.loaded) == (2, 2)


def test_meta_may_not_shadow_columns(tmp_path: Path):
    sample = SupervisedSample("s", [], user_prompt("Q", 0), "A", {"prompt": "oops"})
    with pytest.raises(ValueError, match=r"sample 's': meta keys \['prompt'\] clash with data columns"):
        sample_to_row(sample, out_dir=tmp_path)
    with pytest.raises(ValueError, match="write to a .jsonl or .parquet file"):
        write_samples([sample], tmp_path / "x.csv")


def test_in_memory_rows_with_pil_images(tmp_path: Path):
    pil = Image.new("RGB", (4, 4), (5, 6, 7))
    row = {"image": [pil, {"bytes": None, "path": "rel/x.png"}], "question": "<image> vs <image>?", "answer": "left"}
    s = row_to_sample(row, "supervised", where="mem row 0", base_dir=tmp_path)
    assert s.images == [pil, str(tmp_path / "rel" / "x.png")] and s.completion == "left"
    assert s.prompt == [{"role": "user", "content": [IMG, TEXT("vs"), IMG, TEXT("?")]}]
    assert s.id == "mem row 0" and s.meta == {}
