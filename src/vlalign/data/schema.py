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
from typing import Any, Union

from PIL import Image

ImageLike = Union[Image.Image, str, os.PathLike, bytes]
Message = dict[str, Any]


class DataError(ValueError):
    """A dataset row is unusable; the message names the file, the row and the problem."""


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
        raise DataError(f"cannot read image {_describe(image)}: {exc}") from exc
    return img if img.mode == "RGB" else img.convert("RGB")


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


def user_prompt(text: str, n_images: int = 1) -> list[Message]:
    """A one-turn user prompt with ``n_images`` image placeholders before the text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]
