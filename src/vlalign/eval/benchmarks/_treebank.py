"""The word tokeniser of the official CHAIR and AMBER scripts: ``nltk.word_tokenize`` (NLTK 3.2.5 / 3.8).

``nltk.word_tokenize(text)`` splits the text into sentences with the Punkt model for English,
then each sentence with the Penn Treebank rules. vlalign does not depend on NLTK (its Punkt model
is a download); this module reproduces the behaviour that matters for finding object words:

- *sentences* end at ``.``, ``?`` or ``!`` followed by white space or the end of the text,
  except after a few abbreviations (``mr.``, ``dr.``, ``st.``, ``e.g.``, single letters). Punkt's
  learned collocations are not reproduced (a difference only where a period is followed by a
  word that Punkt pairs with the one before, rare in captions);
- in each sentence, the Treebank rules: ``,`` and ``:`` split off unless a digit follows, ``;``
  ``@`` ``#`` ``$`` ``%`` ``&`` ``?`` ``!`` brackets and ``--`` become tokens, ``...`` is a
  token, double quotes become ````` / ``''``, the *final* period of the sentence splits off
  (a period inside a sentence stays on its word: ``dog.cat`` is one token), clitics split
  (``dog's`` -> ``dog`` ``'s``; ``can't`` -> ``ca`` ``n't``; ``cannot`` -> ``can`` ``not``),
  hyphens and slashes stay inside words (``hot-dog`` is one token).
"""

from __future__ import annotations

import re

_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "jr", "sr", "approx"})
_SENTENCE_END = re.compile(r"[.?!]+(?=\s|$)")

_STARTING_QUOTES = [(re.compile(r'^"'), "``"), (re.compile(r"(``)"), r" \1 "), (re.compile(r'([ (\[{<])"'), r"\1 `` ")]
_PUNCTUATION = [
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.\.\."), r" ... "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"([^\.])(\.)([\]\)}>\"\']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
]
_BRACKETS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DASHES = (re.compile(r"--"), r" -- ")
_ENDING_QUOTES = [
    (re.compile(r'"'), " '' "),
    (re.compile(r"(\S)(\'\')"), r"\1 \2 "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_SPLIT_WORDS = [
    re.compile(p)
    for p in (
        r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b",
        r"(?i)\b(got)(ta)\b", r"(?i)\b(lem)(me)\b", r"(?i)\b(mor)('n)\b", r"(?i)\b(wan)(na)\s",
        r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b",
    )
]  # fmt: skip


def split_sentences(text: str) -> list[str]:
    """Sentences as Punkt splits captions (approximation documented in the module docstring)."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        before = text[start : match.start()].split()
        last = before[-1].lower() if before else ""
        if match.group() == "." and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue
        sentence = text[start : match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    rest = text[start:].strip()
    if rest:
        sentences.append(rest)
    return sentences


def treebank_tokenize(sentence: str) -> list[str]:
    """One sentence split by the Penn Treebank rules (NLTK's ``TreebankWordTokenizer``)."""
    text = sentence
    for regex, replacement in (*_STARTING_QUOTES, *_PUNCTUATION, _BRACKETS, _DASHES):
        text = regex.sub(replacement, text)
    text = f" {text} "
    for regex, replacement in _ENDING_QUOTES:
        text = regex.sub(replacement, text)
    for regex in _SPLIT_WORDS:
        text = regex.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: sentences, then the Treebank rules on each."""
    return [token for sentence in split_sentences(text) for token in treebank_tokenize(sentence)]
