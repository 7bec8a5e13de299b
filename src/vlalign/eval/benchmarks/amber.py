"""AMBER (Wang et al. 2023, github junyangwang0410/AMBER), scored as its ``inference.py`` scores it.

Files (the user downloads them; the two small word lists the metrics need are shipped in ``data/``):
``data/query/query_*.json`` (a JSON array of ``{"id", "image", "query"}``), ``data/annotations.json``
(a JSON array, entry ``id - 1`` for id ``id``: generative ids 1..1004 have ``truth`` and ``hallu``
object lists, the others a ``truth`` of ``"yes"``/``"no"`` and a ``type``), and the responses
(a JSON array of ``{"id", "response"}``).

**Discriminative** (existence = ``discriminative-hallucination``; attribute = ``-attribute-state``,
``-number``, ``-action``; relation = ``discriminative-relation`` and ``relation``). The response
must be exactly ``"Yes"`` or ``"No"`` (anything else is wrong either way). *No* is the positive
class: precision = right *No* / answered *No*, recall = right *No* / truth *no*. The script prints
percentages rounded to 0.1, its counts start at 0.001 (so nothing divides by zero) and F1 is
``2PR / (P + R + 0.0001)`` of the rounded P and R (``+ 0.001`` for existence);
:class:`AmberDiscriminative` holds those printed numbers and the counts.

**Generative**: nouns of the response (``nltk.word_tokenize``, ``nltk.pos_tag`` tags starting with
``NN``, ``WordNetLemmatizer().lemmatize``) that are in the vocabulary of ``relation.json`` (its keys
and their associated words). A noun in ``safe_words.txt`` is skipped (but counted in CHAIR's
denominator); a noun that is a truth object or associated with one covers the *first* truth object
it is listed under (associations before the objects themselves) and is no hallucination; a noun
that is a hallucination target or associated with one covers that target (Cog); any other noun is
a hallucination, unless spaCy's ``en_core_web_lg`` similarity to a truth word exceeds 0.8.

    CHAIR = hallucinated nouns / nouns      Cover = covered truth objects / truth objects
    Hal   = 100 - responses without hallucination / responses      Cog = covered targets / targets

Differences of the default extraction from the script: no POS tagger (every token is a candidate noun; a vocabulary word used as a verb or adjective
counts), lemmas from ``lemminflect`` (the shortest noun lemma, as WordNet's lemmatiser takes the
shortest; capitalised tokens stay as they are, as WordNet lemmatises no capitalised form), and no
spaCy similarity unless ``similar`` is given. Pass ``nouns=`` and ``similar=`` built on NLTK and
spaCy to reproduce the script exactly. Measured against WordNet 3.0's lemmatiser (NLTK) on the
tokens of the 20,000 LVLM captions of POPE's ``caption_data``: no caption's noun list differs
(the five forms of ``_WORDNET_FORMS`` came from that comparison); on the 881 plural forms of
AMBER's vocabulary words, 31 differ, mostly words WordNet does not know and leaves plural
(``bedsheets``, ``cooktops``, ``sanitizers``), which are found here and not by the script.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from vlalign.eval.benchmarks._io import BenchmarkFileError, read_json_records, require
from vlalign.eval.benchmarks._treebank import word_tokenize

GENERATIVE = "generative"
DIMENSIONS = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
    "discriminative-relation": "relation",
    "relation": "relation",
}
GROUPS = {
    "discriminative": ("existence", "state", "number", "action", "relation"),
    "existence": ("existence",),
    "attribute": ("state", "number", "action"),
    "state": ("state",),
    "number": ("number",),
    "action": ("action",),
    "relation": ("relation",),
}


@dataclass(frozen=True)
class AmberQuery:
    """One query of a ``query_*.json`` file; ``line`` is where it starts in ``source``."""

    id: int
    image: str
    query: str
    source: str = ""
    line: int = 0


@dataclass(frozen=True)
class AmberAnnotation:
    """One entry of ``annotations.json``: generative (``truth``/``hallu`` lists) or a yes/no question."""

    id: int
    type: str
    truth: tuple[str, ...] | str
    hallu: tuple[str, ...] = ()


def read_amber_queries(path: str | Path) -> list[AmberQuery]:
    """The queries of a ``query_*.json`` file, checked (file, line, column named on error)."""
    return [
        AmberQuery(require(r, "id", int), require(r, "image", str), require(r, "query", str), r.path, r.line)
        for r in read_json_records(path)
    ]


def read_amber_annotations(path: str | Path) -> dict[int, AmberAnnotation]:
    """``annotations.json`` by id; entry ``k`` must have id ``k + 1`` (the script looks ids up by position)."""
    out: dict[int, AmberAnnotation] = {}
    for index, row in enumerate(read_json_records(path)):
        ident = require(row, "id", int)
        if ident != index + 1:
            raise BenchmarkFileError(
                row.path, f"entry {index} has id {ident}, AMBER expects {index + 1}", line=row.line, column="id"
            )
        kind = require(row, "type", str, choices=(GENERATIVE, *DIMENSIONS))
        if kind == GENERATIVE:
            truth = tuple(_word_list(row, "truth"))
            out[ident] = AmberAnnotation(ident, kind, truth, tuple(_word_list(row, "hallu")))
        else:
            out[ident] = AmberAnnotation(ident, kind, require(row, "truth", str, choices=("yes", "no")))
    return out


def _word_list(row, name: str) -> list[str]:
    words = require(row, name, list)
    if not all(isinstance(w, str) for w in words):
        raise BenchmarkFileError(row.path, "expected a list of strings", line=row.line, column=name)
    return words


def read_amber_responses(path: str | Path) -> dict[int, str]:
    """``{"id", "response"}`` records by id (in file order); a repeated id is an error."""
    out: dict[int, str] = {}
    for row in read_json_records(path):
        ident = require(row, "id", int)
        if ident in out:
            raise BenchmarkFileError(row.path, f"id {ident} answered twice", line=row.line, column="id")
        out[ident] = require(row, "response", str)
    return out


@dataclass(frozen=True)
class AmberDiscriminative:
    """One dimension as the script prints it (percent, 0.1) and its counts."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    questions: int
    correct: int
    answered_no: int
    answered_no_right: int
    truth_no: int


