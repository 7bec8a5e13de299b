"""What every published benchmark run shares: checked inputs, file hashes, generation, scores.

A run has two phases, so that a wrong file costs seconds, not a generation run:

1. *prepare* (:func:`vlalign.eval.official.prepare_benchmark`): every file is read and checked
   (columns present and typed, annotation files parsed, every image found and decoded), each
   input file's sha256 taken, and the prompts built, before any model is loaded. A problem
   raises :class:`~vlalign.eval.benchmarks.BenchmarkFileError` (file, line, column) or
   :class:`~vlalign.config.ConfigError` (a missing option);
2. *run* (:func:`run_benchmark`): greedy answers to every distinct (image, prompt) of the
   benchmark (POPE modes share their questions about an image), then the benchmark's own scoring.

The result keeps one record per question (``part``, ``id``, ``image``, ``question``, ``output``
and what the benchmark parsed from it), which :mod:`vlalign.eval.paired` counts by image for
``vlalign compare``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch import nn

from vlalign.data.schema import PromptSample, user_prompt
from vlalign.eval.benchmarks import BenchmarkFileError
from vlalign.eval.policy import generate_answers


@dataclass
class BenchItem:
    """One question of a benchmark: the prompt to answer and what its scoring needs (``info``)."""

    part: str
    """Which group it is scored in (``pope/random``, ``chair``, ``amber/existence`` ...)."""
    sample: PromptSample
    """The prompt: one image (its path under the image folder) and the question."""
    info: dict[str, Any]
    """Written into the question's record: ``id``, ``image`` (the name as the file gives it), ``question``, ..."""
    max_new_tokens: int
    """Longest answer in tokens."""


@dataclass
class BenchScore:
    """A benchmark's scores of one model's answers."""

    metrics: dict[str, float]
    """Fractions (exact ratios of counts), named ``<benchmark>/<group>/<metric>``."""
    records: list[dict[str, Any]]
    """One per question, in benchmark order."""
    official: dict[str, Any]
    """The numbers as the benchmark's own script prints them."""
    table: str
    """A text table of ``official``, as papers print it."""
    answer_files: dict[str, Any]
    """File name -> the answers in the benchmark's own format (JSON value; a list for JSON Lines names)."""


@dataclass
class PreparedBench:
    """A benchmark whose files were all checked: its questions, file hashes and settings."""

    name: str
    """``pope/coco``, ``chair/coco``, ``amber`` ..."""
    items: list[BenchItem]
    files: dict[str, str]
    """Each input file (path as given) -> its sha256."""
    settings: dict[str, Any]
    """The answer rule, the prompt, the generation settings, the sample ..."""
    scorer: Callable[[Sequence[str]], BenchScore] = field(repr=False)
    """The benchmark's scoring of answers to ``items`` (in order)."""
    batch_size: int = 16

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class BenchResult:
    """One model on a benchmark: its metrics (with ``perf/``), records and the official numbers."""

    metrics: dict[str, float]
    records: list[dict[str, Any]]
    official: dict[str, Any]
    table: str
    answer_files: dict[str, Any]


