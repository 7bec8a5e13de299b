"""Verifiable reward functions: small pure functions ``(completion, sample) -> float``.

Each function reads the model's completion (plain text) and the ground truth carried in
``sample.meta`` (the dataset's extra columns, see :mod:`vlalign.data.schema`), and returns a
float. Options are keyword-only arguments (a config passes them, see
:mod:`vlalign.rewards.combine`). ``REWARD_FUNCTIONS`` at the bottom maps config names to functions.

The answer of a completion (:func:`extract_answer`) is the content of its single
``<answer>...</answer>`` block when the completion has answer tags, otherwise the completion with
its ``<think>...</think>`` blocks removed. Guards against reward hacking (a substring-match reward
once paid full marks for an empty answer):

* an empty answer, or one that is only tags, whitespace or punctuation, never earns an accuracy
  reward; nor does a completion with two ``<answer>`` blocks or an unclosed tag;
* several answers in one (``"3 or 4"``, ``"red or blue"``, ``"yes and no"``, two boxes) never earn
  it: count, colour, yes/no, score and box rewards need exactly one distinct value in the answer;
* text outside the ``<answer>`` tags is ignored when the tags are there (``"<answer></answer> 3"``
  earns nothing).

Which meta field each function reads (a missing one is a :class:`~vlalign.data.schema.DataError`
naming the field, the function and the sample id):

==================  ============================================================================
function            meta fields
==================  ============================================================================
exact_match         ``answer`` (the reference answer text)
answer_tag          ``answer``
format              none
count_match         ``answer`` (an integer count, e.g. ``"2"``)
colour_match        ``answer`` (one colour word, e.g. ``"red"``)
yes_no_match        ``answer`` (``"Yes"`` or ``"No"``)
box_iou             ``box`` (``[x1, y1, x2, y2]``, same units as the completion's box)
threshold_score     ``answer`` (a number, e.g. a mean opinion score)
overlong_penalty    none
==================  ============================================================================

The shapes world registers ``object_f1`` (reads ``objects``) and ``shapes_answer`` (reads
``task``, then what the task's function reads) into :data:`REWARD_FUNCTIONS`, and its colour words
into :data:`COLOUR_WORDS`, when :mod:`vlalign.shapes` is imported (:mod:`vlalign.shapes.rewards`).

Answer normalisation (:func:`normalize_answer`) is written here: when this module was written the
evaluation package had no answer normaliser to reuse.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import torch

from vlalign.data.schema import PromptSample, data_error
from vlalign.losses.advantages import overlong_reward_penalty

RewardFn = Callable[..., float]

# ----------------------------------------------------------------------------- meta access


def sample_id(sample: Any) -> str:
    """The id of a sample for messages (``"<no id>"`` if it has none)."""
    return str(getattr(sample, "id", "<no id>"))


def require_meta(sample: Any, field: str, reward: str, holds: str) -> Any:
    """``sample.meta[field]``, or a DataError naming the field, the reward and the sample."""
    meta = getattr(sample, "meta", None)
    if not isinstance(meta, Mapping) or meta.get(field) is None:
        raise data_error(
            "missing column",
            f"reward {reward!r}: sample {sample_id(sample)!r} has no meta field {field!r} ({holds}); "
            f"add the column to the dataset or remove {reward!r} from the rewards config",
        )
    return meta[field]


def bad_meta(sample: Any, field: str, reward: str, value: Any, expected: str) -> ValueError:
    return data_error(
        "invalid value",
        f"reward {reward!r}: sample {sample_id(sample)!r} meta[{field!r}] = {value!r} is not {expected}",
    )


# ----------------------------------------------------------------------------- normalisation

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
NUMBER_WORD_VALUES: dict[str, int] = {w: i for i, w in enumerate(_UNITS)} | _TENS | {"hundred": 100}
"""Number words and their values (hyphenated compounds such as ``twenty-one`` are read too)."""

ARTICLES = frozenset({"a", "an", "the"})
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+(?:-[^\W\d_]+)*")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def word_number(word: str) -> int | None:
    """``"three"`` -> 3, ``"twenty-one"`` -> 21; None if ``word`` is not a number word."""
    if word in NUMBER_WORD_VALUES:
        return NUMBER_WORD_VALUES[word]
    head, _, tail = word.partition("-")
    if head in _TENS and tail in _UNITS[1:10]:
        return _TENS[head] + _UNITS.index(tail)
    return None


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def answer_tokens(text: str) -> list[str]:
    """Lower-cased words and numbers of ``text``, punctuation dropped, numbers in one spelling.

    Number words become digits (``"Three"`` -> ``"3"``), ``"3.0"`` becomes ``"3"``,
    ``"1,000"`` becomes ``"1000"``.
    """
    text = _THOUSANDS.sub("", unicodedata.normalize("NFKC", text).lower())
    out: list[str] = []
    for tok in _TOKEN.findall(text):
        if tok[0].isdigit():
            out.append(_number_text(float(tok)))
        else:
            value = word_number(tok)
            out.append(tok if value is None else str(value))
    return out


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer, for exact matching.

    Lower case, Unicode NFKC, punctuation dropped, whitespace collapsed, number words as digits
    (``"three"`` == ``"3"`` == ``"3.0"``), and the articles ``a``/``an``/``the`` dropped; when
    nothing else is left the last one stays (so a multiple-choice answer ``"A"`` survives).
    """
    tokens = answer_tokens(text)
    kept = [t for t in tokens if t not in ARTICLES]
    return " ".join(kept if kept else tokens[-1:])