def _printed(c: list[int], start: float, eps: float) -> AmberDiscriminative:
    """The script's numbers: each count it divides by starts at ``start`` (0.001 per counter summed)."""
    n, correct, ans_no, ans_no_right, truth_no = c
    p = round(ans_no_right / (ans_no + start) * 100, 1)
    r = round(ans_no_right / (truth_no + start) * 100, 1)
    f1 = round(2 * (p / 100) * (r / 100) / ((p / 100) + (r / 100) + eps) * 100, 1)
    return AmberDiscriminative(
        round(correct / (n + start) * 100, 1), p, r, f1, n, correct, ans_no, ans_no_right, truth_no
    )


def amber_discriminative_metrics(
    annotations: Mapping[int, AmberAnnotation], responses: Mapping[int, str], reader: Callable[[str], str] | None = None
) -> dict[str, AmberDiscriminative]:
    """Discriminative metrics by group (``discriminative``, ``existence``, ``attribute``, ``state``, ``number``,
    ``action``, ``relation``) for the groups that have questions; generative ids are ignored.

    ``reader`` (optional) maps a response to ``"Yes"``/``"No"`` first; the script compares the raw text.
    """
    counts = {d: [0, 0, 0, 0, 0] for d in set(DIMENSIONS.values())}
    for ident, text in responses.items():
        if ident not in annotations:
            raise ValueError(f"response id {ident} is not in the annotations")
        ann = annotations[ident]
        if ann.type == GENERATIVE:
            continue
        answer = reader(text) if reader else text
        c = counts[DIMENSIONS[ann.type]]
        c[0] += 1
        c[1] += (ann.truth == "yes" and answer == "Yes") or (ann.truth == "no" and answer == "No")
        c[2] += answer == "No"
        c[3] += answer == "No" and ann.truth == "no"
        c[4] += ann.truth == "no"
    out = {}
    for group, members in GROUPS.items():
        summed = [sum(counts[m][k] for m in members) for k in range(5)]
        if summed[0]:
            start = 0.003 if group == "attribute" else 0.001  # the script sums three counters for attribute
            out[group] = _printed(summed, start, 0.001 if group == "existence" else 0.0001)
    return out


