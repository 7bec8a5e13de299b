"""The shapes world: vlalign's embedded default data, with exact ground truth.

A *scene* is 1..K coloured shapes ("objects") placed on a grid, generated deterministically from a
seed, rendered with PIL (:mod:`vlalign.shapes.render`) and turned into question/answer rows
(:mod:`vlalign.shapes.tasks`). This module holds the world's configuration, scene generation, the
object vocabulary CHAIR reads and the corpus the tiny models' tokenizers learn; the words and the
canonical phrasing of every prompt and answer are :mod:`vlalign.shapes.vocabulary`.

Co-occurrence bias: ``WorldConfig.cooccurrence`` maps an object to a partner object; whenever an
object of a pair is placed, its partner is added with probability ``cooccurrence_strength`` (if
there is room and the partner is not already there). A model fine-tuned on such data learns the
language prior "red circle -> blue square" and hallucinates the partner where it is absent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from vlalign.config import StrictFields
from vlalign.data.annotations import NUMBER_WORDS, plural
from vlalign.data.schema import DataError
from vlalign.shapes.vocabulary import (
    COLOUR_RGB,
    COLOUR_SYNONYMS,
    DESCRIBE_PROMPT,
    NO,
    SHAPE_PLURALS,
    SHAPE_SYNONYMS,
    YES,
    caption_from_counts,
    colour_question,
    count_phrase,
    counting_question,
    existence_question,
    object_name,
    split_object_name,
)

SPLITS: tuple[str, ...] = ("train", "validation", "test", "compositional")


# ----------------------------------------------------------------------------- config


@dataclass
class WorldConfig(StrictFields):
    """Everything that defines a shapes world and the datasets written from it."""

    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
    """Shapes that appear (any of: circle, square, triangle, star, diamond, cross, hexagon, heart)."""
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    """Colours that appear (any of: red, green, blue, yellow, purple, orange, pink, cyan, brown,
    black, gray)."""
    min_objects: int = 1
    """Fewest objects in a scene."""
    max_objects: int = 5
    """Most objects in a scene (at most ``grid * grid``)."""
    image_size: int = 96
    """Side of the rendered square image in pixels (objects stay legible down to about 48)."""
    grid: int = 3
    """Objects sit in distinct cells of a ``grid x grid`` layout, so they never overlap."""
    object_size: tuple[float, float] = (0.6, 0.9)
    """Range of an object's size (side of its bounding box) as a fraction of a grid cell."""
    background: tuple[int, int, int] = (245, 245, 240)
    """Background RGB colour."""
    supersample: int = 2
    """Draw at this multiple of ``image_size`` and downsample (anti-aliased edges); 1 is fastest."""
    seed: int = 0
    """Seed of everything: the same config always writes byte-identical datasets."""
    cooccurrence: dict[str, str] = field(
        default_factory=lambda: {
            "red circle": "blue square",
            "green triangle": "yellow star",
            "purple diamond": "orange cross",
        }
    )
    """Pairs of objects that tend to appear together (object -> partner; symmetric)."""
    cooccurrence_strength: float = 0.75
    """Probability that placing one object of a pair also places its partner (0 disables the bias)."""
    heldout_combinations: tuple[str, ...] = ("blue circle", "red star", "yellow triangle", "green cross")
    """Objects never shown in train/validation/test; every compositional-split scene has one."""
    n_train: int = 2000
    """Scenes in the train split."""
    n_validation: int = 200
    """Scenes in the validation split."""
    n_test: int = 500
    """Scenes in the test split."""
    n_compositional: int = 300
    """Scenes in the compositional test split (0 to skip it)."""
    tasks: tuple[str, ...] = ("describe", "existence", "counting", "colour")
    """Tasks written for every scene (any of: describe, existence, counting, colour)."""
    existence_per_scene: int = 2
    """Existence questions per scene, alternating present (``Yes``) and random absent (``No``)."""
    counting_per_scene: int = 1
    """Counting questions per scene."""
    count_absent_prob: float = 0.2
    """Probability that a counting question asks about a shape that is absent (answer ``0``)."""
    colour_per_scene: int = 1
    """Colour questions per scene (fewer when fewer shapes occur exactly once)."""
    conversation_existence: int = 4
    """Existence questions in each scene's conversation of the ``<split>_sft.jsonl`` file (half
    present, half absent)."""
    conversation_counting: int = 3
    """Counting questions in each scene's conversation (distinct shapes, present or absent)."""
    conversation_colour: int = 3
    """Colour questions in each scene's conversation (distinct shapes that occur exactly once)."""
    pope_splits: tuple[str, ...] = ("test",)
    """Splits for which POPE files are written (one file per negative-sampling mode)."""
    pope_per_scene: int = 3
    """POPE questions per scene and answer: up to this many present objects and as many absent."""
    video_clips: int = 0
    """Clips of the video task ("Which shape moved?", :mod:`vlalign.shapes.video`) per split, from
    the split's first scenes; 0 (the default) writes none and leaves the world's files as they were."""

    def __post_init__(self) -> None:
        validate_config(self)

    @property
    def objects(self) -> list[str]:
        """Every object name of this world, in canonical order (shape-major)."""
        return [object_name(c, s) for s in self.shapes for c in self.colours]

    @property
    def partners(self) -> dict[str, str]:
        """The co-occurrence pairs in both directions."""
        out = dict(self.cooccurrence)
        out.update({b: a for a, b in self.cooccurrence.items()})
        return out


