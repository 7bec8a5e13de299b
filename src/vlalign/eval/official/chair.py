"""CHAIR on COCO from the user's annotation files (``vlalign eval --bench=chair``).

Given ``instances_val2014.json``, ``captions_val2014.json`` and the val2014 image folder: the
usual protocol's presets are the defaults, 500 images drawn with seed 0
(:func:`~vlalign.eval.benchmarks.sample_coco_image_ids`), the prompt
:data:`~vlalign.eval.benchmarks.CHAIR_PROMPT` and descriptions of up to 512 new tokens. The ground
truth is built as LisaAnne/Hallucination's ``chair.py`` builds it
(:class:`~vlalign.eval.benchmarks.CocoChair`), in ``official`` mode (its quirks reproduced) or
``clean`` mode (fixed).

Metrics: ``chair/chair_i``, ``chair/chair_s``, ``chair/recall`` (fractions) and the counts in
``official``. The captions are also written in ``chair.py``'s input format
(``chair_captions.json``: ``[{"image_id", "caption"}]``) for re-scoring with the official script.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

from vlalign.config import ConfigError, StrictFields
from vlalign.eval.benchmarks import (
    CHAIR_PROMPT,
    CocoChair,
    read_coco_captions,
    read_coco_instances,
    sample_coco_image_ids,
)
from vlalign.eval.official.common import (
    BenchItem,
    BenchScore,
    PreparedBench,
    base_record,
    check_images,
    image_folder,
    make_item,
    sha256_of,
)


@dataclass
class ChairBenchConfig(StrictFields):
    """CHAIR on COCO val2014 from the COCO annotation files."""

    instances: str = ""
    """COCO's instances_val2014.json (segmentation annotations) (required)."""
    captions: str = ""
    """COCO's captions_val2014.json (the five reference captions per image) (required)."""
    mode: Literal["official", "clean"] = "official"
    """official: chair.py's object extraction, quirks included; clean: the quirks fixed."""
    n_images: int = 500
    """Images drawn from the instances file (0: every image)."""
    seed: int = 0
    """Seed of the draw (random.Random(seed).sample of the sorted image ids)."""
    prompt: str = CHAIR_PROMPT
    """The instruction asked about every image."""
    max_new_tokens: int = 512
    """Longest description in tokens."""
    batch_size: int = 8
    """Prompts per generation batch."""


def coco_file_name(image_id: int) -> str:
    """The val2014 file name of an image id (used when the instances file gives none)."""
    return f"COCO_val2014_{image_id:012d}.jpg"


def prepare_chair(cfg: ChairBenchConfig, images: str) -> PreparedBench:
    """Read and check both annotation files and every sampled image; build the ground truth."""
    if not cfg.instances or not cfg.captions:
        raise ConfigError(
            "--bench=chair needs --chair.instances=instances_val2014.json and --chair.captions=captions_val2014.json"
        )
    root = image_folder(images, "chair", "COCO val2014")
    instances = read_coco_instances(cfg.instances)
    captions = read_coco_captions(cfg.captions)
    if cfg.n_images > 0:
        if cfg.n_images > len(set(instances.image_ids)):
            raise ConfigError(
                f"chair.n_images={cfg.n_images}, but {cfg.instances} has {len(set(instances.image_ids))} images"
            )
        ids = sample_coco_image_ids(instances, n=cfg.n_images, seed=cfg.seed)
    else:
        ids = sorted(set(instances.image_ids))
    position = {image_id: i for i, image_id in enumerate(instances.image_ids)}
    names = {i: instances.file_names.get(i) or coco_file_name(i) for i in ids}
    check_images(((names[i], cfg.instances, None, f"images[{position[i]}].file_name") for i in ids), root)
    chair = CocoChair.from_annotations(instances, captions, mode=cfg.mode, image_ids=ids)
    items = [
        make_item(
            "chair",
            str(i),
            root / names[i],
            cfg.prompt,
            {"id": str(i), "image_id": i, "image": names[i], "question": cfg.prompt},
            cfg.max_new_tokens,
        )
        for i in ids
    ]
    settings = {
        "mode": cfg.mode,
        "n_images": len(ids),
        "seed": cfg.seed,
        "prompt": cfg.prompt,
        "generation": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size},
        "images": str(root),
    }
    hashes = {cfg.instances: sha256_of(cfg.instances), cfg.captions: sha256_of(cfg.captions)}
    return PreparedBench("chair/coco", items, hashes, settings, partial(score_chair, items, chair), cfg.batch_size)


def score_chair(items: Sequence[BenchItem], chair: CocoChair, texts: Sequence[str]) -> BenchScore:
    """CHAIR_i, CHAIR_s and recall of the descriptions ``texts`` of ``items``' images."""
    score = chair.score({item.info["image_id"]: text for item, text in zip(items, texts)})
    by_id = {r.image_id: r for r in score.records}
    records = []
    for item, text in zip(items, texts):
        scored = by_id[item.info["image_id"]].as_dict()
        rec = base_record(item, text)
        rec.update(
            {
                "objects": scored["ground_truth"],
                "mentions": len(scored["mentions"]),
                "mention_words": scored["mentions"],
                "hallucinated": scored["hallucinated"],
                "recalled": scored["recalled"],
            }
        )
        records.append(rec)
    official = {
        **score.metrics(),
        "mode": chair.mode,
        "captions": score.captions,
        "mentions": score.mentions,
        "hallucinated_mentions": score.hallucinated_mentions,
        "hallucinated_captions": score.hallucinated_captions,
    }
    table = (
        f"CHAIR on COCO ({chair.mode} mode, {score.captions} images)\n"
        f"| CHAIR_s | CHAIR_i | Recall |\n|---:|---:|---:|\n"
        f"| {score.chair_s * 100:.1f} | {score.chair_i * 100:.1f} | {score.recall * 100:.1f} |"
    )
    answers = [{"image_id": item.info["image_id"], "caption": text} for item, text in zip(items, texts)]
    return BenchScore(
        {f"chair/{k}": v for k, v in score.metrics().items()},
        records,
        official,
        table,
        {"chair_captions.json": answers},
    )
