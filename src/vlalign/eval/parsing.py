"""Reading model answers: POPE yes/no parsing.

Pure text functions, no model and no torch, used by the POPE metrics (:mod:`vlalign.eval.pope`),
the evaluation suite and the report. Object mentions, vocabularies and annotations are data
(:mod:`vlalign.data.annotations`).

**POPE answers** (:func:`pope_says_yes`) follow the POPE evaluation code (Li et al. 2023): keep the
text before the first ``.``, drop commas, split on spaces; the answer is *no* if a word is ``no``
or ``not``, otherwise *yes* (so an answer that says neither counts as yes, as in POPE, and is
reported as *unclear* beside the metrics instead of being dropped). Departure from the POPE
code: words are compared in lower case with surrounding punctuation stripped, so ``"NO!"`` and
``"Not really"`` read as no (POPE's exact-word match reads them as yes).
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- POPE answers

_NO_WORDS = frozenset({"no", "not"})
_YES_WORDS = frozenset({"yes"})


def _first_sentence_words(text: str) -> list[str]:
    first = text.split(".", 1)[0].replace(",", "")
    words = [w.strip("!?;:\"'()[]").lower() for w in first.split()]
    return [w for w in words if w]


def pope_says_yes(text: str) -> bool:
    """POPE's reading of an answer: False if its first sentence has ``no``/``not``, else True."""
    return not any(w in _NO_WORDS for w in _first_sentence_words(text))


def pope_is_clear(text: str) -> bool:
    """Whether the first sentence says ``yes``, ``no`` or ``not`` at all (else POPE guesses yes)."""
    return any(w in _NO_WORDS or w in _YES_WORDS for w in _first_sentence_words(text))