DEMO_WORLD: dict[str, Any] = {
    "shapes": ("circle", "square", "triangle", "cross"),
    "max_objects": 3,
    "object_size": (0.7, 0.95),
    "cooccurrence": {"red circle": "blue square", "green triangle": "yellow cross", "purple square": "orange circle"},
    "heldout_combinations": ("blue circle", "yellow triangle", "green cross"),
    "n_train": 10000,
}
"""The world of ``vlalign demo`` and of the ``shapes:`` datasets: :class:`WorldConfig` with these
changes. Four well-separated shapes, at most three objects, larger objects, 10,000 training
scenes, so that the demo model learns its vision tower from scratch in minutes on a CPU (the
measurements: ``docs/notes/tiny-models.md``)."""


def validate_config(cfg: WorldConfig) -> None:
    """Raise ``ValueError`` naming the field if ``cfg`` cannot make a world."""
    bad = [s for s in cfg.shapes if s not in SHAPE_PLURALS]
    if bad or not cfg.shapes:
        raise ValueError(f"WorldConfig.shapes: unknown shape(s) {bad}; choose from {list(SHAPE_PLURALS)}")
    bad = [c for c in cfg.colours if c not in COLOUR_RGB]
    if bad or not cfg.colours:
        raise ValueError(f"WorldConfig.colours: unknown colour(s) {bad}; choose from {list(COLOUR_RGB)}")
    if len(set(cfg.shapes)) != len(cfg.shapes) or len(set(cfg.colours)) != len(cfg.colours):
        raise ValueError("WorldConfig.shapes/colours: remove the repeated entries")
    if not 1 <= cfg.min_objects <= cfg.max_objects <= cfg.grid * cfg.grid:
        raise ValueError(
            f"WorldConfig: need 1 <= min_objects ({cfg.min_objects}) <= max_objects ({cfg.max_objects})"
            f" <= grid*grid ({cfg.grid * cfg.grid})"
        )
    if cfg.max_objects >= len(NUMBER_WORDS):
        raise ValueError(f"WorldConfig.max_objects: at most {len(NUMBER_WORDS) - 1}")
    lo, hi = cfg.object_size
    if not 0.1 <= lo <= hi <= 1.0:
        raise ValueError(f"WorldConfig.object_size: need 0.1 <= low <= high <= 1, got {cfg.object_size}")
    if cfg.video_clips < 0:
        raise ValueError(f"WorldConfig.video_clips: must be >= 0, got {cfg.video_clips}")
    if cfg.image_size < 16 or cfg.supersample < 1:
        raise ValueError("WorldConfig: image_size must be >= 16 and supersample >= 1")
    if not 0.0 <= cfg.cooccurrence_strength <= 1.0:
        raise ValueError("WorldConfig.cooccurrence_strength: must lie in [0, 1]")
    known = set(cfg.objects)
    for name in [*cfg.cooccurrence, *cfg.cooccurrence.values(), *cfg.heldout_combinations]:
        if name not in known:
            raise ValueError(
                f"WorldConfig: {name!r} (in cooccurrence or heldout_combinations) is not an object of "
                f"this world; objects are '<colour> <shape>' from the configured colours and shapes"
            )
    seen = [n for pair in cfg.cooccurrence.items() for n in pair]
    if len(seen) != len(set(seen)):
        raise ValueError("WorldConfig.cooccurrence: an object may belong to at most one pair")
    clash = set(seen) & set(cfg.heldout_combinations)
    if clash:
        raise ValueError(f"WorldConfig: {sorted(clash)} are both held out and in a co-occurrence pair")
    if len(set(cfg.heldout_combinations)) >= len(known):
        raise ValueError("WorldConfig.heldout_combinations: leave some objects for training")
    bad = [t for t in cfg.tasks if t not in ("describe", "existence", "counting", "colour")]
    if bad:
        raise ValueError(f"WorldConfig.tasks: unknown task(s) {bad}; choose from describe, existence, counting, colour")
    bad = [s for s in cfg.pope_splits if s not in SPLITS]
    if bad:
        raise ValueError(f"WorldConfig.pope_splits: unknown split(s) {bad}; choose from {list(SPLITS)}")


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene; positions and sizes are fractions of the image side."""

    shape: str
    colour: str
    size: float
    """Side of the object's bounding box / image side."""
    x: float
    """Centre, from the left edge, / image side."""
    y: float
    """Centre, from the top edge, / image side."""

    @property
    def name(self) -> str:
        return object_name(self.colour, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y}


