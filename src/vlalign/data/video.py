"""Videos in prompts: ``{"type": "video", "video": [frame paths] | "clip.mp4", "fps": 2}`` parts.

A video travels inside its prompt part (not in ``images``): a list of frame files (read here with
:func:`~vlalign.data.schema.load_image`, in order) or one video file (mp4, webm, ...: every frame,
decoded here with PyAV, ``pip install av``, at the file's own frame rate; without PyAV the path goes
to the processor, whose loader in transformers 5 is torchcodec alone, which needs FFmpeg's shared
libraries on the system). ``fps`` (optional) is the frame rate of a frame list; processors that
write timestamps into the prompt (Qwen3-VL's ``<1.5 seconds>``) use it, and a frame list without it
counts as :data:`DEFAULT_FRAME_FPS`.

:func:`processor_video_inputs` gives the processor's ``videos=`` (and ``video_metadata=``)
arguments for a batch of prompts; :func:`video_rows` says which rows of the processor's video
tensors (``pixel_values_videos``, ``video_grid_thw``) belong to which prompt, as
:func:`vlalign.data.collate.encode_prompts` does for images.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from vlalign.data.schema import DataError, Message, count_video_placeholders, data_error, load_image, verify_image

DEFAULT_FRAME_FPS = 1.0
"""Frame rate assumed for a list of frames whose part gives no ``fps``."""


def prompt_videos(messages: list[Message]) -> list[dict[str, Any]]:
    """The ``{"type": "video"}`` parts of a conversation, in order."""
    return [
        part
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") == "video"
    ]


def _resolve(path: str, base: Path) -> str:
    return path if os.path.isabs(path) else str(base / path)


def resolve_video_paths(messages: list[Message], base: str | os.PathLike) -> list[Message]:
    """``messages`` with each video part's relative paths made relative to ``base`` (a data file's folder)."""
    root = Path(base)
    out: list[Message] = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "video" for p in content):
            out.append(m)
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "video":
                video = part["video"]
                resolved = [_resolve(f, root) for f in video] if isinstance(video, list) else _resolve(video, root)
                part = {**part, "video": resolved}
            parts.append(part)
        out.append({**m, "content": parts})
    return out


def verify_videos(messages: list[Message], *, where: str) -> None:
    """Check that every video's frames decode and every video file exists (raises :class:`DataError`)."""
    for k, part in enumerate(prompt_videos(messages)):
        video = part["video"]
        if isinstance(video, list):
            for j, frame in enumerate(video):
                verify_image(frame, where=f"{where} video {k} frame {j}")
        elif not os.path.isfile(video):
            raise data_error(
                "unreadable video",
                f"{where} video {k}: file {video!r} does not exist (relative paths start at the data file's folder)",
            )


def read_video_file(path: str) -> tuple[Any, dict[str, Any] | None]:
    """A video file's frames ``(T, H, W, 3)`` uint8 and metadata, decoded with PyAV when it is installed
    (every frame, in order; the stream's average frame rate); without PyAV, the path itself and no
    metadata (the processor's own loader reads it: torchcodec in transformers 5).

    Decoded here rather than by ``transformers.video_utils.load_video(backend="pyav")``, which
    needs the frame count in the container's header (absent from Matroska / WebM files).
    """
    if not os.path.isfile(path):
        raise data_error("unreadable video", f"video file {path!r} does not exist")
    if importlib.util.find_spec("av") is None:
        return path, None
    import av  # PyAV: an optional dependency (pip install av), its wheels carry FFmpeg

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            rate = stream.average_rate or stream.guessed_rate
    except (av.FFmpegError, IndexError, ValueError) as exc:  # not a video, no video stream, corrupt
        raise data_error("unreadable video", f"video file {path!r} cannot be decoded: {exc}") from None
    if not frames:
        raise data_error("unreadable video", f"video file {path!r} holds no frame")
    fps = float(rate) if rate else DEFAULT_FRAME_FPS
    meta = {"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames)))}
    return np.stack(frames), meta


def _load(part: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """A video part as the processor takes it (frames, or a file's path when PyAV is missing) and its metadata."""
    video = part["video"]
    if not isinstance(video, list):
        return read_video_file(video)
    frames = [load_image(f) for f in video]
    if len({f.size for f in frames}) > 1:
        raise data_error(
            "unreadable video", f"the frames of a video differ in size: {sorted({f.size for f in frames})}"
        )
    fps = float(part.get("fps", DEFAULT_FRAME_FPS))
    return frames, {"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames)))}


def processor_video_inputs(processor: Any, prompts: Sequence[list[Message]]) -> dict[str, Any]:
    """``videos=`` (and ``video_metadata=``) for one processor call over ``prompts``; empty without videos.

    Metadata is passed only when every video's is known (a file the processor reads itself, without
    PyAV, has its metadata read with it).
    """
    parts = [part for prompt in prompts for part in prompt_videos(prompt)]
    if not parts:
        return {}
    if getattr(processor, "video_processor", None) is None:
        raise DataError(f"{type(processor).__name__} takes no videos; use a model whose processor does")
    loaded = [_load(part) for part in parts]
    inputs: dict[str, Any] = {"videos": [video for video, _ in loaded]}
    if all(meta is not None for _, meta in loaded):
        inputs["video_metadata"] = [meta for _, meta in loaded]
    return inputs


def check_video_placeholders(processor: Any, sample_id: str, prompt: list[Message], text: str) -> None:
    """The rendered prompt must hold the processor's video token once per video part."""
    n_parts = count_video_placeholders(prompt)
    token = getattr(processor, "video_token", None)
    if n_parts and token is not None and text.count(token) != n_parts:
        raise DataError(
            f"sample {sample_id!r}: the rendered prompt holds {text.count(token)} video token(s) {token!r} for "
            f"{n_parts} video part(s); the chat template must render each {{'type': 'video'}} part as {token!r}"
        )


def is_video_key(key: str) -> bool:
    """Whether a processor output belongs to the videos (``pixel_values_videos``, ``video_grid_thw`` ...)."""
    return "video" in key or key == "second_per_grid_ts"


def video_rows(vision: dict[str, Tensor], num_videos: list[int]) -> dict[str, list[slice]]:
    """For each video tensor, the slice of its first dimension that belongs to each prompt.

    ``video_grid_thw`` (and Qwen2.5-VL's ``second_per_grid_ts``) has one row per video; with a grid,
    ``pixel_values_videos`` holds ``prod(grid)`` patch rows per video, else one row per video.
    """
    video_bounds, patch_bounds = [0], [0]
    for n in num_videos:
        video_bounds.append(video_bounds[-1] + n)
    grid = vision.get("video_grid_thw")
    if grid is not None:
        per_video = grid.prod(dim=-1).tolist()
        for i in range(len(num_videos)):
            patch_bounds.append(patch_bounds[-1] + sum(per_video[video_bounds[i] : video_bounds[i + 1]]))
    rows: dict[str, list[slice]] = {}
    for key, tensor in vision.items():
        if key.startswith("pixel_values") and grid is not None:
            bounds = patch_bounds
        elif tensor.shape[0] == sum(num_videos):
            bounds = video_bounds
        else:
            raise DataError(
                f"cannot tell which rows of the processor output {key!r} {tuple(tensor.shape)} belong to which video"
            )
        rows[key] = [slice(bounds[i], bounds[i + 1]) for i in range(len(num_videos))]
    return rows
