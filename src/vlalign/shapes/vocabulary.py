"""The shapes world's vocabulary: its shapes and colours, the phrasing of every prompt and answer,
the caption parser, and finding a dataset's object vocabulary.

An *object* in the sense of POPE and CHAIR is a colour-shape combination, its *name* is
``"<colour> <shape>"`` (``"red circle"``). Canonical phrasing (what the datasets contain, and what
evaluation parses):

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
then colours in ``WorldConfig.colours`` order); one object is ``a``/``an``, more are English
number words (``two`` ... ``nine``, :data:`vlalign.data.annotations.NUMBER_WORDS`) with the plural
noun; groups are joined by ``", "`` and a final ``" and "``.

The shapes world writes a ``manifest.json`` beside its datasets whose ``object_vocabulary`` maps
each object to its phrases (:func:`vlalign.data.annotations.load_vocabulary` reads it).
Hallucination injection and claim-level scoring need such a vocabulary: ``vlalign pairs`` and
online DPO take an explicit one (``--vocabulary=FILE.json``) or fall back on the manifest of the
data's folder (:func:`find_vocabulary`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlalign.data.annotations import NUMBER_WORDS, ObjectVocabulary, load_vocabulary, plural

# ----------------------------------------------------------------------------- words

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
"""Other nouns that name a shape (singular; plurals are regular), used by the caption parser."""

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

DESCRIBE_PROMPT = "Describe the image."
YES, NO = "Yes", "No"


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
    for shape, plural_form in SHAPE_PLURALS.items():
        table[shape] = table[plural_form] = shape
        for syn in SHAPE_SYNONYMS[shape]:
            table[syn] = shape
            table[plural(syn)] = shape
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


# ----------------------------------------------------------------------------- object vocabularies


def find_vocabulary(spec: str, data_path: str) -> ObjectVocabulary | None:
    """The vocabulary named by ``spec``, or the manifest beside ``data_path``, or None."""
    if spec:
        return load_vocabulary(spec)
    manifest = Path(data_path).parent / "manifest.json"
    return load_vocabulary(manifest) if manifest.is_file() else None