@dataclass(frozen=True)
class Scene:
    """A scene and its full ground truth."""

    id: str
    """``"<split>-<index>"``, unique across all splits of a world."""
    split: str
    objects: tuple[WorldObject, ...]

    def counts(self) -> dict[str, int]:
        """Number of objects per object name."""
        out: dict[str, int] = {}
        for o in self.objects:
            out[o.name] = out.get(o.name, 0) + 1
        return out

    def shape_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.objects:
            out[o.shape] = out.get(o.shape, 0) + 1
        return out

    def object_names(self, cfg: WorldConfig) -> list[str]:
        """Distinct object names present, in canonical order."""
        present = self.counts()
        return [n for n in cfg.objects if n in present]

    def caption(self, cfg: WorldConfig) -> str:
        """The canonical description of the scene."""
        counts = self.counts()
        groups = [(counts[n], *split_object_name(n)) for n in self.object_names(cfg)]
        return caption_from_counts(groups)


def scene_rng(cfg: WorldConfig, split: str, index: int) -> random.Random:
    """The random stream of one scene (string seeds hash with SHA-512: stable across runs)."""
    return random.Random(f"vlalign-shapes/{cfg.seed}/{split}/{index}")


def allowed_objects(cfg: WorldConfig, split: str) -> list[str]:
    """Objects a scene of ``split`` may contain (held-out ones only in the compositional split)."""
    if split == "compositional":
        return cfg.objects
    held = set(cfg.heldout_combinations)
    return [n for n in cfg.objects if n not in held]


