"""The shapes world's rewards and facts: what it plugs into :mod:`vlalign.rewards` and :mod:`vlalign.data`.

* :func:`object_f1` and :func:`shapes_answer`, reward functions ``(completion, sample) -> float``
  registered under those names in :data:`vlalign.rewards.verifiable.REWARD_FUNCTIONS` (so a rewards
  config can name them), and the world's colour words for
  :func:`~vlalign.rewards.verifiable.colour_match`;
* :func:`scene_caption`, the fact formatter of a Fact-RLHF reward model's input
  (:func:`vlalign.rewards.facts.facts_text`): a row's ``scene_objects`` as the canonical caption;
* :func:`scene_counts`, the count reader of :func:`vlalign.data.annotations.annotations_of`: how
  many of each object a row's ``scene_objects`` holds;
* :func:`scene_object_box`, the box of a scene object (for :func:`~vlalign.rewards.verifiable.box_iou`).

:func:`vlalign.shapes.plug_in` registers them (it runs when :mod:`vlalign.shapes` is imported).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlalign.data.schema import PromptSample
from vlalign.rewards.verifiable import (
    RewardFn,
    bad_meta,
    colour_match,
    count_match,
    extract_answer,
    require_meta,
    yes_no_match,
)
from vlalign.shapes.vocabulary import COLOUR_RGB, COLOUR_SYNONYMS, SHAPE_PLURALS, caption_from_counts, mentioned_objects

# ----------------------------------------------------------------------------- rewards


def object_f1(completion: str, sample: PromptSample) -> float:
    """F1 between the objects the answer affirms and ``meta["objects"]``.

    Reads ``meta["objects"]`` (object names, e.g. ``["red circle", "blue square"]``). Mentions are
    parsed by :func:`vlalign.shapes.vocabulary.mentioned_objects` (colour + shape, negations left out).
    precision = correct mentions / mentions (hallucinations lower it), recall = correct / present.
    """
    truth = require_meta(sample, "objects", "object_f1", "the names of the objects present")
    if not isinstance(truth, (list, tuple)):
        raise bad_meta(sample, "objects", "object_f1", truth, "a list of object names")
    answer = extract_answer(completion)
    said = set(mentioned_objects(answer)) if answer is not None else set()
    present = {str(t).lower() for t in truth}
    hits = len(said & present)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(said), hits / len(present)
    return 2 * precision * recall / (precision + recall)


def moved_match(completion: str, sample: PromptSample) -> float:
    """1 when the answer names exactly the object that moved (the video task), else 0.

    Reads ``meta["moved_object"]`` (``"red circle"``); mentions are parsed as in :func:`object_f1`, so
    "The red circle moved." scores 1 and "the red circle and the blue square" 0.
    """
    moved = require_meta(sample, "moved_object", "moved_match", "the name of the object that moved")
    answer = extract_answer(completion)
    return float(answer is not None and set(mentioned_objects(answer)) == {str(moved).lower()})


SHAPES_TASK_REWARDS: dict[str, RewardFn] = {
    "counting": count_match,
    "colour": colour_match,
    "existence": yes_no_match,
    "describe": object_f1,
    "moved": moved_match,
}
"""Shapes-world task -> the reward that checks its answer."""


def shapes_answer(completion: str, sample: PromptSample) -> float:
    """The correctness reward of a shapes-world row, by its ``meta["task"]``.

    Reads ``meta["task"]`` then: counting -> :func:`~vlalign.rewards.verifiable.count_match`, colour ->
    :func:`~vlalign.rewards.verifiable.colour_match`,
    existence -> :func:`~vlalign.rewards.verifiable.yes_no_match`, describe -> :func:`object_f1`,
    moved (the video task) -> :func:`moved_match`.
    """
    task = require_meta(sample, "task", "shapes_answer", "the shapes-world task")
    if task not in SHAPES_TASK_REWARDS:
        raise bad_meta(sample, "task", "shapes_answer", task, f"one of {sorted(SHAPES_TASK_REWARDS)}")
    return SHAPES_TASK_REWARDS[task](completion, sample)


def colour_words() -> dict[str, str]:
    """Colour word -> canonical colour: the world's colours and their synonyms."""
    table = {c: c for c in COLOUR_RGB}
    table.update({syn: c for c, syns in COLOUR_SYNONYMS.items() for syn in syns})
    return table


# ----------------------------------------------------------------------------- facts and annotations


def scene_caption(value: Any) -> str | None:
    """The canonical caption of a list of scene objects (dicts with ``shape`` and ``colour``), or None
    when ``value`` is not one: "The image shows two red circles and a blue square."."""
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, Mapping) and "shape" in v and "colour" in v for v in value
    ):
        return None
    return _caption_of(value)


def _caption_of(objects: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for obj in objects:
        key = (str(obj["colour"]), str(obj["shape"]))
        counts[key] = counts.get(key, 0) + 1
    shape_rank = {s: i for i, s in enumerate(SHAPE_PLURALS)}
    colour_rank = {c: i for i, c in enumerate(COLOUR_RGB)}
    order = sorted(
        counts, key=lambda k: (shape_rank.get(k[1], len(shape_rank)), colour_rank.get(k[0], len(colour_rank)), k)
    )
    return caption_from_counts([(counts[k], k[0], k[1]) for k in order])


def scene_counts(value: Any) -> dict[str, int] | None:
    """How many of each object (``"red circle"``) a row's ``scene_objects`` holds; None when it is not a list."""
    if not isinstance(value, list):
        return None
    counts: dict[str, int] = {}
    for obj in value:
        name = f"{obj['colour']} {obj['shape']}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def scene_object_box(obj: Mapping[str, Any]) -> list[float]:
    """The ``[x1, y1, x2, y2]`` box (fractions of the image side) of a shapes-world scene object.

    ``obj`` is one entry of a row's ``scene_objects`` (centre ``x``, ``y`` and side ``size``).
    """
    half = obj["size"] / 2
    return [obj["x"] - half, obj["y"] - half, obj["x"] + half, obj["y"] + half]
