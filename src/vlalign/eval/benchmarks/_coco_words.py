"""Finding MSCOCO objects in a caption, as CHAIR's ``caption_to_words`` does (``official``) or fixed (``clean``).

The official extraction (``LisaAnne/Hallucination``, ``utils/chair.py``, ``CHAIR.caption_to_words``):

1. ``nltk.word_tokenize(caption.lower())``, then ``pattern.en.singularize`` on every token;
2. left to right, a pair of consecutive tokens found in the double-word table is replaced by its
   target (``"hot dog"`` -> ``"hot dog"``, ``"baby cat"`` / ``"adult cat"`` -> ``"cat"`` for the
   animal words, ``"passenger jet"`` -> ``"jet"``, ``"bow tie"`` -> ``"tie"``, ``"toilet seat"`` ->
   ``"toilet"``, ``"wine glas"`` -> ``"wine glass"``; ``"home plate"`` and ``"train track"`` stay
   one token that is no object), and the pair is skipped;
3. if ``"toilet"`` and ``"seat"`` are both there, every ``"seat"`` is dropped;
4. the tokens that are synonyms (``data/coco_synonyms.txt``, each line ``strip()``-ed and split on
   ``", "``) are the mentions; each maps to its line's first entry, the object.

The quirks that follow: ``"bus"`` -> ``"bu"`` and ``"ties"`` -> ``"ty"`` are no synonym (but
``"buses"`` and ``"tie"`` are); ``" motor bike"`` and ``" cheesecake"`` keep a leading space and
``"iPhone"`` a capital, so they never match (``"motor bike"`` is then swallowed as a pair, and
neither it nor ``"bike"`` counts); ``"stove top oven"`` has three words and never matches;
``"tennis"`` -> ``"tenni"`` so ``"tennis racket"`` is found through ``"racket"`` alone; a
negated mention (``"there is no dog"``) counts as a mention.

The ``clean`` extraction differs in exactly these points:

- synonyms are stripped and lowercased (``"motor bike"``, ``"cheesecake"``, ``"iphone"`` match);
- a token is singularised only towards the vocabulary: kept if it is a vocabulary word, else the
  first of its irregular singular, ``-ies`` -> ``-y`` / ``-ie``, ``-ves`` -> ``-f`` / ``-fe``,
  ``-es`` -> ``""``, ``-s`` -> ``""`` that is one (``"bus"``, ``"ties"`` -> ``"tie"``, ``"glasses"``
  -> ``"glass"``, ``"canoes"`` -> ``"canoe"``, ``"doggies"`` -> ``"doggie"``);
- names of up to three words match, longest first (``"stove top oven"``);
- a mention preceded, within three tokens and without a clause break (punctuation, ``and``,
  ``but``, ``while``, ``which``, ``that``, ``who``), by ``no``, ``not``, ``n't``, ``without``, ``nor``
  or ``neither`` is not a mention (``"there is no dog"``, ``"a table without chairs"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from vlalign.eval.benchmarks._pattern_singular import pattern_singularize
from vlalign.eval.benchmarks._treebank import word_tokenize

MODES = ("official", "clean")

_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)  # fmt: skip
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLES = ("jet", "train")
_NEGATIONS = frozenset({"no", "not", "n't", "without", "nor", "neither"})
_CLAUSE_BREAKS = frozenset({",", ".", ";", ":", "!", "?", "and", "but", "while", "which", "that", "who"})
_CLEAN_IRREGULAR = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse", "geese": "goose",
    "oxen": "ox", "knives": "knife", "calves": "calf", "wolves": "wolf", "leaves": "leaf", "shelves": "shelf",
    "policemen": "policeman", "gentlemen": "gentleman", "servicemen": "serviceman", "grandchildren": "grandchild",
}  # fmt: skip
_SUFFIXES = (("ies", "y"), ("ies", "ie"), ("ves", "f"), ("ves", "fe"), ("es", ""), ("s", ""))


def synonym_lines() -> list[str]:
    """The lines of CHAIR's ``synonyms.txt`` as published (shipped as ``data/coco_synonyms.txt``)."""
    text = resources.files("vlalign.eval.benchmarks").joinpath("data/coco_synonyms.txt").read_text(encoding="utf-8")
    return text.splitlines()


