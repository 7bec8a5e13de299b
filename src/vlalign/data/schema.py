"""Sample types shared by every part of vlalign, and their validation.

A *prompt* is a list of chat messages in the Hugging Face / TRL conversational layout::

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many squares?"}]}]

Each ``{"type": "image"}`` part is a placeholder for the next entry of ``images`` (in order).
A *completion* is the assistant's reply as plain text (the chat template adds the role markers).
Images travel as :data:`ImageLike` values (a PIL image, a file path, or encoded bytes) and are
opened with :func:`load_image` where they are used, so that a large dataset is not held in memory.

``meta`` carries anything else a row has (ground truth for evaluation and rewards, the source of a
preference pair, a severity weight...): plain JSON-able values keyed by column name.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vlalign.errors import UserError

ImageLike = Image.Image | str | os.PathLike | bytes
Message = dict[str, Any]


class DataError(UserError, ValueError):
    """A dataset row is unusable; the message names the file, the row and the problem.

    ``reason`` is a short category (``"missing column"``, ``"unreadable image"``...) used to count
    skipped rows; see :func:`data_error`.
    """

    reason: str = "invalid row"


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or folder named by an option does not exist; the message names the option and the path."""

    reason = "missing file"


MAX_ASPECT_RATIO = 200
"""Longest over shortest side of an image that every supported processor takes (Qwen2-VL's and
Qwen2.5-VL's refuse more than 200 with "absolute aspect ratio must be smaller than 200")."""


def data_error(reason: str, message: str) -> DataError:
    """A :class:`DataError` with its skip-summary category set."""
    exc = DataError(message)
    exc.reason = reason
    return exc


@dataclass
class SupervisedSample:
    """A prompt with images and the target completion (supervised fine-tuning)."""

    id: str
    images: list[ImageLike]
    prompt: list[Message]
    completion: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreferenceSample:
    """A prompt with images, a preferred (chosen) and a dispreferred (rejected) completion.

    ``rejected_extra`` holds further rejected completions for objectives with several negatives
    per chosen one (POVID); it is empty for ordinary pairs.
    """

    id: str
    images: list[ImageLike]
    prompt: list[Message]
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)
    rejected_extra: list[str] = field(default_factory=list)


@dataclass
class UnpairedSample:
    """A prompt with images and one completion labelled desirable or not (KTO)."""

    id: str
    images: list[ImageLike]
    prompt: list[Message]
    completion: str
    label: bool
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptSample:
    """A prompt with images and no completion (generation, RL, evaluation)."""

    id: str
    images: list[ImageLike]
    prompt: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


