"""CHAIR on COCO from files in the published formats, in the official and clean modes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vlalign.eval.benchmarks import (
    CHAIR_PROMPT,
    BenchmarkFileError,
    CocoChair,
    read_coco_captions,
    read_coco_instances,
    sample_coco_image_ids,
)

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 6, "name": "bus", "supercategory": "vehicle"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 63, "name": "couch", "supercategory": "furniture"},
]


def _annotation_files(tmp_path: Path) -> tuple[Path, Path]:
    """Image 101: a person and a dog segmented; image 102: a cat; image 103: nothing."""
    instances = {
        "images": [{"id": 101, "file_name": "COCO_val2014_000000000101.jpg"}, {"id": 102}, {"id": 103}],
        "categories": CATEGORIES,
        "annotations": [
            {"id": 1, "image_id": 101, "category_id": 1},
            {"id": 2, "image_id": 101, "category_id": 18},
            {"id": 3, "image_id": 102, "category_id": 17},
        ],
    }
    captions = {
        "images": instances["images"],
        "annotations": [
            {"id": 11, "image_id": 101, "caption": "A man walking a dog on a leash."},
            {"id": 12, "image_id": 101, "caption": "A person and a puppy near a bus."},
            {"id": 13, "image_id": 102, "caption": "A cat sleeping on a couch."},
            {"id": 14, "image_id": 103, "caption": "An empty street."},
        ],
    }
    a, b = tmp_path / "instances_val2014.json", tmp_path / "captions_val2014.json"
    a.write_text(json.dumps(instances))
    b.write_text(json.dumps(captions))
    return a, b


def _mentions(chair: CocoChair, caption: str) -> list[tuple[str, str]]:
    return [(m.word, m.object) for m in chair.extract_objects(caption)]


@pytest.fixture(scope="module")
def chairs(tmp_path_factory) -> dict[str, CocoChair]:
    a, b = _annotation_files(tmp_path_factory.mktemp("coco"))
    return {mode: CocoChair.from_annotations(a, b, mode=mode) for mode in ("official", "clean")}


@pytest.mark.parametrize(
    ("caption", "official", "clean"),
    [
        ("A bus and two buses.", [("bus", "bus")], [("bus", "bus"), ("bus", "bus")]),
        ("A man wearing ties.", [("man", "person")], [("man", "person"), ("tie", "tie")]),
        ("A motor bike.", [], [("motor bike", "motorcycle")]),  # " motor bike" has a leading space in the list
        ("A cheesecake.", [], [("cheesecake", "cake")]),  # " cheesecake" too
        ("An iPhone on the table.", [("table", "dining table")], [("iphone", "cell phone"), ("table", "dining table")]),
        ("Two hot dogs and a dog.", [("hot dog", "hot dog"), ("dog", "dog")], [("hot dog", "hot dog"), ("dog", "dog")]),
        (
            "Three cats, two dogs and people.",
            [("cat", "cat"), ("dog", "dog"), ("person", "person")],
            [("cat", "cat"), ("dog", "dog"), ("people", "person")],
        ),
        ("There is no dog in the image.", [("dog", "dog")], []),
        (
            "A table without chairs, and a cat.",
            [("table", "dining table"), ("chair", "chair"), ("cat", "cat")],
            [("table", "dining table"), ("cat", "cat")],
        ),
        ("The seat of the toilet.", [("toilet", "toilet")], [("toilet", "toilet")]),
        (
            "A baby elephant and a teddy bear.",
            [("elephant", "elephant"), ("teddy bear", "teddy bear")],
            [("elephant", "elephant"), ("teddy bear", "teddy bear")],
        ),
        ("A stove top oven.", [("stove", "oven"), ("oven", "oven")], [("stove top oven", "oven")]),
        (
            "Men with tennis rackets.",
            [("man", "person"), ("racket", "tennis racket")],
            [("man", "person"), ("tennis racket", "tennis racket")],
        ),
        ("Collies in canoes.", [], [("collie", "dog"), ("canoe", "boat")]),
        ("A train on the train track.", [("train", "train")], [("train", "train")]),
    ],
)
def test_extraction_quirks(chairs, caption, official, clean):
    """Official: tokens singularised by pattern ("bus" -> "bu", "ties" -> "ty", "canoes" -> "cano",
    "collies" kept plural), synonyms with a leading space or a capital never match, pairs only
    ("stove top oven" is "stove" + "oven"), "tennis" -> "tenni" so "racket" alone names the
    racket, negation ignored. Clean fixes each (module docstring of ``_coco_words``)."""
    assert _mentions(chairs["official"], caption) == official
    assert _mentions(chairs["clean"], caption) == clean


def test_ground_truth_from_segments_and_captions(chairs):
    """Image 101: segments {person, dog}; reference captions add man->person, dog, puppy->dog and, in
    clean mode only, "bus" (official reads it as "bu")."""
    assert chairs["official"].ground_truth[101] == {"person", "dog"}
    assert chairs["clean"].ground_truth[101] == {"person", "dog", "bus"}
    assert chairs["official"].ground_truth[102] == {"cat", "couch"}
    assert chairs["official"].ground_truth[103] == frozenset()


def test_scores_worked_by_hand(chairs):
    """Captions: 101 "A man and his dog wait for the bus. There is no cat."; 102 "Two cats sit next to buses."

    Official: 101 mentions person, dog, cat ("bus" -> "bu" is none; "no cat" counts): cat hallucinated;
    102 mentions cat, bus: bus hallucinated. CHAIR_i = 2/5, CHAIR_s = 2/2,
    recall = (|{person, dog}| + |{cat}|) / (2 + 2) = 3/4.
    Clean: 101 mentions person, dog, bus (all in its ground truth, bus from the reference captions;
    the negated cat dropped); 102 cat, bus (hallucinated). CHAIR_i = 1/5, CHAIR_s = 1/2,
    recall = (3 + 1) / (3 + 2) = 4/5.
    """
    captions = {101: "A man and his dog wait for the bus. There is no cat.", 102: "Two cats sit next to buses."}
    official = chairs["official"].score(captions)
    assert (official.chair_i, official.chair_s, official.recall) == (2 / 5, 1.0, 3 / 4)
    assert (official.mentions, official.hallucinated_mentions, official.hallucinated_captions) == (5, 2, 2)
    record = official.records[0].as_dict()
    assert record["hallucinated"] == [["cat", "cat"]] and record["recalled"] == ["dog", "person"]
    clean = chairs["clean"].score(captions)
    assert (clean.chair_i, clean.chair_s, clean.recall) == (1 / 5, 1 / 2, 4 / 5)
    nothing = chairs["official"].score({103: "An empty street."})
    assert math.isnan(nothing.chair_i) and nothing.chair_s == 0.0 and math.isnan(nothing.recall)
    with pytest.raises(ValueError, match="no ground truth"):
        chairs["official"].score({999: "A dog."})


def test_annotation_files_fail_fast(tmp_path):
    a, b = _annotation_files(tmp_path)
    instances = json.loads(a.read_text())
    instances["annotations"][1]["category_id"] = "18"
    a.write_text(json.dumps(instances))
    with pytest.raises(BenchmarkFileError, match=r"instances_val2014.json, column 'annotations\[1\].category_id'"):
        read_coco_instances(a)
    instances["annotations"][1]["category_id"] = 99
    a.write_text(json.dumps(instances))
    with pytest.raises(BenchmarkFileError, match=r"unknown category 99"):
        read_coco_instances(a)
    captions = json.loads(b.read_text())
    del captions["annotations"][2]["caption"]
    b.write_text(json.dumps(captions))
    with pytest.raises(BenchmarkFileError, match=r"column 'annotations\[2\].caption': missing field"):
        read_coco_captions(b)
    b.write_text('{"annotations": [\n  {"image_id": 1,, }\n]}')
    with pytest.raises(BenchmarkFileError, match=r"captions_val2014.json, line 2: invalid JSON"):
        read_coco_captions(b)


def test_sampler_and_prompt(tmp_path):
    a, _ = _annotation_files(tmp_path)
    assert sample_coco_image_ids(a, n=2, seed=7) == sample_coco_image_ids([103, 102, 101], n=2, seed=7)
    ids = sample_coco_image_ids(range(1000, 41504), seed=0)
    assert len(set(ids)) == 500 and ids == sample_coco_image_ids(range(41503, 999, -1), seed=0)
    assert ids != sample_coco_image_ids(range(1000, 41504), seed=1)
    with pytest.raises(ValueError, match="cannot sample 4 images from 3"):
        sample_coco_image_ids(a, n=4)
    assert CHAIR_PROMPT == "Please describe this image in detail."
