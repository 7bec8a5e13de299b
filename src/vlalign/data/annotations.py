"""What a sample says about its image: its task, its object annotations, and the phrases of objects.

Pure text and metadata, no model and no torch; shared by the evaluation metrics
(:mod:`vlalign.eval.chair`), the rewards, and preference-pair construction
(:mod:`vlalign.data.pairs.inject`, :mod:`vlalign.data.pairs.rank`).

**Tasks** (:func:`task_of`): a sample's ``meta["task"]``; without one, a row with object
annotations and no answer is a description (``describe``), any other an exact-answer question.

**Object mentions** (:class:`ObjectVocabulary`): a vocabulary maps each object name to the phrases
that mean it (``"red circle"`` -> ``red circle, red circles, red disc, ...``), as CHAIR's synonym
list does for MS-COCO. A text's mentions are found by longest-phrase-first matching on whole
words, case-insensitively. A mention is *negated* when one of the two words before it (articles
and ``any`` skipped) is a negation (``no``, ``not``, ``without``, ``zero``, ``none``, ``nor``); the
word just before it, when it is a count (``a``, ``two``, ``3``, an English number word of
:data:`NUMBER_WORDS`), gives the mention's count.

**Annotations** (:func:`annotations_of`): the objects present (``meta["objects"]``) and, when the
data says them, their counts: ``meta["object_counts"]`` (``{name: count}``), or a column that a
registered *count reader* understands (:func:`register_count_reader`; the shapes world registers
its ``scene_objects`` when :mod:`vlalign.shapes` is imported).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlalign.data.schema import DataError

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
"""English number words by value (captions use them; counting answers use digits)."""


def plural(noun: str) -> str:
    """The plural of a regular English noun: ``box`` -> ``boxes``, ``bus`` -> ``buses``, ``disc`` -> ``discs``."""
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


# ----------------------------------------------------------------------------- tasks

DESCRIBE = "describe"
"""The task of a description (scored by CHAIR, not by answer accuracy)."""


def task_of(sample: Any) -> str:
    """The task of an evaluation sample (``meta["task"]``; ``"answer"`` when only an answer is given)."""
    meta = getattr(sample, "meta", {}) or {}
    task = meta.get("task")
    if task is None:
        return DESCRIBE if "answer" not in meta and "objects" in meta else "answer"
    return str(task)


# ----------------------------------------------------------------------------- object mentions

_WORD = re.compile(r"[a-z]+|\d+")
_NEGATIONS = frozenset({"no", "not", "without", "zero", "none", "nor", "never"})
_SKIPPED = frozenset({"a", "an", "the", "any", "single"})
_COUNTS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"a": 1, "an": 1, "single": 1, "no": 0, "zero": 0}


@dataclass(frozen=True)
class Mention:
    """One object phrase found in a text."""

    name: str
    """The object it names (a vocabulary key)."""
    phrase: str
    """The text as written."""
    start: int
    end: int
    negated: bool
    """Said to be absent (``"no red circle"``)."""
    count: int | None
    """The number said just before it (``a``/``an`` = 1), None if none."""


class ObjectVocabulary:
    """Object names and the phrases (synonyms, plurals) that mean them.

    ``ObjectVocabulary({"red circle": ["red circle", "red circles", "red disc"]})``; the name
    itself always counts as one of its phrases. A phrase may belong to one object only.
    """

    def __init__(self, phrases: Mapping[str, Sequence[str]]) -> None:
        if not phrases:
            raise DataError("the object vocabulary is empty; give at least one object with its phrases")
        self.names: list[str] = list(phrases)
        self._table: dict[tuple[str, ...], str] = {}
        for name, synonyms in phrases.items():
            for phrase in [name, *synonyms]:
                words = tuple(_WORD.findall(phrase.lower()))
                if not words:
                    continue
                owner = self._table.setdefault(words, name)
                if owner != name:
                    raise DataError(f"object vocabulary: the phrase {phrase!r} belongs to both {owner!r} and {name!r}")
        self._longest = max(len(k) for k in self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table.values()

    def find(self, text: str) -> list[Mention]:
        """Every mention in ``text``, in order (longest phrase wins where phrases overlap)."""
        tokens = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text.lower())]
        words = [t[0] for t in tokens]
        out: list[Mention] = []
        i = 0
        while i < len(tokens):
            for size in range(min(self._longest, len(tokens) - i), 0, -1):
                name = self._table.get(tuple(words[i : i + size]))
                if name is not None:
                    start, end = tokens[i][1], tokens[i + size - 1][2]
                    out.append(Mention(name, text[start:end], start, end, _negated(words, i), _count(words, i)))
                    i += size
                    break
            else:
                i += 1
        return out

    def mentioned(self, text: str) -> list[str]:
        """Object names affirmed in ``text``, one entry per mention (negated ones left out)."""
        return [m.name for m in self.find(text) if not m.negated]

    def to_dict(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in self.names}
        for words, name in self._table.items():
            out[name].append(" ".join(words))
        return out


def _negated(words: list[str], i: int) -> bool:
    seen = 0
    j = i - 1
    while j >= 0 and seen < 2:
        if words[j] in _NEGATIONS:
            return True
        if words[j] not in _SKIPPED:
            seen += 1
        j -= 1
    return False


def _count(words: list[str], i: int) -> int | None:
    if i == 0:
        return None
    word = words[i - 1]
    return int(word) if word.isdigit() else _COUNTS.get(word)


def load_vocabulary(source: str | Path | Mapping[str, Sequence[str]]) -> ObjectVocabulary:
    """A vocabulary from a mapping, a JSON file ``{name: [phrases]}``, or a folder or ``manifest.json``
    holding one under ``object_vocabulary`` (as a written shapes world does)."""
    if isinstance(source, Mapping):
        return ObjectVocabulary(source)
    path = Path(source)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"object vocabulary {path} not found; give a JSON file {{object: [phrases]}} or a shapes-world folder"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"object vocabulary {path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and "object_vocabulary" in data:
        data = data["object_vocabulary"]
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f"object vocabulary {path}: expected {{object name: [phrases, ...]}}")
    return ObjectVocabulary(data)


# ----------------------------------------------------------------------------- annotations

CountReader = Callable[[Any], "dict[str, int] | None"]
"""``reader(meta[column]) -> {object name: count}``, or None when the value is not in its format."""

_COUNT_READERS: dict[str, CountReader] = {}


def register_count_reader(column: str, reader: CountReader) -> None:
    """Read object counts from ``meta[column]`` with ``reader`` (after ``object_counts``, in
    registration order; registering a column again replaces its reader)."""
    _COUNT_READERS[column] = reader


@dataclass(frozen=True)
class Annotations:
    """What is in an image: object names, and their counts when known."""

    objects: frozenset[str]
    counts: Mapping[str, int] | None = None


def annotations_of(sample: Any, *, required_by: str | None = None) -> Annotations | None:
    """The object annotations of a sample, from its meta.

    ``meta["objects"]`` (list of names present) is required; counts come from
    ``meta["object_counts"]`` (``{name: count}``) or a registered count reader's column (in
    shapes-world rows, ``meta["scene_objects"]``). Returns None without ``objects``, or raises
    :class:`DataError` naming the sample and ``required_by`` when that is given.
    """
    meta = getattr(sample, "meta", None) or {}
    objects = meta.get("objects")
    if objects is None:
        if required_by is None:
            return None
        raise DataError(
            f"sample {getattr(sample, 'id', '?')!r} has no object annotations (an 'objects' column listing the "
            f"objects in the image), which {required_by} needs; use a dataset with object annotations "
            "(the shapes world has them) or another method"
        )
    if not isinstance(objects, (list, tuple)) or not all(isinstance(o, str) for o in objects):
        raise DataError(f"sample {getattr(sample, 'id', '?')!r}: 'objects' must be a list of object names")
    counts: dict[str, int] | None = None
    if isinstance(meta.get("object_counts"), Mapping):
        counts = {str(k): int(v) for k, v in meta["object_counts"].items()}
    else:
        for column, reader in _COUNT_READERS.items():
            counts = reader(meta[column]) if column in meta else None
            if counts is not None:
                break
    return Annotations(frozenset(objects), counts)
