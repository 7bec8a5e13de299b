"""CHAIR on MSCOCO (Rohrbach et al. 2018, github LisaAnne/Hallucination ``utils/chair.py``).

Ground truth of an image: the objects of its segmentation annotations (``instances_val2014.json``,
each category name mapped through the synonym table) together with the objects found in its
reference captions (``captions_val2014.json``, by the same extraction as generated captions).
For the generated captions of a set of images (the usual protocol: 500 val2014 images sampled
with a seed, :func:`sample_coco_image_ids`, and the prompt :data:`CHAIR_PROMPT`)::

    CHAIR_i = (# mentions whose object is not in the image's ground truth) / (# mentions)
    CHAIR_s = (# captions with at least one such mention) / (# captions)
    recall  = sum over captions of |objects mentioned that are in the ground truth| / sum of |ground truth|

Mentions count with repetition (``"a dog and another dog"`` is two); recall counts distinct
objects. CHAIR_i and CHAIR_s are the original script's; recall is not in it but in the widely
used extension of OPERA (github shikiw/OPERA ``chair.py``), defined as above. Where the script
divides by zero (no mention at all) the metric is NaN. How mentions are found, and the two
modes (``official`` quirks included, ``clean`` with them fixed), is in
:mod:`vlalign.eval.benchmarks._coco_words`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlalign.eval.benchmarks._coco_words import MODES, CocoWords, Mention
from vlalign.eval.benchmarks._io import BenchmarkFileError, read_json_document, safe_ratio

CHAIR_PROMPT = "Please describe this image in detail."
CHAIR_SAMPLE_SIZE = 500

__all__ = [
    "CHAIR_PROMPT", "CHAIR_SAMPLE_SIZE", "MODES", "CaptionRecord", "ChairScore", "CocoChair", "CocoInstances",
    "Mention", "read_coco_captions", "read_coco_instances", "sample_coco_image_ids",
]  # fmt: skip


def _field(path: str | Path, item: Any, where: str, name: str, kind: type) -> Any:
    if not isinstance(item, dict):
        raise BenchmarkFileError(path, f"expected an object, got {type(item).__name__}", column=where)
    if name not in item:
        raise BenchmarkFileError(path, "missing field", column=f"{where}.{name}")
    value = item[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BenchmarkFileError(path, f"expected {kind.__name__}, got {str(value)[:60]!r}", column=f"{where}.{name}")
    return value


def _section(path: str | Path, document: Any, name: str) -> list[Any]:
    if not isinstance(document, dict):
        raise BenchmarkFileError(
            path, "expected a JSON object with 'images' and 'annotations' (a COCO annotation file)"
        )
    if not isinstance(document.get(name), list):
        raise BenchmarkFileError(path, "missing or not a list", column=name)
    return document[name]


@dataclass(frozen=True)
class CocoInstances:
    """What CHAIR reads of ``instances_val2014.json``: image ids, category names, (image, category) pairs,
    and the images' ``file_name`` where the file gives one (image id -> name)."""

    image_ids: tuple[int, ...]
    categories: dict[int, str]
    annotations: tuple[tuple[int, int], ...]
    file_names: dict[int, str] = field(default_factory=dict)


def read_coco_instances(path: str | Path) -> CocoInstances:
    """Read and check a COCO instances file; a wrong field raises naming the file and ``list[index].field``."""
    document = read_json_document(path)
    images = tuple(
        _field(path, item, f"images[{i}]", "id", int) for i, item in enumerate(_section(path, document, "images"))
    )
    file_names = {}
    for i, item in enumerate(document["images"]):
        if "file_name" in item:
            file_names[item["id"]] = _field(path, item, f"images[{i}]", "file_name", str)
    categories = {}
    for i, item in enumerate(_section(path, document, "categories")):
        categories[_field(path, item, f"categories[{i}]", "id", int)] = _field(
            path, item, f"categories[{i}]", "name", str
        )
    pairs = []
    for i, item in enumerate(_section(path, document, "annotations")):
        image_id = _field(path, item, f"annotations[{i}]", "image_id", int)
        category_id = _field(path, item, f"annotations[{i}]", "category_id", int)
        if category_id not in categories:
            raise BenchmarkFileError(path, f"unknown category {category_id}", column=f"annotations[{i}].category_id")
        pairs.append((image_id, category_id))
    return CocoInstances(images, categories, tuple(pairs), file_names)


def read_coco_captions(path: str | Path) -> dict[int, list[str]]:
    """Reference captions by image id from a COCO captions file (checked as :func:`read_coco_instances`)."""
    document = read_json_document(path)
    captions: dict[int, list[str]] = {}
    for i, item in enumerate(_section(path, document, "annotations")):
        image_id = _field(path, item, f"annotations[{i}]", "image_id", int)
        captions.setdefault(image_id, []).append(_field(path, item, f"annotations[{i}]", "caption", str))
    return captions


