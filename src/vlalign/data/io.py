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
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from vlalign.data.schema import (
    DataError,
    ImageLike,
    Message,
    PreferenceSample,
    PromptSample,
    Sample,
    SupervisedSample,
    UnpairedSample,
    completion_text,
    data_error,
    prompt_messages,
    verify_image,
)

logger = logging.getLogger(__name__)

Kind = Literal["supervised", "preference", "unpaired", "prompt"]
KINDS: tuple[str, ...] = ("supervised", "preference", "unpaired", "prompt")

IMAGE_COLUMNS = ("images", "image", "image_path", "img_path")
PROMPT_COLUMNS = ("prompt", "question", "query")
CONVERSATION_COLUMNS = ("messages", "conversations")
COMPLETION_COLUMNS = ("completion", "response", "answer")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        text = f"{self.source}: {self.loaded} of {self.rows} rows loaded as {self.kind} samples"
        if skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            text += f"; {skipped} skipped ({reasons})"
        return text


# ----------------------------------------------------------------------------- raw rows


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
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno}: not valid JSON ({exc}); one JSON object per line") from exc
            yield f"{path} line {lineno}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


def _iter_hf(folder: Path, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

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
        raise FileNotFoundError(
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


def _base_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


# ----------------------------------------------------------------------------- row -> sample


def _missing(where: str, row: dict[str, Any], wanted: str) -> DataError:
    return data_error(
        "missing column",
        f"{where}: missing column {wanted} (the row has: {', '.join(sorted(row)) or 'nothing'})",
    )


def _first(row: dict[str, Any], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if row.get(n) is not None), None)


def _image_like(value: Any, base: Path, where: str) -> ImageLike:
    if isinstance(value, (Image.Image, bytes, bytearray)):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)) and str(value):
        text = str(value)
        if re.match(r"^[a-z]+://", text):
            raise data_error("unreadable image", f"{where}: image {text!r} is a URL; download it and give a local path")
        return text if os.path.isabs(text) else str(base / text)
    raise data_error("unreadable image", f"{where}: cannot use {value!r:.80} as an image (path, bytes or PIL image)")


def _row_images(row: dict[str, Any], base: Path, where: str) -> tuple[list[ImageLike], str | None]:
    column = _first(row, IMAGE_COLUMNS)
    if column is None:
        return [], None
    value = row[column]
    values = value if isinstance(value, list) else [value]
    return [_image_like(v, base, f"{where} column '{column}'") for v in values], column


def _conversation(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"{where}: a conversation must be a list of messages, got {type(value).__name__}")
    out: list[Message] = []
    for k, m in enumerate(value):
        if isinstance(m, dict) and "from" in m and "value" in m:  # LLaVA / ShareGPT
            role = _LLAVA_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise DataError(f"{where}: message {k} is from {m['from']!r}; expected human, gpt or system")
            out.append({"role": role, "content": m["value"]})
        else:
            out.append(m)
    return out


def _split_last_assistant(messages: list[Message], column: str, where: str) -> tuple[list[Message], Any]:
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: column '{column}' must end with an assistant (gpt) turn, the completion")
    return messages[:-1], [messages[-1]]