def _double_word_table() -> dict[str, str]:
    table = {w: w for w in _DOUBLE_WORDS}
    for animal in _ANIMALS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in _VEHICLES:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"
    return table


@dataclass(frozen=True)
class Mention:
    """One object mention: the word(s) as extracted, the COCO object it names, its token position."""

    word: str
    object: str
    position: int


class CocoWords:
    """The synonym tables and the extraction of one mode (``official`` or ``clean``)."""

    def __init__(self, mode: str = "official"):
        if mode not in MODES:
            raise ValueError(f"unknown CHAIR mode {mode!r}: one of {MODES}")
        self.mode = mode
        self.inverse: dict[str, str] = {}  # synonym -> object (a later line wins, as in the script)
        for line in synonym_lines():
            if not line.strip():
                continue
            entries = line.strip().split(", ")
            if mode == "clean":
                entries = [e.strip().lower() for e in entries]
            for entry in entries:
                self.inverse[entry] = entries[0]
        self.objects = tuple(dict.fromkeys(self.inverse.values()))
        self.doubles = _double_word_table()
        self.vocabulary_words = frozenset(w for name in (*self.inverse, *self.doubles) for w in name.split())

    def object_of(self, name: str) -> str | None:
        """The object a synonym (or COCO category name) names, or None."""
        return self.inverse.get(name if self.mode == "official" else name.strip().lower())

    def extract(self, caption: str) -> list[Mention]:
        """The object mentions of ``caption`` in this mode (rules in the module docstring)."""
        tokens = word_tokenize(caption.lower())
        if self.mode == "official":
            words = [_pattern_singular_cached(t) for t in tokens]
            merged = self._merge(words, max_n=2)
        else:
            words = [self._clean_singular(t) for t in tokens]
            merged = self._merge(words, max_n=3)
        names = [name for name, _ in merged]
        if "toilet" in names and "seat" in names:
            merged = [(name, pos) for name, pos in merged if name != "seat"]
        mentions = []
        for index, (name, position) in enumerate(merged):
            if name not in self.inverse:
                continue
            if self.mode == "clean" and _negated([n for n, _ in merged[max(0, index - 3) : index]]):
                continue
            mentions.append(Mention(name, self.inverse[name], position))
        return mentions

    def _merge(self, words: list[str], *, max_n: int) -> list[tuple[str, int]]:
        """Left to right, replace the longest run of 2..max_n words that is a multi-word name by its target."""
        out: list[tuple[str, int]] = []
        i = 0
        while i < len(words):
            for n in range(max_n, 1, -1):
                if i + n > len(words):
                    continue
                phrase = " ".join(words[i : i + n])
                target = self.doubles.get(phrase)
                if target is None and self.mode == "clean" and phrase in self.inverse:
                    target = phrase
                if target is not None:
                    out.append((target, i))
                    i += n
                    break
            else:
                out.append((words[i], i))
                i += 1
        return out

    def _clean_singular(self, token: str) -> str:
        if token in self.vocabulary_words:
            return token
        if token in _CLEAN_IRREGULAR:
            return _CLEAN_IRREGULAR[token]
        for suffix, replacement in _SUFFIXES:
            if token.endswith(suffix) and len(token) > len(suffix) + 1:
                candidate = token[: -len(suffix)] + replacement
                if candidate in self.vocabulary_words:
                    return candidate
        return token


def _negated(previous: list[str]) -> bool:
    for word in reversed(previous):
        if word in _CLAUSE_BREAKS:
            return False
        if word in _NEGATIONS:
            return True
    return False


@lru_cache(maxsize=65536)
def _pattern_singular_cached(token: str) -> str:
    return pattern_singularize(token)