def load_image(image: ImageLike) -> Image.Image:
    """Open an :data:`ImageLike` as an RGB PIL image (raises :class:`DataError` if unreadable)."""
    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, (bytes, bytearray)):
            img = Image.open(io.BytesIO(image))
        else:
            img = Image.open(os.fspath(image))
        img.load()
    except Exception as exc:  # PIL raises many types for a bad file
        raise data_error("unreadable image", f"cannot read image {_describe(image)}: {exc}") from exc
    return img if img.mode == "RGB" else to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An image as 8-bit RGB, high bit depths scaled rather than clipped.

    PIL's ``convert("RGB")`` clips a 16-bit or 32-bit integer image at 255 (a full-range 16-bit
    gradient becomes almost all white) and a float image likewise. Here integer images are
    divided by their type's range: 16-bit values (``I;16*`` modes, and ``I`` images whose values
    fit 16 bits) by 257, so 0..65535 maps onto 0..255 with 257*k -> k; larger ``I`` values by
    (2**32-1)/255. Float (``F``) images in [0, 1] are multiplied by 255, other float ranges are
    clipped to [0, 255]. Every other mode goes through ``convert("RGB")``.
    """
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        else:
            top = float(values.max()) if values.size else 0.0
            scale = 1 / 257 if img.mode.startswith("I;16") or top <= 65535 else 255 / (2**32 - 1)
            scale = 1.0 if img.mode == "I" and top <= 255 and values.min() >= 0 else scale
        eight = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    return img.convert("RGB")


def _describe(image: ImageLike) -> str:
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.size}>"
    return repr(os.fspath(image))


def count_image_placeholders(messages: list[Message]) -> int:
    """Number of ``{"type": "image"}`` parts in a conversation."""
    n = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            n += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return n


def video_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    """A checked ``{"type": "video", "video": ...}`` part: ``video`` is a list of at least two frame
    paths (in order) or one video file's path; an optional ``fps`` (frames per second of the given
    frames, > 0) sets the timestamps of processors that write them (Qwen3-VL)."""
    video, fps = part.get("video"), part.get("fps")
    frames_ok = isinstance(video, list) and len(video) >= 2 and all(isinstance(f, str) and f for f in video)
    if not (frames_ok or (isinstance(video, str) and video)):
        raise DataError(
            f"{where} must be {{'type': 'video', 'video': ...}} with a list of at least two frame paths or a "
            f"video file path, got {video!r:.120}"
        )
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0):
        raise DataError(f"{where}: a video's 'fps' must be a positive number, got {fps!r}")
    out: dict[str, Any] = {"type": "video", "video": list(video) if isinstance(video, list) else video}
    return out if fps is None else {**out, "fps": float(fps)}


def count_video_placeholders(messages: list[Message]) -> int:
    """Number of ``{"type": "video"}`` parts in a conversation."""
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") == "video"
    )


def user_prompt(text: str, n_images: int = 1) -> list[Message]:
    """A one-turn user prompt with ``n_images`` image placeholders before the text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------- normalisation and validation

Sample = SupervisedSample | PreferenceSample | UnpairedSample | PromptSample

IMAGE_TOKEN = "<image>"
"""Inline image marker of LLaVA-style text (``"<image>\\nWhat is this?"``), turned into placeholders."""

ROLES = ("system", "user", "assistant", "tool")


def _text_to_parts(text: str) -> list[dict[str, Any]]:
    """``"<image>\\nWhat?"`` -> ``[{"type": "image"}, {"type": "text", "text": "What?"}]``.

    Text next to a marker is stripped of surrounding whitespace; text without markers is kept as is.
    """
    if IMAGE_TOKEN not in text:
        return [{"type": "text", "text": text}] if text else []
    parts: list[dict[str, Any]] = []
    for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if k > 0:
            parts.append({"type": "image"})
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip()})
    return parts


def _normalise_message(message: Any, where: str, k: int) -> Message:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"{where}: message {k} must be a dict with 'role' and 'content', got {message!r:.120}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(f"{where}: message {k} has role {role!r}; use one of {', '.join(ROLES)}")
    if isinstance(content, str):
        return {"role": role, "content": _text_to_parts(content)}
    if not isinstance(content, list):
        kind = type(content).__name__
        raise DataError(f"{where}: message {k} content must be a string or a list of parts, got {kind}")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.extend(_text_to_parts(part["text"]))
        elif kind == "video":
            parts.append(video_part(part, f"{where}: message {k} part {j}"))
        else:
            raise DataError(
                f"{where}: message {k} part {j} must be {{'type': 'image'}}, {{'type': 'text', 'text': str}} or "
                f"{{'type': 'video', 'video': frame paths or a video file}}, got {part!r:.120}"
            )
    return {"role": role, "content": parts}


