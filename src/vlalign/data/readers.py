"""Raw rows of a dataset source: JSON Lines, JSON arrays, Parquet, saved HF datasets, folders of shards.

:func:`iter_rows` yields ``(location, row dict)``, the location naming file and row for error
messages; a JSON Lines line that is not JSON comes as ``(location, DataError)``, so that the loader
can skip and count it (``data.skip_bad_rows``) or raise it. Nothing is downloaded. What the columns mean is :mod:`vlalign.data.columns`; loading
samples is :func:`vlalign.data.io.load_samples`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vlalign.data.schema import DataError, DataFileNotFoundError, data_error


def _is_hf_saved(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _iter_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("r", encoding="utf-8") as fh:
        head = fh.read(1024).lstrip()
        fh.seek(0)
        if path.suffix == ".json" and head.startswith("["):  # a JSON array (LLaVA / POVID style)
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc})") from exc
            for i, row in enumerate(data):
                yield f"{path} row {i}", row
            return
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:  # yielded, not raised: data.skip_bad_rows may count and skip it
                row = data_error("not JSON", f"{path} line {lineno}: not valid JSON ({exc}); one JSON object per line")
            yield f"{path} line {lineno}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


def _iter_hf(folder: Path, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets  # here, not at the top: about a second to import, and only saved folders need it

    ds = datasets.load_from_disk(str(folder))
    name = str(folder)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        chosen = split or ("train" if "train" in ds else (splits[0] if len(splits) == 1 else None))
        if chosen not in ds:
            raise DataError(f"{folder}: choose a split with split=...; this dataset has {', '.join(splits)}")
        ds, name = ds[chosen], f"{folder}[{chosen}]"
    table = ds.with_format("arrow")  # undecoded: images stay {"bytes", "path"} dicts
    for start in range(0, len(ds), 256):
        for k, row in enumerate(table[start : start + 256].to_pylist()):
            yield f"{name} row {start + k}", row


def _shards(folder: Path, split: str | None) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json") and p.is_file())
    files = [p for p in files if p.name not in ("dataset_info.json", "state.json", "manifest.json")]
    if split is not None:
        pattern = re.compile(rf"(^|[/_\-.]){re.escape(split)}([/_\-.]|$)")
        files = [p for p in files if pattern.search(str(p.relative_to(folder)))]
    return files


def iter_rows(path: str | os.PathLike, *, split: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every row of a dataset source as ``(location, row dict)``; the location names file and row."""
    p = Path(path)
    if not p.exists():
        raise DataFileNotFoundError(
            f"{p}: no such file or folder. vlalign reads local data only; download a hub dataset first "
            "(e.g. datasets.load_dataset(name).save_to_disk(folder)) and pass the folder"
        )
    if p.is_dir():
        if _is_hf_saved(p):
            yield from _iter_hf(p, split)
            return
        shards = _shards(p, split)
        if not shards:
            raise DataError(f"{p}: no .parquet/.jsonl/.json files{f' for split {split!r}' if split else ''} found")
        for shard in shards:
            yield from iter_rows(shard)
        return
    if p.suffix == ".parquet":
        yield from _iter_parquet(p)
    elif p.suffix in (".jsonl", ".json"):
        yield from _iter_json(p)
    else:
        raise DataError(f"{p}: unknown format {p.suffix!r}; use .jsonl, .json, .parquet or a saved HF datasets folder")


def default_image_root(path: str | os.PathLike) -> Path:
    """The folder relative image paths of a source start from by default: its own folder, or the folder itself."""
    p = Path(path)
    return p if p.is_dir() else p.parent