def generate_scene(cfg: WorldConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a pure function of the config, the split and the index."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    rng = scene_rng(cfg, split, index)
    allowed = allowed_objects(cfg, split)
    allowed_set = set(allowed)
    partners = cfg.partners
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    names: list[str] = []
    if split == "compositional":
        names.append(rng.choice(cfg.heldout_combinations))
    while len(names) < n:
        name = rng.choice(allowed)
        names.append(name)
        partner = partners.get(name)
        if (
            partner is not None
            and len(names) < n
            and partner in allowed_set
            and partner not in names
            and rng.random() < cfg.cooccurrence_strength
        ):
            names.append(partner)
    cells = rng.sample(range(cfg.grid * cfg.grid), n)
    objects = [_place(cfg, rng, name, cell) for name, cell in zip(names, cells)]
    return Scene(id=f"{split}-{index:06d}", split=split, objects=tuple(objects))


def _place(cfg: WorldConfig, rng: random.Random, name: str, cell: int) -> WorldObject:
    colour, shape = split_object_name(name)
    cell_side = 1.0 / cfg.grid
    size = rng.uniform(*cfg.object_size) * cell_side
    slack = (cell_side - size) / 2
    row, col = divmod(cell, cfg.grid)
    x = (col + 0.5) * cell_side + rng.uniform(-slack, slack)
    y = (row + 0.5) * cell_side + rng.uniform(-slack, slack)
    return WorldObject(shape, colour, round(size, 5), round(x, 5), round(y, 5))


def generate_split(cfg: WorldConfig, split: str, n: int | None = None) -> list[Scene]:
    """All scenes of ``split`` (``n`` defaults to the config's count for that split)."""
    if n is None:
        n = {
            "train": cfg.n_train,
            "validation": cfg.n_validation,
            "test": cfg.n_test,
            "compositional": cfg.n_compositional,
        }[split]
    return [generate_scene(cfg, split, i) for i in range(n)]


def scene_from_objects(scene_id: str, split: str, objects: list[dict[str, Any]]) -> Scene:
    """Rebuild a :class:`Scene` from the ``scene_objects`` metadata of a written row."""
    try:
        objs = tuple(WorldObject(o["shape"], o["colour"], o["size"], o["x"], o["y"]) for o in objects)
    except (KeyError, TypeError) as exc:
        raise DataError(f"scene {scene_id}: bad object annotation ({exc}); expected shape, colour, size, x, y") from exc
    return Scene(scene_id, split, objs)


# ----------------------------------------------------------------------------- vocabulary and tokenizer corpus


def object_vocabulary(cfg: WorldConfig) -> dict[str, list[str]]:
    """Every object name with the phrases that mean it (singular, plural, synonyms), for CHAIR."""
    vocab: dict[str, list[str]] = {}
    for shape in cfg.shapes:
        nouns = [shape, SHAPE_PLURALS[shape]]
        for syn in SHAPE_SYNONYMS[shape]:
            nouns += [syn, plural(syn)]
        for colour in cfg.colours:
            adjectives = [colour, *COLOUR_SYNONYMS.get(colour, ())]
            vocab[object_name(colour, shape)] = [f"{a} {n}" for a in adjectives for n in nouns]
    return vocab


def tokenizer_corpus(cfg: WorldConfig | None = None) -> list[str]:
    """Sentences covering every prompt, answer and caption phrasing, shape, colour and number.

    With ``cfg=None`` it covers every shape and colour the renderer knows (so one tokenizer fits
    any world); synonyms, digits 0-20, ``colour``/``color`` and POPE-style questions are included.
    """
    shapes = list(cfg.shapes) if cfg else list(SHAPE_PLURALS)
    colours = list(cfg.colours) if cfg else list(COLOUR_RGB)
    lines: list[str] = [DESCRIBE_PROMPT, YES, NO, "yes", "no", "Yes.", "No."]
    for shape in shapes:
        lines += [counting_question(shape), colour_question(shape), f"What color is the {shape}?"]
        lines.append(f"Is there a {shape} in the image?")
        for colour in colours:
            name = object_name(colour, shape)
            lines += [existence_question(name), f"Is there {count_phrase(1, colour, shape)} in this image?"]
            lines += [caption_from_counts([(n, colour, shape)]) for n in range(1, 10)]
    for i, colour in enumerate(colours):
        lines += [colour, colour.capitalize(), f"The {shapes[i % len(shapes)]} is {colour}."]
        other = colours[(i + 1) % len(colours)]
        groups = [(1 + (i + k) % 3, c, shapes[(i + k) % len(shapes)]) for k, c in enumerate([colour, other, colour])]
        lines.append(caption_from_counts(groups))
    lines += [str(n) for n in range(21)] + list(NUMBER_WORDS)
    lines += [w.capitalize() for w in NUMBER_WORDS]
    for shape in shapes:
        for syn in SHAPE_SYNONYMS[shape]:
            lines.append(f"There is a {syn}, two {plural(syn)}.")
    for syns in COLOUR_SYNONYMS.values():
        lines += [f"It is {s}." for s in syns]
    lines.append("There is no red circle in the image. There are 3 shapes, and the answer is 2.")
    return lines