def prompt_messages(prompt: Any, n_images: int, *, where: str = "prompt") -> list[Message]:
    """Normalise a prompt to conversational messages whose image placeholders match ``n_images``.

    Accepts a plain string or a list of messages (content as a string or a list of parts).
    ``<image>`` markers in text become ``{"type": "image"}`` parts. A prompt with no placeholder at
    all gets ``n_images`` of them prepended to its first user message (as TRL does); otherwise the
    number of placeholders must equal ``n_images`` (:class:`DataError` naming ``where`` if not).
    """
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: the prompt must be a non-empty string or list of messages, got {prompt!r:.120}")
    messages = [_normalise_message(m, where, k) for k, m in enumerate(prompt)]
    if not any(part.get("type") == "text" for m in messages for part in m["content"]):
        raise DataError(f"{where}: the prompt has no text")
    n_placeholders = count_image_placeholders(messages)
    if n_placeholders == 0 and n_images > 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: the prompt has no user message to attach {n_images} image(s) to")
        first_user["content"] = [{"type": "image"} for _ in range(n_images)] + first_user["content"]
    elif n_placeholders != n_images:
        raise data_error(
            "image count mismatch",
            f"{where}: the prompt has {n_placeholders} image placeholder(s) but the row has {n_images} image(s);"
            " give one image per {'type': 'image'} part (or '<image>' marker), in order",
        )
    return messages


def completion_text(value: Any, *, field: str, where: str = "row") -> str:
    """The text of a completion given as a string or as assistant message(s); empty is an error."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        text = completion_text([value], field=field, where=where)
    elif isinstance(value, list) and all(isinstance(m, dict) for m in value):
        chunks: list[str] = []
        for k, m in enumerate(value):
            if m.get("role", "assistant") != "assistant":
                raise DataError(f"{where}: '{field}' message {k} has role {m.get('role')!r}; expected 'assistant'")
            content = m.get("content")
            if isinstance(content, str):
                chunks.append(content)
            elif isinstance(content, list):
                chunks += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
            else:
                raise DataError(f"{where}: '{field}' message {k} has no text content")
        text = "".join(chunks)
    else:
        raise DataError(f"{where}: '{field}' must be a string or assistant message(s), got {type(value).__name__}")
    if not text.strip():
        raise data_error("empty text", f"{where}: '{field}' is empty; every {field} needs some text (or skip the row)")
    return text


def verify_image(image: ImageLike, *, where: str = "image") -> None:
    """Check that an image can be read and decoded, without keeping it (raises :class:`DataError`)."""
    if isinstance(image, Image.Image):
        return
    if not isinstance(image, (bytes, bytearray)) and not os.path.isfile(os.fspath(image)):
        raise data_error(
            "unreadable image",
            f"{where}: image file {_describe(image)} does not exist (relative paths start at the data file's folder)",
        )
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else os.fspath(image)) as img:
            img.load()
            width, height = img.size
    except Exception as exc:
        problem = f"{where}: image {_describe(image)} is unreadable or corrupt ({exc})"
        raise data_error("unreadable image", problem) from exc
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise data_error(
            "unusable image size",
            f"{where}: image {_describe(image)} is {width}x{height} px; vision processors refuse an aspect "
            f"ratio above {MAX_ASPECT_RATIO} (crop or pad the image, or skip the row with data.skip_bad_rows=true)",
        )


def validate_sample(sample: Sample, *, where: str | None = None, check_images: bool = False) -> None:
    """Check a sample's invariants; :class:`DataError` names ``where`` (default: the sample id).

    Placeholders must match the images, completions must be non-empty strings, and with
    ``check_images`` every image must decode.
    """
    where = where or f"sample {sample.id!r}"
    n_placeholders = count_image_placeholders(sample.prompt)
    if n_placeholders != len(sample.images):
        raise data_error(
            "image count mismatch",
            f"{where}: the prompt has {n_placeholders} image placeholder(s) but {len(sample.images)} image(s)",
        )
    texts: dict[str, Any] = {}
    if isinstance(sample, (SupervisedSample, UnpairedSample)):
        texts["completion"] = sample.completion
    if isinstance(sample, PreferenceSample):
        texts["chosen"], texts["rejected"] = sample.chosen, sample.rejected
        texts.update({f"rejected_extra[{k}]": t for k, t in enumerate(sample.rejected_extra)})
    for name, text in texts.items():
        if not isinstance(text, str) or not text.strip():
            raise data_error("empty text", f"{where}: '{name}' is empty or not a string")
    if check_images:
        for k, image in enumerate(sample.images):
            verify_image(image, where=f"{where} image {k}")