def _vlfeedback_pair(row: dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    rated: list[tuple[float, int, str, str]] = []
    for k, comp in enumerate(row["completions"] or []):
        ratings = []
        for aspect in (comp.get("annotations") or {}).values():
            try:
                ratings.append(float((aspect or {}).get("Rating")))
            except (TypeError, ValueError):
                continue
        ratings = [r for r in ratings if math.isfinite(r)]
        if ratings and isinstance(comp.get("response"), str):
            rated.append((sum(ratings) / len(ratings), k, comp["response"], str(comp.get("model", ""))))
    if len(rated) < 2 or max(rated)[0] == min(rated)[0]:
        raise data_error("no preference", f"{where}: 'completions' has no two responses with different ratings")
    best = max(rated, key=lambda r: (r[0], -r[1]))
    worst = min(rated, key=lambda r: (r[0], r[1]))
    meta = {"chosen_rating": best[0], "rejected_rating": worst[0], "chosen_model": best[3], "rejected_model": worst[3]}
    return best[2], worst[2], meta


def _prompt_and_targets(row: dict[str, Any], kind: str, where: str) -> tuple[Any, dict[str, Any], set[str], dict]:
    """The raw prompt, the raw target texts by field, the consumed columns and extra meta."""
    targets: dict[str, Any] = {}
    used: set[str] = set()
    extra: dict[str, Any] = {}
    conv_col = _first(row, CONVERSATION_COLUMNS)
    prompt_col = _first(row, PROMPT_COLUMNS)
    if conv_col is not None and prompt_col is None:
        messages = _conversation(row[conv_col], f"{where} column '{conv_col}'")
        used.add(conv_col)
        if kind == "prompt" and messages and messages[-1].get("role") == "assistant":
            prompt, last = _split_last_assistant(messages, conv_col, where)
            extra["completion"] = completion_text(last, field=conv_col, where=where)
        elif kind == "prompt":
            prompt = messages
        else:
            prompt, last = _split_last_assistant(messages, conv_col, where)
            targets["chosen" if kind == "preference" else "completion"] = last
        if kind == "preference" and "rejected_conversations" in row:  # POVID
            rejected = _conversation(row["rejected_conversations"], f"{where} column 'rejected_conversations'")
            targets["rejected"] = _split_last_assistant(rejected, "rejected_conversations", where)[1]
            used.add("rejected_conversations")
    elif prompt_col is not None:
        prompt = row[prompt_col]
        used.add(prompt_col)
    else:
        raise _missing(where, row, "'prompt' (or question, query, messages, conversations)")
    if kind == "supervised" and "completion" not in targets:
        col = _first(row, COMPLETION_COLUMNS)
        if col is None:
            raise _missing(where, row, "'completion' (or response, answer)")
        targets["completion"] = row[col]
        used.add(col)
    elif kind == "unpaired":
        for col in ("completion", "label"):
            if row.get(col) is None:
                raise _missing(where, row, f"'{col}'")
        targets["completion"] = row["completion"]
        used.update(("completion", "label"))
    elif kind == "preference":
        if "chosen" in row or "rejected" in row or "completions" not in row:
            for col in ("chosen", "rejected"):
                if col in row:
                    targets[col] = row[col]
                    used.add(col)
                elif col not in targets:
                    raise _missing(where, row, f"'{col}'")
        else:  # VLFeedback: rated completions
            targets["chosen"], targets["rejected"], extra = _vlfeedback_pair(row, where)
            used.add("completions")
    return prompt, targets, used, extra


def row_to_sample(row: dict[str, Any], kind: Kind, *, where: str, base_dir: str | os.PathLike) -> Sample:
    """Convert one raw row to a sample of ``kind``; :class:`DataError` names ``where`` on a problem."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {', '.join(KINDS)}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    images, image_col = _row_images(row, Path(base_dir), where)
    raw_prompt, targets, used, extra = _prompt_and_targets(row, kind, where)
    prompt = prompt_messages(raw_prompt, len(images), where=where)
    texts = {name: completion_text(value, field=name, where=where) for name, value in targets.items()}
    used |= {image_col, "id"} if image_col else {"id"}
    meta = {k: v for k, v in row.items() if k not in used and not _is_image_blob(v)}
    meta.update(extra)
    sample_id = str(row.get("id") if row.get("id") is not None else row.get("idx", where))
    if kind == "supervised":
        return SupervisedSample(sample_id, images, prompt, texts["completion"], meta)
    if kind == "prompt":
        return PromptSample(sample_id, images, prompt, meta)
    if kind == "unpaired":
        label = row["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true or false, got {label!r}")
        return UnpairedSample(sample_id, images, prompt, texts["completion"], label, meta)
    extra_rejected = meta.pop("rejected_extra", None) or []
    if not isinstance(extra_rejected, list):
        raise DataError(f"{where}: 'rejected_extra' must be a list of completions")
    rejected_extra = [
        completion_text(t, field=f"rejected_extra[{k}]", where=where) for k, t in enumerate(extra_rejected)
    ]
    return PreferenceSample(sample_id, images, prompt, texts["chosen"], texts["rejected"], meta, rejected_extra)


def _is_image_blob(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, Image.Image)) or (isinstance(value, dict) and "bytes" in value)


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
) -> tuple[list[Sample], LoadReport]:
    """Load a dataset as samples of ``kind`` (see the module doc for formats and columns).

    ``image_root`` is the folder relative image paths start from (default: the data file's
    folder). ``check_images`` decodes every distinct image once to catch missing or corrupt files.
    A bad row raises :class:`DataError` naming file, row and problem, unless ``skip_bad_rows``: then
    it is skipped and counted in the report (the summary is also logged as a warning).
    ``keep`` selects samples (e.g. by task): a row it rejects is passed over before its images are
    checked and is not counted, so ``limit`` counts the rows kept.
    """
    base = Path(image_root) if image_root is not None else _base_dir(path)
    report = LoadReport(source=str(path), kind=kind)
    samples: list[Sample] = []
    verified: set[str] = set()
    for where, row in iter_rows(path, split=split):
        if limit is not None and report.rows >= limit:
            break
        try:
            sample = row_to_sample(row, kind, where=where, base_dir=base)
            if keep is not None and not keep(sample):
                continue
            if check_images:
                for k, image in enumerate(sample.images):
                    key = image if isinstance(image, str) else None
                    if key is None or key not in verified:
                        verify_image(image, where=f"{where} image {k}")
                        if key is not None:
                            verified.add(key)
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
    if report.skipped:
        logger.warning("%s\n  e.g. %s", report.summary(), "\n  e.g. ".join(report.examples))
    return samples, report


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


_RESERVED = {"id", "images", "prompt", "completion", "chosen", "rejected", "rejected_extra", "label"}


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def _image_entry(image: ImageLike, out_dir: Path, image_dir: str, stem: str, embed: bool) -> Any:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if embed:
            return {"bytes": path.read_bytes(), "path": path.name}
        try:
            return os.path.relpath(path, out_dir)
        except ValueError:  # another drive on Windows
            return str(path.resolve())
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, suffix = buf.getvalue(), ".png"
    else:
        data = bytes(image)
        with Image.open(io.BytesIO(data)) as img:
            suffix = "." + (img.format or "png").lower()
    if embed:
        return {"bytes": data, "path": stem + suffix}
    target = out_dir / image_dir / (stem + suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return f"{image_dir}/{stem}{suffix}"


def sample_to_row(
    sample: Sample,
    *,
    out_dir: str | os.PathLike,
    image_dir: str = "images",
    embed_images: bool = False,
    conversational: bool = True,
) -> dict[str, Any]:
    """One sample as a row in the TRL layout; images that are not files are saved under ``image_dir``.

    Completions become assistant messages (``conversational``) or plain strings; ``meta`` entries
    become columns. ``embed_images`` stores images as ``{"bytes", "path"}`` dicts (for Parquet).
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", sample.id).strip("_") or "image"
    images = [
        _image_entry(im, Path(out_dir), image_dir, f"{stem}-{k}", embed_images) for k, im in enumerate(sample.images)
    ]
    text = _assistant if conversational else (lambda t: t)
    row: dict[str, Any] = {"id": sample.id, "images": images, "prompt": sample.prompt}
    if isinstance(sample, (SupervisedSample, UnpairedSample)):
        row["completion"] = text(sample.completion)
    if isinstance(sample, UnpairedSample):
        row["label"] = sample.label
    if isinstance(sample, PreferenceSample):
        row["chosen"], row["rejected"] = text(sample.chosen), text(sample.rejected)
        if sample.rejected_extra:
            row["rejected_extra"] = [text(t) for t in sample.rejected_extra]
    clash = _RESERVED & set(sample.meta)
    if clash:
        raise ValueError(f"sample {sample.id!r}: meta keys {sorted(clash)} clash with data columns; rename them")
    row.update(sample.meta)
    return row


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows))
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, p)
    return table.num_rows