# ----------------------------------------------------------------------------- answer extraction

_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<\s*think\s*>.*?<\s*/\s*think\s*>", re.IGNORECASE | re.DOTALL)
_ANY_TAG = re.compile(r"<\s*/?\s*(?:answer|think)\s*>", re.IGNORECASE)


def extract_answer(completion: str, *, require_tags: bool = False) -> str | None:
    """The answer text of a completion, or None when it has no usable answer.

    With answer tags: the content of the single ``<answer>...</answer>`` block (None if there are
    several blocks, or an opening tag without its closing one). Without them: None if
    ``require_tags``, else the completion minus its ``<think>...</think>`` blocks (None if a think
    block is left open). None too when what remains is empty once tags, whitespace and punctuation
    are dropped.
    """
    opens, closes = list(_OPEN.finditer(completion)), list(_CLOSE.finditer(completion))
    if opens or closes:
        if len(opens) != 1 or len(closes) != 1 or closes[0].start() < opens[0].end():
            return None
        answer = completion[opens[0].end() : closes[0].start()]
    elif require_tags:
        return None
    else:
        answer = _THINK_BLOCK.sub(" ", completion)
        if re.search(r"<\s*/?\s*think\s*>", answer, re.IGNORECASE):
            return None
    answer = _ANY_TAG.sub(" ", answer).strip()
    return answer if answer_tokens(answer) else None


def answer_numbers(answer: str) -> set[float]:
    """Distinct numbers said in ``answer`` (digits or number words; ``no``/``none`` count as 0)."""
    out: set[float] = set()
    for tok in answer_tokens(answer):
        if tok[0].isdigit():
            out.add(float(tok))
        elif tok in ("no", "none"):
            out.add(0.0)
    return out


def _single(values: set[Any]) -> Any | None:
    return next(iter(values)) if len(values) == 1 else None


# ----------------------------------------------------------------------------- accuracy rewards


def exact_match(completion: str, sample: PromptSample, *, require_tags: bool = False) -> float:
    """1.0 if the normalised answer equals the normalised ``meta["answer"]``, else 0.0.

    Reads ``meta["answer"]``. The answer is taken by :func:`extract_answer` (inside the
    ``<answer>`` tags when present). ``require_tags=True`` pays nothing without tags.
    """
    reference = normalize_answer(str(require_meta(sample, "answer", "exact_match", "the reference answer")))
    answer = extract_answer(completion, require_tags=require_tags)
    return float(answer is not None and normalize_answer(answer) == reference)