def sha256_of(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_folder(images: str, bench: str, example: str) -> Path:
    """The ``--images`` folder, checked to exist (a :class:`BenchmarkFileError` naming it otherwise)."""
    if not images:
        from vlalign.config import ConfigError

        raise ConfigError(f"--bench={bench} needs --images=FOLDER, the folder holding the images ({example})")
    root = Path(images)
    if not root.is_dir():
        raise BenchmarkFileError(root, "the image folder does not exist", column="--images")
    return root


def check_images(uses: Iterable[tuple[str, str, int | None, str]], root: Path, *, threads: int = 8) -> None:
    """Every image named in ``uses`` (``(image, file, line, column)``) exists under ``root`` and decodes.

    Each image is checked once: found, then opened and decoded at a reduced scale (JPEG draft
    mode, a few milliseconds an image; ``threads`` at a time), so that a truncated or foreign file
    fails here rather than in the middle of generation. The first problem in file order raises
    :class:`BenchmarkFileError` naming the file, line and column that name the image.
    """
    first: dict[str, tuple[str, int | None, str]] = {}
    for image, source, line, column in uses:
        first.setdefault(image, (source, line, column))
    for image, (source, line, column) in first.items():
        if not (root / image).is_file():
            raise BenchmarkFileError(source, f"image {image!r} is not in {str(root)!r}", line=line, column=column)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        problems = list(pool.map(lambda image: _decode_problem(root / image), first))
    for image, problem in zip(first, problems):
        if problem is not None:
            source, line, column = first[image]
            raise BenchmarkFileError(
                source, f"image {str(root / image)!r} cannot be decoded ({problem})", line=line, column=column
            )


def _decode_problem(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))
            img.load()
    except Exception as exc:  # PIL raises many types for a bad file
        return str(exc)
    return None


def join_prompt(question: str, suffix: str) -> str:
    """``question`` and ``suffix`` joined by a space (none when the suffix starts with white space or is empty)."""
    if not suffix or suffix[0].isspace():
        return question + suffix
    return f"{question} {suffix}"


def make_item(part: str, ident: str, image_path: Path, text: str, info: dict[str, Any], tokens: int) -> BenchItem:
    """A benchmark question as a prompt of one image and ``text``."""
    sample = PromptSample(id=ident, images=[str(image_path)], prompt=user_prompt(text, 1), meta={})
    return BenchItem(part=part, sample=sample, info=info, max_new_tokens=tokens)


def answer_items(
    model: nn.Module, processor: Any, items: Sequence[BenchItem], *, batch_size: int, progress: bool = False
) -> tuple[list[str], float]:
    """Greedy answers to ``items`` (each distinct image, prompt and length asked once); and tokens/s."""
    unique: dict[tuple[str, str, int], int] = {}
    order: list[BenchItem] = []
    for item in items:
        key = _key(item)
        if key not in unique:
            unique[key] = len(order)
            order.append(item)
    texts: dict[int, str] = {}
    new_tokens, seconds = 0, 0.0
    for length in sorted({item.max_new_tokens for item in order}):
        chosen = [i for i, item in enumerate(order) if item.max_new_tokens == length]
        gens = generate_answers(
            model,
            processor,
            [order[i].sample for i in chosen],
            max_new_tokens=length,
            batch_size=batch_size,
            progress=progress,
            desc="benchmark",
        )
        texts.update({i: gens.texts[k][0] for k, i in enumerate(chosen)})
        new_tokens, seconds = new_tokens + gens.new_tokens, seconds + gens.seconds
    return [texts[unique[_key(item)]] for item in items], new_tokens / seconds if seconds > 0 else 0.0


def _key(item: BenchItem) -> tuple[str, str, int]:
    text = " ".join(p["text"] for m in item.sample.prompt for p in m["content"] if p.get("type") == "text")
    return str(item.sample.images[0]), text, item.max_new_tokens


def run_benchmark(model: nn.Module, processor: Any, bench: PreparedBench, *, progress: bool = False) -> BenchResult:
    """Answer every question of ``bench`` and score the answers as the benchmark does."""
    start = time.perf_counter()
    texts, tokens_per_s = answer_items(model, processor, bench.items, batch_size=bench.batch_size, progress=progress)
    score = bench.scorer(texts)
    metrics = dict(score.metrics)
    metrics["perf/seconds"] = time.perf_counter() - start
    metrics["perf/tokens_per_s"] = tokens_per_s
    return BenchResult(metrics, score.records, score.official, score.table, score.answer_files)


def base_record(item: BenchItem, output: str) -> dict[str, Any]:
    """The fields every benchmark record has: part, id, image, question, and the answer text (``output``)."""
    return {"part": item.part, **item.info, "output": output}