def sample_coco_image_ids(
    source: str | Path | CocoInstances | Iterable[int], n: int = CHAIR_SAMPLE_SIZE, seed: int = 0
) -> list[int]:
    """``n`` distinct image ids drawn with ``random.Random(seed)`` from the sorted ids of ``source``.

    ``source``: an instances file, its :class:`CocoInstances`, or ids. The draw depends only on the
    set of ids, ``n`` and ``seed`` (Python's ``random.sample``, stable across versions), and is
    returned in draw order.
    """
    if isinstance(source, (str, Path)):
        source = read_coco_instances(source)
    ids = sorted(set(source.image_ids if isinstance(source, CocoInstances) else source))
    if n > len(ids):
        raise ValueError(f"cannot sample {n} images from {len(ids)}")
    return random.Random(seed).sample(ids, n)


@dataclass(frozen=True)
class CaptionRecord:
    """The scoring of one caption: its mentions, which are hallucinated, the ground truth, what it recalled."""

    image_id: int
    caption: str
    mentions: tuple[Mention, ...]
    hallucinated: tuple[Mention, ...]
    ground_truth: tuple[str, ...]
    recalled: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        def pairs(ms: tuple[Mention, ...]) -> list[list[str]]:
            return [[m.word, m.object] for m in ms]

        return {
            "image_id": self.image_id,
            "caption": self.caption,
            "mentions": pairs(self.mentions),
            "hallucinated": pairs(self.hallucinated),
            "ground_truth": list(self.ground_truth),
            "recalled": list(self.recalled),
        }


@dataclass(frozen=True)
class ChairScore:
    """CHAIR_i, CHAIR_s and recall (fractions, NaN where undefined), their counts and the per-caption records."""

    chair_i: float
    chair_s: float
    recall: float
    captions: int
    mentions: int
    hallucinated_mentions: int
    hallucinated_captions: int
    records: tuple[CaptionRecord, ...] = field(repr=False)

    def metrics(self) -> dict[str, float]:
        return {"chair_i": self.chair_i, "chair_s": self.chair_s, "recall": self.recall}


class CocoChair:
    """CHAIR on COCO for a set of images: ground truth built once, captions scored many times."""

    def __init__(self, ground_truth: Mapping[int, Iterable[str]], mode: str = "official"):
        self.words = CocoWords(mode)
        self.mode = mode
        self.ground_truth = {int(k): frozenset(v) for k, v in ground_truth.items()}

    @classmethod
    def from_annotations(
        cls,
        instances_json: str | Path | CocoInstances,
        captions_json: str | Path | Mapping[int, list[str]],
        mode: str = "official",
        image_ids: Iterable[int] | None = None,
    ) -> CocoChair:
        """Ground truth from the instances and captions files (or their parsed forms) for ``image_ids``.

        ``image_ids`` defaults to every image of the instances file; give the sampled ids to build
        only what is scored (extraction from 200,000 reference captions takes a while).
        """
        instances = instances_json if isinstance(instances_json, CocoInstances) else read_coco_instances(instances_json)
        captions = captions_json if isinstance(captions_json, Mapping) else read_coco_captions(captions_json)
        words = CocoWords(mode)
        wanted = set(instances.image_ids if image_ids is None else image_ids)
        truth: dict[int, set[str]] = {i: set() for i in wanted}
        for image_id, category_id in instances.annotations:
            if image_id in truth:
                name = instances.categories[category_id]
                obj = words.object_of(name)
                if obj is None:
                    source = instances_json if isinstance(instances_json, (str, Path)) else "instances"
                    raise BenchmarkFileError(source, f"category {name!r} is not in CHAIR's synonym list")
                truth[image_id].add(obj)
        for image_id in truth:
            for caption in captions.get(image_id, ()):
                truth[image_id].update(m.object for m in words.extract(caption))
        return cls(truth, mode)

    def extract_objects(self, caption: str) -> list[Mention]:
        """The object mentions of a caption (with repetition, in order), by this instance's mode."""
        return self.words.extract(caption)

    def score(self, captions: Mapping[int, str]) -> ChairScore:
        """CHAIR_i, CHAIR_s and recall of generated ``captions`` (image id -> caption)."""
        unknown = [i for i in captions if i not in self.ground_truth]
        if unknown:
            raise ValueError(f"{len(unknown)} image ids have no ground truth (first: {unknown[0]}); build with them")
        records = []
        n_mentions = n_hallucinated = n_bad_captions = n_truth = n_recalled = 0
        for image_id, caption in captions.items():
            truth = self.ground_truth[image_id]
            mentions = tuple(self.words.extract(caption))
            hallucinated = tuple(m for m in mentions if m.object not in truth)
            recalled = tuple(sorted({m.object for m in mentions if m.object in truth}))
            records.append(CaptionRecord(image_id, caption, mentions, hallucinated, tuple(sorted(truth)), recalled))
            n_mentions += len(mentions)
            n_hallucinated += len(hallucinated)
            n_bad_captions += bool(hallucinated)
            n_truth += len(truth)
            n_recalled += len(recalled)
        return ChairScore(
            chair_i=safe_ratio(n_hallucinated, n_mentions),
            chair_s=safe_ratio(n_bad_captions, len(records)),
            recall=safe_ratio(n_recalled, n_truth),
            captions=len(records),
            mentions=n_mentions,
            hallucinated_mentions=n_hallucinated,
            hallucinated_captions=n_bad_captions,
            records=tuple(records),
        )