def answer_tag(completion: str, sample: PromptSample) -> float:
    """1.0 if the completion's single ``<answer>`` block matches ``meta["answer"]`` (normalised).

    Reads ``meta["answer"]``. An answer outside the tags, or no tags at all, earns nothing.
    """
    reference = normalize_answer(str(require_meta(sample, "answer", "answer_tag", "the reference answer")))
    answer = extract_answer(completion, require_tags=True)
    return float(answer is not None and normalize_answer(answer) == reference)


_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def format_reward(completion: str, sample: PromptSample) -> float:
    """1.0 if the completion is exactly ``<think>...</think><answer>...</answer>``, else 0.0.

    Whitespace may surround and separate the blocks; each tag appears once; both blocks hold
    some text (an empty think or answer block is a format hack). Reads no meta.
    """
    m = _FORMAT.fullmatch(completion)
    if m is None or len(_ANY_TAG.findall(completion)) != 4:
        return 0.0
    return float(bool(m.group(1).strip()) and bool(answer_tokens(m.group(2))))


def count_match(completion: str, sample: PromptSample) -> float:
    """1.0 if the answer states exactly one count and it equals ``meta["answer"]``.

    Reads ``meta["answer"]`` (an integer, e.g. ``"2"`` in shapes-world counting rows). Counts are
    digits or number words (``"three"``), ``"no"``/``"none"`` mean 0; the articles ``a``/``an``
    are not counts. Two different numbers in the answer (``"3 or 4"``) earn nothing.
    """
    raw = require_meta(sample, "answer", "count_match", "the true count")
    truth = _single(answer_numbers(str(raw)))
    if truth is None or not float(truth).is_integer():
        raise bad_meta(sample, "answer", "count_match", raw, "an integer count (use count_match on counting rows)")
    answer = extract_answer(completion)
    return float(answer is not None and _single(answer_numbers(answer)) == truth)


COLOUR_WORDS: dict[str, str] = {}
"""Colour word -> canonical colour: the registry :func:`colour_match` reads (empty until a world
registers its colours; the shapes world's and their synonyms when :mod:`vlalign.shapes` is imported)."""


def register_colour_words(words: Mapping[str, str]) -> None:
    """Add colour words (``{"grey": "gray", "gray": "gray"}``) that :func:`colour_match` recognises."""
    COLOUR_WORDS.update(words)


def colour_match(completion: str, sample: PromptSample) -> float:
    """1.0 if the answer names exactly one colour and it is ``meta["answer"]``.

    Reads ``meta["answer"]`` (one colour word). Colours are those of :data:`COLOUR_WORDS` (the
    shapes world's and their synonyms: ``grey`` = ``gray``, ``violet`` = ``purple``), plus the
    reference word itself. Two different
    colours in the answer (``"red or blue"``) earn nothing.
    """
    raw = require_meta(sample, "answer", "colour_match", "the true colour")
    words = answer_tokens(str(raw))
    if len(words) != 1 or words[0][0].isdigit():
        raise bad_meta(sample, "answer", "colour_match", raw, "one colour word (use colour_match on colour rows)")
    table = COLOUR_WORDS | ({words[0]: words[0]} if words[0] not in COLOUR_WORDS else {})
    truth = table[words[0]]
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    said = {table[t] for t in answer_tokens(answer) if t in table}
    return float(_single(said) == truth)


_POLARITY = {"yes": True, "no": False, "not": False}


def yes_no_match(completion: str, sample: PromptSample) -> float:
    """1.0 if the answer says yes or no (not both) and agrees with ``meta["answer"]``.

    Reads ``meta["answer"]`` (``"Yes"``/``"No"``). As in POPE, ``no`` or ``not`` means no; an
    answer holding both a yes and a no earns nothing.
    """
    raw = require_meta(sample, "answer", "yes_no_match", "Yes or No")
    truth = normalize_answer(str(raw))
    if truth not in ("yes", "no"):
        raise bad_meta(sample, "answer", "yes_no_match", raw, "'Yes' or 'No'")
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    said = {_POLARITY[t] for t in answer_tokens(answer) if t in _POLARITY}
    return float(_single(said) == (truth == "yes"))


