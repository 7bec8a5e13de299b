"""Fixture-sized benchmark files in their published formats, images made with PIL (for the benchmark run tests).

- POPE (AoiDragon/POPE ``output/coco``): ``coco_pope_{random,popular,adversarial}.json``, one JSON
  object a line (``question_id``, ``image``, ``text``, ``label``), four questions each about two
  val2014 images;
- COCO (``instances_val2014.json``, ``captions_val2014.json``): three images;
- AMBER (``data/annotations.json``, ``data/query/query_all.json``): two descriptions and four
  yes/no questions about two images.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COCO_IMAGES = {
    101: "COCO_val2014_000000000101.jpg",
    102: "COCO_val2014_000000000102.jpg",
    103: "COCO_val2014_000000000103.jpg",
}
POPE_OBJECTS = {"random": ("dog", "kite"), "popular": ("dog", "chair"), "adversarial": ("dog", "cat")}


def write_images(folder: Path, names: list[str]) -> Path:
    """Small JPEG images of distinct colours."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", (40, 32), (40 * k % 256, 90, 200 - 30 * k)).save(folder / name, quality=90)
    return folder


def write_pope(folder: Path) -> Path:
    """The three COCO POPE files (question ids 1..4 in each; labels yes, no, yes, no)."""
    folder.mkdir(parents=True, exist_ok=True)
    for mode, (present, absent) in POPE_OBJECTS.items():
        rows = []
        for image_id in (101, 102):
            for obj, label in ((present, "yes"), (absent, "no")):
                rows.append(
                    {
                        "question_id": len(rows) + 1,
                        "image": COCO_IMAGES[image_id],
                        "text": f"Is there a {obj} in the image?",
                        "label": label,
                    }
                )
        (folder / f"coco_pope_{mode}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_coco(folder: Path) -> tuple[Path, Path]:
    """Image 101: a person and a dog; 102: a cat; 103: nothing segmented."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": name} for i, name in COCO_IMAGES.items()]
    categories = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
    instances = {
        "images": images,
        "categories": categories,
        "annotations": [
            {"id": 1, "image_id": 101, "category_id": 1},
            {"id": 2, "image_id": 101, "category_id": 18},
            {"id": 3, "image_id": 102, "category_id": 17},
        ],
    }
    captions = {
        "images": images,
        "annotations": [
            {"id": 11, "image_id": 101, "caption": "A man walking a dog."},
            {"id": 12, "image_id": 102, "caption": "A cat sleeping on a couch."},
            {"id": 13, "image_id": 103, "caption": "An empty street."},
        ],
    }
    a, b = folder / "instances_val2014.json", folder / "captions_val2014.json"
    a.write_text(json.dumps(instances))
    b.write_text(json.dumps(captions))
    return a, b


AMBER_ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["person", "lake", "mountain"], "hallu": ["dog", "sun"]},
    {"id": 2, "type": "generative", "truth": ["bench", "chair"], "hallu": ["cloud"]},
    {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 4, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 5, "type": "discriminative-attribute-state", "truth": "no"},
    {"id": 6, "type": "discriminative-relation", "truth": "yes"},
]
AMBER_QUERIES = [
    {"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
    {"id": 2, "image": "AMBER_2.jpg", "query": "Describe this image."},
    {"id": 3, "image": "AMBER_1.jpg", "query": "Is there a dog in this image?"},
    {"id": 4, "image": "AMBER_1.jpg", "query": "Is there a person in this image?"},
    {"id": 5, "image": "AMBER_2.jpg", "query": "Is the bench broken in this image?"},
    {"id": 6, "image": "AMBER_2.jpg", "query": "Is the chair next to the bench in this image?"},
]


def write_amber(folder: Path) -> tuple[Path, Path]:
    """AMBER's annotations.json and query_all.json (JSON arrays, indented as published)."""
    (folder / "query").mkdir(parents=True, exist_ok=True)
    a, q = folder / "annotations.json", folder / "query" / "query_all.json"
    a.write_text(json.dumps(AMBER_ANNOTATIONS, indent=4))
    q.write_text(json.dumps(AMBER_QUERIES, indent=4))
    return a, q


def write_all(root: Path) -> dict[str, Path]:
    """Every benchmark's files under ``root``; the paths by name."""
    coco = write_images(root / "val2014", list(COCO_IMAGES.values()))
    amber_images = write_images(root / "amber_images", ["AMBER_1.jpg", "AMBER_2.jpg"])
    instances, captions = write_coco(root / "annotations")
    annotations, queries = write_amber(root / "amber")
    return {
        "coco_images": coco,
        "pope": write_pope(root / "pope"),
        "instances": instances,
        "captions": captions,
        "amber_images": amber_images,
        "amber_annotations": annotations,
        "amber_queries": queries,
    }
