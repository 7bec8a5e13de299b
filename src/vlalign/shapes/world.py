"""The shapes world: vlalign's embedded default data, with exact ground truth.

A *scene* is 1..K coloured shapes ("objects") placed on a grid, generated deterministically from a
seed, rendered with PIL (:mod:`vlalign.shapes.render`) and turned into question/answer rows
(:mod:`vlalign.shapes.tasks`). This module holds the world's configuration, its vocabulary,
the canonical phrasing of every prompt and answer, the caption parser that evaluation uses, and
scene generation.

An *object* in the sense of POPE and CHAIR is a colour-shape combination, its *name* is
``"<colour> <shape>"`` (``"red circle"``).

Canonical phrasing (what the datasets contain, and what evaluation parses):

==============  =======================================  =============================================
task            prompt text                              completion
==============  =======================================  =============================================
``describe``    ``Describe the image.``                  ``The image shows a red circle, two blue
                                                         squares and a green star.``
``existence``   ``Is there a red circle in the image?``  ``Yes`` or ``No``
``counting``    ``How many squares are there?``          a digit: ``2`` (``0`` for an absent shape)
``colour``      ``What colour is the triangle?``         a colour word: ``red`` (asked only when the
                                                         scene has exactly one triangle)
==============  =======================================  =============================================

In captions the object groups come in canonical order (shapes in ``WorldConfig.shapes`` order,
then colours in ``WorldConfig.colours`` order); one object is ``a``/``an``, more are number words
(``two`` ... ``nine``) with the plural noun; groups are joined by ``", "`` and a final ``" and "``.

Co-occurrence bias: ``WorldConfig.cooccurrence`` maps an object to a partner object; whenever an
object of a pair is placed, its partner is added with probability ``cooccurrence_strength`` (if
there is room and the partner is not already there). A model fine-tuned on such data learns the
language prior "red circle -> blue square" and hallucinates the partner where it is absent.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from vlalign.data.schema import DataError

# ----------------------------------------------------------------------------- vocabulary

SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "cross": "crosses",
    "hexagon": "hexagons",
    "heart": "hearts",
}
"""Every shape the renderer can draw, with its plural."""

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "disk", "dot", "ball"),
    "square": ("box", "block"),
    "triangle": ("pyramid",),
    "star": ("pentagram",),
    "diamond": ("rhombus", "lozenge"),
    "cross": ("plus",),
    "hexagon": (),
    "heart": (),
}
"""Other nouns that name a shape (singular; plurals add ``s``/``es``), used by the caption parser."""

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 180),
    "orange": (245, 130, 0),
    "pink": (250, 120, 190),
    "cyan": (0, 190, 210),
    "brown": (120, 70, 20),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
"""Every colour the renderer can paint (on a light background), as RGB."""

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "purple": ("violet",),
    "gray": ("grey",),
    "cyan": ("turquoise",),
}
"""Other adjectives that name a colour, used by the caption parser."""

NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
)
"""Number words by value (captions use them; counting answers use digits)."""

DESCRIBE_PROMPT = "Describe the image."
SPLITS: tuple[str, ...] = ("train", "validation", "test", "compositional")
YES, NO = "Yes", "No"


# ----------------------------------------------------------------------------- config


@dataclass
class WorldConfig:
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
scenes.

Why: the demo model learns its vision tower from scratch in minutes on a CPU. With the earlier
``small`` model (8 px patches, 36 image tokens; the demo's SFT, 900 steps, 2 CPU cores):

- The full default world (six shapes, up to five objects; 100 questions per task): colour
  0.62, existence 0.82, CHAIR_i 0.58. Colour accuracy fell with the number of objects: 1.00 with
  one, 0.70 with two, 0.47 with five. The wrong answers named the colour of another object in
  the scene: the model saw colours but mixed up shapes.
- This world (300 questions per task): colour 0.82, existence 0.86, counting 0.68, CHAIR_i 0.41.
- Halving the objects alone (six shapes, at most three) gave colour 0.77.

The present ``small`` (32 px patches, one grid cell each; :data:`vlalign.models.tiny.SIZES`)
reaches colour 0.93-0.95, existence 0.90-0.91 and CHAIR_i 0.04 on this world with the same SFT."""


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


# ----------------------------------------------------------------------------- phrasing


def object_name(colour: str, shape: str) -> str:
    """``"red circle"``: the name of an object in POPE, CHAIR and co-occurrence settings."""
    return f"{colour} {shape}"


def split_object_name(name: str) -> tuple[str, str]:
    """``"red circle"`` -> ``("red", "circle")``."""
    colour, _, shape = name.partition(" ")
    return colour, shape


def count_phrase(n: int, colour: str, shape: str) -> str:
    """``"a red circle"``, ``"an orange star"``, ``"two blue squares"``."""
    if n == 1:
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {shape}"
    return f"{NUMBER_WORDS[n]} {colour} {SHAPE_PLURALS[shape]}"


