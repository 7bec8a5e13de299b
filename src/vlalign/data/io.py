"""Reading datasets into sample records, and writing them back, in the TRL vision column layout.

Sources: JSON Lines (``.jsonl``), JSON arrays (``.json``), Parquet files, folders written by
``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, and folders of Parquet or JSONL
shards (a downloaded hub repository, ``data/train-00000-of-00001.parquet``). Nothing is downloaded.

Columns (the first one present is used):

- images: ``images`` (a list) or ``image`` (one, or a list), else ``image_path`` / ``img_path``.
  Each image is a file path (relative to the data file's folder, or to ``image_root``), encoded
  bytes, a ``{"bytes": ..., "path": ...}`` dict (the Parquet / HF ``Image`` feature), or a PIL image.
  Images stay lazy: :func:`vlalign.data.schema.load_image` opens them where they are used.
- prompt: ``prompt``, ``question`` or ``query``; a plain string or conversational messages.
  ``<image>`` markers become image placeholders; a prompt without placeholders gets one per image
  prepended (as TRL does). Or a whole conversation in ``messages`` / ``conversations`` (role/content
  or LLaVA's from/value), whose last assistant turn is the completion.
- supervised: ``completion`` (or ``response``, ``answer``), a string or assistant message(s).
- preference: ``chosen`` and ``rejected``, strings or assistant message(s); optional
  ``rejected_extra`` (a list of further rejected completions).
- unpaired (KTO): ``completion`` and a boolean ``label``.
- prompt-only: just the prompt; every other column is ground truth kept in ``meta``.

Formats brought unchanged:

- TRL vision datasets (``HuggingFaceH4/rlaif-v_formatted``, ``trl-lib/rlaif-v``): ``images``,
  ``prompt``, ``chosen``, ``rejected`` as messages.
- RLAIF-V (``openbmb/RLAIF-V-Dataset``): ``image`` (HF Image feature), ``question``, ``chosen``,
  ``rejected``, plus ``ds_name``, ``origin_dataset``, ``origin_split``, ``idx``, ``image_path`` (meta).
- VLFeedback (``MMInstruction/VLFeedback``): ``id``, ``prompt``, ``models``, ``img_path`` or ``image``,
  and ``completions`` (each with ``response`` and ``annotations`` holding a ``Rating`` per aspect:
  Helpfulness, Visual Faithfulness, Ethical Considerations). As a preference dataset, chosen is the
  completion with the highest mean rating and rejected the lowest (ties with no difference are
  bad rows); the ratings and models land in ``meta``.
- POVID (``POVID_preference_data_for_VLLMs.json``, LLaVA style): ``id``, ``image`` (a file name,
  relative to ``image_root``), ``conversations`` (human turn with ``<image>``, then the chosen gpt
  turn) and ``rejected_conversations`` (the same with the rejected turn).

Every problem raises :class:`~vlalign.data.schema.DataError` naming the file, the row and what is
wrong; with ``skip_bad_rows=True`` bad rows are skipped and counted in a :class:`LoadReport`.

The pieces: :mod:`vlalign.data.readers` reads the raw rows of each source,
:mod:`vlalign.data.columns` maps a row to a sample and back; this module loads and writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlalign.data.columns import Kind, row_to_sample, sample_to_row
from vlalign.data.readers import default_image_root, iter_rows
from vlalign.data.schema import DataError, Sample, data_error, verify_image
from vlalign.data.video import verify_videos

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What a load read, kept and skipped (and why)."""

    source: str
    kind: str
    rows: int = 0
    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped rows per reason (``"missing column"``, ``"unreadable image"``, ...)."""
    examples: list[str] = field(default_factory=list)
    """The first few error messages, for the log."""
    outside: int = 0
    """Image paths that lead outside the image folder (absolute, ``..`` or through a symlink):
    allowed, but counted and reported once, since a data file can point anywhere the user can read."""
    outside_example: str = ""

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        text = f"{self.source}: {self.loaded} of {self.rows} rows loaded as {self.kind} samples"
        if skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            text += f"; {skipped} skipped ({reasons})"
        return text


# ----------------------------------------------------------------------------- loading


def load_samples_with_report(
    path: str | os.PathLike,
    kind: Kind,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
    check_images: bool = True,
    limit: int | None = None,
    keep: Callable[[Sample], bool] | None = None,
    numeric_columns: Sequence[str] = (),
) -> tuple[list[Sample], LoadReport]:
    """Load a dataset as samples of ``kind`` (see the module doc for formats and columns).

    ``image_root`` is the folder relative image paths start from (default: the data file's
    folder). ``check_images`` decodes every distinct image once to catch missing or corrupt files.
    A bad row raises :class:`DataError` naming file, row and problem, unless ``skip_bad_rows``: then
    it is skipped and counted in the report (the summary is also logged as a warning).
    ``keep`` selects samples (e.g. by task): a row it rejects is passed over before its images are
    checked and is not counted, so ``limit`` counts the rows kept. ``numeric_columns`` are
    columns a loss will read: each row must hold a finite number there (:func:`check_numbers`).
    Image paths that lead outside ``image_root`` are used, and counted in the report.
    """
    base = Path(image_root) if image_root is not None else default_image_root(path)
    report = LoadReport(source=str(path), kind=kind)
    samples: list[Sample] = []
    verified: set[str] = set()
    root = os.path.realpath(base)
    for where, row in iter_rows(path, split=split):
        if limit is not None and report.rows >= limit:
            break
        try:
            if isinstance(row, DataError):  # a line that is not JSON
                raise row
            sample = row_to_sample(row, kind, where=where, base_dir=base)
            if keep is not None and not keep(sample):
                continue
            check_numbers(sample, numeric_columns, where=where)
            if check_images:
                _verify_images(sample, verified, where)
                verify_videos(sample.prompt, where=where)
        except DataError as exc:
            report.rows += 1
            if not skip_bad_rows:
                raise
            report.skipped[exc.reason] = report.skipped.get(exc.reason, 0) + 1
            if len(report.examples) < 5:
                report.examples.append(str(exc))
            continue
        report.rows += 1
        samples.append(sample)
        report.loaded += 1
        _count_outside(sample, root, report, where)
    if report.skipped:
        logger.warning("%s\n  e.g. %s", report.summary(), "\n  e.g. ".join(report.examples))
    if report.outside:
        logger.warning(
            "%s: %d image path(s) lead outside %s (absolute, '..' or a symlink), e.g. %s; they are used as given",
            path,
            report.outside,
            base,
            report.outside_example,
        )
    return samples, report


def _verify_images(sample: Sample, verified: set[str], where: str) -> None:
    """Decode each image of ``sample`` once per distinct path (:func:`verify_image`)."""
    for k, image in enumerate(sample.images):
        key = image if isinstance(image, str) else None
        if key is None or key not in verified:
            verify_image(image, where=f"{where} image {k}")
            if key is not None:
                verified.add(key)


def _count_outside(sample: Sample, root: str, report: LoadReport, where: str) -> None:
    """Count the image paths of ``sample`` that resolve outside ``root`` (symlinks followed)."""
    for image in sample.images:
        if isinstance(image, str) and os.path.commonpath([root, os.path.realpath(image)]) != root:
            report.outside += 1
            report.outside_example = report.outside_example or f"{image} ({where})"


def check_numbers(sample: Sample, columns: Sequence[str], *, where: str) -> None:
    """Every column of ``columns`` in ``sample.meta`` must be a finite number (a loss reads it):
    a missing, non-numeric, NaN or infinite value is a :class:`DataError` naming the row."""
    for column in columns:
        value = sample.meta.get(column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problem = "missing" if value is None else f"{value!r}, not a finite number"
            raise data_error(
                "bad number",
                f"{where}: column {column!r} is {problem}; a loss reads it (fix the row, or skip such rows "
                "with data.skip_bad_rows=true)",
            )


def load_samples(
    path: str | os.PathLike,
    kind: Kind,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
    check_images: bool = True,
    limit: int | None = None,
    keep: Callable[[Sample], bool] | None = None,
) -> list[Sample]:
    """:func:`load_samples_with_report` without the report."""
    samples, _ = load_samples_with_report(
        path,
        kind,
        split=split,
        image_root=image_root,
        skip_bad_rows=skip_bad_rows,
        check_images=check_images,
        limit=limit,
        keep=keep,
    )
    return samples


# ----------------------------------------------------------------------------- writing


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> int:
    """Write rows as JSON Lines (UTF-8, atomically via a temporary file); return the row count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, p)
    return n


def write_samples(
    samples: Iterable[Sample], path: str | os.PathLike, *, image_dir: str = "images", conversational: bool = True
) -> int:
    """Write samples to ``.jsonl`` (images as relative paths) or ``.parquet`` (images embedded).

    The file reloads with :func:`load_samples`; returns the number of rows written.
    """
    p = Path(path)
    if p.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{p}: write to a .jsonl or .parquet file")
    embed = p.suffix == ".parquet"
    rows = (
        sample_to_row(s, out_dir=p.parent, image_dir=image_dir, embed_images=embed, conversational=conversational)
        for s in samples
    )
    if not embed:
        return write_jsonl(rows, p)
    table = pa.Table.from_pylist(list(rows))
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, p)
    return table.num_rows