@lru_cache(maxsize=1)
def amber_vocabulary() -> tuple[dict[str, list[str]], frozenset[str], frozenset[str]]:
    """``relation.json`` (object -> associated words), the hallucination vocabulary, the global safe words."""
    base = resources.files("vlalign.eval.benchmarks").joinpath("data")
    association = json.loads(base.joinpath("amber_relation.json").read_text(encoding="utf-8"))
    vocabulary = frozenset(w for key, words in association.items() for w in (key, *words))
    safe = frozenset(line for line in base.joinpath("amber_safe_words.txt").read_text(encoding="utf-8").split("\n"))
    return association, vocabulary, safe


# Forms where WordNet's lemmatiser (WordNet 3.0 through NLTK) and lemminflect disagree, as WordNet
# has them: it keeps the shortest of several lemmas ("men" is a lemma of its own, "vas" is shorter
# than "vase", "sunglass" than "sunglasses"); "clothes" is a lemma; "streetlamp" is not in WordNet.
_WORDNET_FORMS = {
    "men": "men",
    "vases": "vas",
    "sunglasses": "sunglass",
    "clothes": "clothes",
    "streetlamps": "streetlamps",
}
# WordNet's own noun suffix rules (morphy), tried where lemminflect keeps a plural.
_PLURAL_ENDINGS = (("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("ies", "y"), ("s", ""))


@lru_cache(maxsize=65536)
def amber_lemma(token: str) -> str:
    """The noun lemma of a token as WordNet's lemmatiser gives it, approximated with ``lemminflect``.

    Capitalised tokens stay as they are (WordNet has no capitalised forms); the shortest of
    lemminflect's noun lemmas is taken (as WordNet takes the shortest); where lemminflect keeps a
    plural (``"pans"``, ``"frisbees"``) a regular singular that is in AMBER's vocabulary is taken.
    """
    if token != token.lower():
        return token
    if token in _WORDNET_FORMS:
        return _WORDNET_FORMS[token]
    from lemminflect import getAllLemmas

    lemmas = getAllLemmas(token, upos="NOUN").get("NOUN", ())
    lemma = min(lemmas, key=len) if lemmas else token
    if lemma == token:
        _, vocabulary, _ = amber_vocabulary()
        for ending, replacement in _PLURAL_ENDINGS:
            if token.endswith(ending) and token[: -len(ending)] + replacement in vocabulary:
                return token[: -len(ending)] + replacement
    return lemma


def amber_nouns(text: str) -> list[str]:
    """The candidate nouns of a response in AMBER's vocabulary (default extraction; see the module docstring)."""
    _, vocabulary, _ = amber_vocabulary()
    return [lemma for lemma in (amber_lemma(t) for t in word_tokenize(text)) if lemma in vocabulary]


@dataclass(frozen=True)
class AmberGenerative:
    """CHAIR, Cover, Hal and Cog as the script prints them (percent, 0.1), with their counts."""

    chair: float
    cover: float
    hal: float
    cog: float
    nouns: int
    hallucinated_nouns: int
    truth_objects: int
    covered_objects: int
    targets: int
    covered_targets: int
    responses: int
    responses_without_hallucination: int


def _mark(words: list[str], owners: list[int], n_direct: int, flags: list[int], j: int) -> None:
    """Set the cover flag of the object that ``words[j]`` stands for (an association marks its object)."""
    if j < len(words) - n_direct:
        flags[owners[j]] = 1
    else:
        flags[j - (len(words) - n_direct)] = 1


def _expand(objects: Sequence[str], association: Mapping[str, list[str]]) -> tuple[list[str], list[int]]:
    words, owners = [], []
    for index, obj in enumerate(objects):
        words += association[obj]
        owners += [index] * len(association[obj])
    return words + list(objects), owners


def _score_one(
    found: list[str], ann: AmberAnnotation, similar: Callable[[str, str], bool] | None
) -> tuple[int, list[int], list[int]]:
    association, _, global_safe = amber_vocabulary()
    safe_words, safe_owner = _expand(ann.truth, association)
    ha_words, ha_owner = _expand(ann.hallu, association)
    safe_flags, ha_flags = [0] * len(ann.truth), [0] * len(ann.hallu)
    hallucinated = 0
    for noun in found:
        if noun in global_safe:
            continue
        if noun in safe_words:
            _mark(safe_words, safe_owner, len(ann.truth), safe_flags, safe_words.index(noun))
            continue
        if noun in ha_words:
            _mark(ha_words, ha_owner, len(ann.hallu), ha_flags, ha_words.index(noun))
        if similar is not None:
            j = next((j for j, w in enumerate(ha_words) if similar(noun, w)), None)
            if j is not None:
                _mark(ha_words, ha_owner, len(ann.hallu), ha_flags, j)
            j = next((j for j, w in enumerate(safe_words) if similar(noun, w)), None)
            if j is not None:
                _mark(safe_words, safe_owner, len(ann.truth), safe_flags, j)
                continue
        hallucinated += 1
    return hallucinated, safe_flags, ha_flags


def amber_generative_metrics(
    annotations: Mapping[int, AmberAnnotation],
    responses: Mapping[int, str],
    *,
    nouns: Callable[[str], list[str]] = amber_nouns,
    similar: Callable[[str, str], bool] | None = None,
) -> AmberGenerative:
    """CHAIR, Cover, Hal, Cog of the generative responses (ids of type ``generative``; others ignored)."""
    association, vocabulary, _ = amber_vocabulary()
    t = dict.fromkeys(("nouns", "hal", "truth", "cov", "targets", "cog", "resp", "clean"), 0)
    for ident, text in responses.items():
        if ident not in annotations:
            raise ValueError(f"response id {ident} is not in the annotations")
        ann = annotations[ident]
        if ann.type != GENERATIVE:
            continue
        for obj in (*ann.truth, *ann.hallu):
            if obj not in association:
                raise ValueError(f"annotation {ident}: object {obj!r} is not a key of relation.json")
        found = [n for n in nouns(text) if n in vocabulary]
        hallucinated, safe_flags, ha_flags = _score_one(found, ann, similar)
        t["nouns"] += len(found)
        t["hal"] += hallucinated
        t["truth"] += len(safe_flags)
        t["cov"] += sum(safe_flags)
        t["targets"] += len(ha_flags)
        t["cog"] += sum(ha_flags)
        t["resp"] += 1
        t["clean"] += hallucinated == 0
    return AmberGenerative(
        chair=round(t["hal"] / (t["nouns"] + 0.001) * 100, 1),
        cover=round(t["cov"] / (t["truth"] + 0.001) * 100, 1),
        hal=round(100 - t["clean"] / (t["resp"] + 0.001) * 100, 1),
        cog=round(t["cog"] / (t["targets"] + 0.001) * 100, 1),
        nouns=t["nouns"],
        hallucinated_nouns=t["hal"],
        truth_objects=t["truth"],
        covered_objects=t["cov"],
        targets=t["targets"],
        covered_targets=t["cog"],
        responses=t["resp"],
        responses_without_hallucination=t["clean"],
    )
