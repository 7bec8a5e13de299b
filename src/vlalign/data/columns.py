"""The TRL column layout, both ways: a raw row to a sample (:func:`row_to_sample`) and back (:func:`sample_to_row`).

Which columns are read, and the public formats brought unchanged (TRL vision datasets, RLAIF-V,
VLFeedback, POVID), are listed in :mod:`vlalign.data.io`. Every problem raises
:class:`~vlalign.data.schema.DataError` naming the row (``where``) and what is wrong.
"""

from __future__ import annotations

import io
import math
import os
import re
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
)
from vlalign.data.video import resolve_video_paths

Kind = Literal["supervised", "preference", "unpaired", "prompt"]
KINDS: tuple[str, ...] = ("supervised", "preference", "unpaired", "prompt")

IMAGE_COLUMNS = ("images", "image", "image_path", "img_path")
PROMPT_COLUMNS = ("prompt", "question", "query")
CONVERSATION_COLUMNS = ("messages", "conversations")
COMPLETION_COLUMNS = ("completion", "response", "answer")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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
    if isinstance(value, dict):  # the Hugging Face image form, {"bytes": ..., "path": ...}
        if set(value) - {"bytes", "path"} or not (value.get("bytes") or value.get("path")):
            raise data_error(
                "unreadable image",
                f"{where}: an image given as a dict must be {{'bytes': ..., 'path': ...}} (the Hugging Face "
                f"image form), got keys {sorted(value)}; give a path, or a list of paths for several images",
            )
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
    if column == "images" and isinstance(value, dict) and set(value) - {"bytes", "path"}:
        raise data_error(
            "unreadable image",
            f"{where}: column 'images' is a dict (keys {sorted(value)[:5]}); it must be a list of images "
            "(paths, bytes or {'bytes', 'path'} dicts) in the order of the prompt's image placeholders",
        )
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
    prompt = resolve_video_paths(prompt_messages(raw_prompt, len(images), where=where), base_dir)
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


# ----------------------------------------------------------------------------- sample -> row


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