# ----------------------------------------------------------------------------- boxes and scores

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """Every ``[x1, y1, x2, y2]`` (four numbers in square brackets) in ``text``, in order."""
    return [tuple(float(v) for v in m.groups()) for m in _BOX.finditer(text)]  # type: ignore[misc]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0 if either has no area)."""
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    if area_a == 0.0 or area_b == 0.0:
        return 0.0
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / (area_a + area_b - inter)


def box_iou(completion: str, sample: PromptSample, *, threshold: float | None = None) -> float:
    """IoU of the answer's box with ``meta["box"]``; with ``threshold``, 1.0 if IoU >= it else 0.0.

    Reads ``meta["box"]`` (``[x1, y1, x2, y2]`` in the units the model answers in, pixels or
    fractions). The answer must hold exactly one distinct box ``[x1, y1, x2, y2]``; several
    different boxes, or a box with x2 <= x1 or y2 <= y1, earn 0.
    """
    raw = require_meta(sample, "box", "box_iou", "the true box [x1, y1, x2, y2]")
    try:
        truth = tuple(float(v) for v in raw)
    except (TypeError, ValueError):
        truth = ()
    if len(truth) != 4 or not all(math.isfinite(v) for v in truth):
        raise bad_meta(sample, "box", "box_iou", raw, "four numbers [x1, y1, x2, y2]")
    answer = extract_answer(completion)
    box = _single(set(parse_boxes(answer))) if answer is not None else None
    value = iou(box, truth) if box is not None else 0.0
    return value if threshold is None else float(value >= threshold)


def threshold_score(completion: str, sample: PromptSample, *, threshold: float = 0.35) -> float:
    """1.0 if the answer states one number within ``threshold`` of ``meta["answer"]`` (strictly).

    Q-Insight's score reward (Li et al., arXiv 2503.22679): 1 if |rating - gt| < 0.35. Reads
    ``meta["answer"]`` (a number). Two different numbers in the answer earn nothing.
    """
    raw = require_meta(sample, "answer", "threshold_score", "the true score")
    try:
        truth = float(raw)
    except (TypeError, ValueError):
        raise bad_meta(sample, "answer", "threshold_score", raw, "a number") from None
    answer = extract_answer(completion)
    value = _single(answer_numbers(answer)) if answer is not None else None
    return float(value is not None and abs(value - truth) < threshold)


def whitespace_length(completion: str) -> int:
    """Length of a completion in whitespace-separated words (the default token count)."""
    return len(completion.split())


def overlong_penalty(
    completion: str,
    sample: PromptSample,
    *,
    max_length: int,
    cache_length: int,
    penalty_factor: float = 1.0,
    count_tokens: Callable[[str], int] = whitespace_length,
) -> float:
    """DAPO's soft overlong punishment of one completion (0 when short, down to -penalty_factor).

    Computed by :func:`vlalign.losses.advantages.overlong_reward_penalty` on the completion's
    length, which ``count_tokens`` measures (whitespace words by default; a recipe passes its
    tokenizer's count so that ``max_length`` is in tokens). Reads no meta.
    """
    length = torch.tensor([count_tokens(completion)], dtype=torch.float64)
    penalty = overlong_reward_penalty(
        length, max_length=max_length, cache_length=cache_length, penalty_factor=penalty_factor
    )
    return float(penalty[0])


# ----------------------------------------------------------------------------- registry

REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "answer_tag": answer_tag,
    "format": format_reward,
    "count_match": count_match,
    "colour_match": colour_match,
    "yes_no_match": yes_no_match,
    "box_iou": box_iou,
    "threshold_score": threshold_score,
    "overlong_penalty": overlong_penalty,
}
"""Config name -> reward function ``(completion, sample, **options) -> float``: the registry that
:func:`vlalign.rewards.combine.build_reward` reads (the shapes world adds ``object_f1`` and
``shapes_answer`` when :mod:`vlalign.shapes` is imported)."""


def register_reward(name: str, fn: RewardFn) -> None:
    """Make ``fn`` the reward function that a rewards config calls ``name`` (registering a name again
    replaces it)."""
    REWARD_FUNCTIONS[name] = fn
