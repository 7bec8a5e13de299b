"""The word processing of the official CHAIR script, reproduced without its packages.

``pattern.en.singularize`` (pattern 3.6) and ``nltk.word_tokenize`` are not dependencies; these
cases pin the behaviour of the reimplementations. Each expected value is what the original
function returns (checked against the original ``singularize`` on 85,568 words and NLTK's
``TreebankWordTokenizer`` on 61,415 caption sentences, see the report of issue 17).
"""

from __future__ import annotations

import pytest

from vlalign.eval.benchmarks._pattern_singular import pattern_singularize
from vlalign.eval.benchmarks._treebank import split_sentences, word_tokenize


@pytest.mark.parametrize(
    ("word", "singular"),
    [
        ("dogs", "dog"),
        ("bus", "bu"),  # the final rule drops any trailing s
        ("buses", "bus"),
        ("ties", "ty"),  # "^tie" in the -ie list never matches, so the -ies -> -y rule applies
        ("tie", "tie"),
        ("glass", "glas"),
        ("glasses", "glass"),
        ("tennis", "tenni"),
        ("people", "person"),
        ("women", "woman"),
        ("policemen", "policeman"),
        ("children", "child"),
        ("mice", "mouse"),
        ("knives", "knife"),
        ("geese", "goose"),
        ("oxen", "ox"),
        ("skis", "ski"),
        ("scissors", "scissors"),  # uninflected
        ("sheep", "sheep"),
        ("doggies", "doggies"),  # an -ie noun + s is returned unchanged
        ("collies", "collies"),
        ("canoes", "cano"),  # the -oes rule
        ("potatoes", "potato"),
        ("four", "fmy"),  # irregular "our" -> "my" matches as a suffix
        ("safari", "safarus"),  # [octop|vir] is a character class
        ("is", "is"),  # a suffix of the uninflected "chassis"
        ("this", "thi"),
        ("sandwiches", "sandwich"),
        ("benches", "bench"),
        ("giraffes", "giraffe"),
        ("wolves", "wolf"),
        ("leaves", "leaf"),
        ("dogs'", "dog's"),
        ("mothers-in-law", "mother-in-law"),
    ],
)
def test_pattern_singularize(word, singular):
    assert pattern_singularize(word) == singular


def test_word_tokenize_as_nltk():
    """Sentences first, then the Treebank rules: the final period splits off, a period inside a word stays."""
    text = "a man's dog, and a cat. they can't see the hot-dog stand (near the bus)! it's 3.5 m away..."
    assert split_sentences(text) == [
        "a man's dog, and a cat.",
        "they can't see the hot-dog stand (near the bus)!",
        "it's 3.5 m away...",
    ]
    assert word_tokenize(text) == [
        "a", "man", "'s", "dog", ",", "and", "a", "cat", ".",
        "they", "ca", "n't", "see", "the", "hot-dog", "stand", "(", "near", "the", "bus", ")", "!",
        "it", "'s", "3.5", "m", "away", "...",
    ]  # fmt: skip
    assert word_tokenize('a dog.cat on mr. smith\'s "sofa"') == [
        "a",
        "dog.cat",
        "on",
        "mr.",
        "smith",
        "'s",
        "``",
        "sofa",
        "''",
    ]
    assert word_tokenize("I cannot see") == ["I", "can", "not", "see"]