def join_phrases(parts: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_from_counts(groups: list[tuple[int, str, str]]) -> str:
    """Canonical caption from ``(count, colour, shape)`` groups, already in canonical order."""
    return "The image shows " + join_phrases([count_phrase(*g) for g in groups]) + "."


def existence_question(name: str) -> str:
    """``"Is there a red circle in the image?"`` (also the POPE question)."""
    colour, shape = split_object_name(name)
    return f"Is there {count_phrase(1, colour, shape)} in the image?"


def counting_question(shape: str) -> str:
    """``"How many squares are there?"``"""
    return f"How many {SHAPE_PLURALS[shape]} are there?"


def colour_question(shape: str) -> str:
    """``"What colour is the triangle?"``"""
    return f"What colour is the {shape}?"


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ObjectMention:
    """One object phrase found in a text: ``"two red circles"`` -> (circle, red, 2)."""

    shape: str
    colour: str | None
    """None when the text names the shape without a colour."""
    count: int | None
    """The number said before it (``a``/``an``/``one`` = 1, ``no`` = 0), None if none."""
    start: int
    """Character offset of the phrase in the text."""
    end: int

    @property
    def name(self) -> str | None:
        """The object name (``"red circle"``), or None without a colour."""
        return object_name(self.colour, self.shape) if self.colour else None


def _noun_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for shape, plural in SHAPE_PLURALS.items():
        table[shape] = table[plural] = shape
        for syn in SHAPE_SYNONYMS[shape]:
            table[syn] = shape
            table[syn + ("es" if syn.endswith(("s", "x")) else "s")] = shape
    return table


_NOUNS = _noun_table()
_ADJECTIVES = {c: c for c in COLOUR_RGB} | {s: c for c, syns in COLOUR_SYNONYMS.items() for s in syns}
_COUNTS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"a": 1, "an": 1, "no": 0, "single": 1}
_WORD = re.compile(r"[a-z]+|\d+")


def parse_objects(text: str) -> list[ObjectMention]:
    """Every shape mentioned in ``text``, with the colour and count said just before it.

    Recognises plurals and the synonyms in :data:`SHAPE_SYNONYMS` / :data:`COLOUR_SYNONYMS`
    (``"two violet discs"`` -> circle, purple, 2), digits as counts, case-insensitively.
    A colour must directly precede its noun; a count directly precedes the colour (or the noun).
    """
    tokens = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text.lower())]
    mentions: list[ObjectMention] = []
    for i, (tok, _start, end) in enumerate(tokens):
        shape = _NOUNS.get(tok)
        if shape is None:
            continue
        j = i - 1
        colour = _ADJECTIVES.get(tokens[j][0]) if j >= 0 else None
        if colour is not None:
            j -= 1
        count = None
        if j >= 0:
            word = tokens[j][0]
            count = int(word) if word.isdigit() else _COUNTS.get(word)
        first = j if count is not None else (j + 1)
        mentions.append(ObjectMention(shape, colour, count, tokens[first][1], end))
    return mentions


def mentioned_objects(text: str) -> list[str]:
    """Distinct object names (``"red circle"``) affirmed in ``text``, in order of first mention.

    Mentions without a colour, and negated ones (``"no red circle"``), are left out.
    """
    out: list[str] = []
    for m in parse_objects(text):
        if m.name is not None and m.count != 0 and m.name not in out:
            out.append(m.name)
    return out


def object_vocabulary(cfg: WorldConfig) -> dict[str, list[str]]:
    """Every object name with the phrases that mean it (singular, plural, synonyms), for CHAIR."""
    vocab: dict[str, list[str]] = {}
    for shape in cfg.shapes:
        nouns = [shape, SHAPE_PLURALS[shape]]
        for syn in SHAPE_SYNONYMS[shape]:
            nouns += [syn, syn + ("es" if syn.endswith(("s", "x")) else "s")]
        for colour in cfg.colours:
            adjectives = [colour, *COLOUR_SYNONYMS.get(colour, ())]
            vocab[object_name(colour, shape)] = [f"{a} {n}" for a in adjectives for n in nouns]
    return vocab


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


# ----------------------------------------------------------------------------- tokenizer corpus


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
            lines.append(f"There is a {syn}, two {syn}{'es' if syn.endswith(('s', 'x')) else 's'}.")
    for syns in COLOUR_SYNONYMS.values():
        lines += [f"It is {s}." for s in syns]
    lines.append("There is no red circle in the image. There are 3 shapes, and the answer is 2.")
    return lines


def write_world(cfg: WorldConfig, out_dir: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Render and write every split of the world; see :func:`vlalign.shapes.tasks.write_world`."""
    from vlalign.shapes.tasks import write_world as _write  # world_tasks builds on this module

    return _write(cfg, out_dir, overwrite=overwrite)
