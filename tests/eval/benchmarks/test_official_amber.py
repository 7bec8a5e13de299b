"""AMBER read from files in its published formats and scored as its ``inference.py`` scores it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlalign.eval.benchmarks import (
    BenchmarkFileError,
    amber_discriminative_metrics,
    amber_generative_metrics,
    amber_nouns,
    read_amber_annotations,
    read_amber_queries,
    read_amber_responses,
)

ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["person", "lake", "mountain"], "hallu": ["dog", "sun"]},
    {"id": 2, "type": "generative", "truth": ["bench", "chair"], "hallu": ["cloud"]},
    {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 4, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 5, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 6, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 7, "type": "discriminative-attribute-state", "truth": "no"},
    {"id": 8, "type": "discriminative-attribute-number", "truth": "yes"},
    {"id": 9, "type": "discriminative-attribute-action", "truth": "no"},
    {"id": 10, "type": "discriminative-relation", "truth": "no"},
    {"id": 11, "type": "relation", "truth": "yes"},
    {"id": 12, "type": "discriminative-attribute-state", "truth": "yes"},
    {"id": 13, "type": "discriminative-relation", "truth": "no"},
]
RESPONSES = [
    {"id": 1, "response": "A man walks near the water. A dog runs on the hill. The sun is orange and a cat sleeps."},
    {"id": 2, "response": "A chair."},
    {"id": 3, "response": "No"},
    {"id": 4, "response": "Yes"},
    {"id": 5, "response": "Yes"},
    {"id": 6, "response": "yes"},
    {"id": 7, "response": "No"},
    {"id": 8, "response": "No"},
    {"id": 9, "response": "No."},
    {"id": 10, "response": "No"},
    {"id": 11, "response": "Yes"},
    {"id": 12, "response": "Yes"},
    {"id": 13, "response": "Yes"},
]


def _write(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, indent=4))
    return path


@pytest.fixture()
def files(tmp_path):
    return _write(tmp_path / "annotations.json", ANNOTATIONS), _write(tmp_path / "responses.json", RESPONSES)


def test_discriminative_worked_by_hand(files):
    """ "No" is the positive class; a response must be exactly "Yes"/"No" ("yes", "No." are wrong both ways).

    Existence (ids 3-6): correct 3, 5 -> 2 of 4; answered No: 3 (right); truth no: 3, 4.
      accuracy round(2/4.001*100, 1) = 50.0, precision round(1/1.001*100, 1) = 99.9,
      recall round(1/2.001*100, 1) = 50.0, F1 round(2*.999*.5/(.999+.5+0.001)*100, 1) = 66.6.
    Attribute (7, 8, 9, 12; three counters, so denominators + 0.003): correct 7, 12; answered No 7, 8
      (7 right); truth no 7, 9: accuracy 2/4.003 -> 50.0, P = R = 1/2.003 -> 49.9,
      F1 2*.499*.499/(.998+.0001) -> 49.9.
    Relation (10, 11, 13; "relation" and "discriminative-relation" together): correct 10, 11;
      answered No 10 (right); truth no 10, 13: 66.6, 99.9, 50.0, F1 .999/1.4991 -> 66.6.
    All eleven: correct 6, answered No 4 (3 right), truth no 6: 6/11.001 -> 54.5, 3/4.001 -> 75.0,
      3/6.001 -> 50.0, F1 .75/1.2501 -> 60.0.
    """
    annotations = read_amber_annotations(files[0])
    responses = read_amber_responses(files[1])
    m = amber_discriminative_metrics(annotations, responses)
    assert (m["existence"].accuracy, m["existence"].precision, m["existence"].recall, m["existence"].f1) == (
        50.0,
        99.9,
        50.0,
        66.6,
    )
    assert (m["attribute"].accuracy, m["attribute"].precision, m["attribute"].recall, m["attribute"].f1) == (
        50.0,
        49.9,
        49.9,
        49.9,
    )
    assert (m["relation"].accuracy, m["relation"].precision, m["relation"].recall, m["relation"].f1) == (
        66.6,
        99.9,
        50.0,
        66.6,
    )
    overall = m["discriminative"]
    assert (overall.accuracy, overall.precision, overall.recall, overall.f1) == (54.5, 75.0, 50.0, 60.0)
    assert (overall.questions, overall.correct, overall.answered_no, overall.answered_no_right, overall.truth_no) == (
        11,
        6,
        4,
        3,
        6,
    )
    assert m["state"].questions == 2 and m["number"].questions == 1 and m["action"].questions == 1
    lenient = amber_discriminative_metrics(annotations, responses, reader=lambda t: t.strip(".").capitalize())
    assert lenient["discriminative"].correct == 8  # "yes" (id 6) and "No." (id 9) now read


def test_generative_worked_by_hand(files):
    """Response 1 (truth person, lake, mountain; targets dog, sun): nouns in the vocabulary, in order,
    man water dog hill sun orange cat. man -> covers person (an association), water -> lake,
    hill -> mountain; dog and sun are targets (Cog 2/2) and hallucinations; orange is a safe word
    (skipped, still counted); cat is a hallucination. 7 nouns, 3 hallucinated.
    Response 2 (truth bench, chair): "chair" is first listed as bench's association, so it covers
    bench, not chair (the script's first match): 1 noun, none hallucinated, Cover 1/2.
    CHAIR = round(3/8.001*100, 1) = 37.5; Cover = 4/5.001 -> 80.0; Hal = 100 - 1/2.001*100 -> 50.0;
    Cog = 2/3.001 -> 66.6. With a similarity that finds "cat" close to "lake", cat is no
    hallucination: CHAIR 2/8.001 -> 25.0, Hal unchanged (dog, sun remain).
    """
    annotations = read_amber_annotations(files[0])
    responses = read_amber_responses(files[1])
    assert amber_nouns(RESPONSES[0]["response"]) == ["man", "water", "dog", "hill", "sun", "orange", "cat"]
    g = amber_generative_metrics(annotations, responses)
    assert (g.chair, g.cover, g.hal, g.cog) == (37.5, 80.0, 50.0, 66.6)
    assert (g.nouns, g.hallucinated_nouns, g.truth_objects, g.covered_objects, g.targets, g.covered_targets) == (
        8,
        3,
        5,
        4,
        3,
        2,
    )
    similar = amber_generative_metrics(annotations, responses, similar=lambda a, b: (a, b) == ("cat", "lake"))
    assert (similar.chair, similar.hal) == (25.0, 50.0)


def test_nouns_follow_wordnet_forms():
    """Capitalised words stay as they are (WordNet has no "Trees"); plurals become WordNet's lemma,
    including its shortest-lemma choices ("men" stays "men", "vases" -> "vas", out of the vocabulary)."""
    assert amber_nouns("Trees and trees, two dogs, men and vases on tables.") == ["tree", "dog", "table"]


def test_files_fail_fast(tmp_path, files):
    rows = [dict(r) for r in ANNOTATIONS]
    rows[4]["truth"] = "maybe"
    with pytest.raises(BenchmarkFileError, match=r"annotations.json, line 36, column 'truth'"):
        read_amber_annotations(_write(tmp_path / "bad_annotations.json", rows))
    rows = [dict(r) for r in ANNOTATIONS[1:]]
    with pytest.raises(BenchmarkFileError, match=r"entry 0 has id 2, AMBER expects 1"):
        read_amber_annotations(_write(tmp_path / "a2.json", rows))
    responses = [dict(r) for r in RESPONSES]
    responses[2]["id"] = "3"
    with pytest.raises(BenchmarkFileError, match=r"responses.json, line 10, column 'id': expected an integer"):
        read_amber_responses(_write(tmp_path / "bad_responses.json", responses))
    queries = [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."}, {"id": 1005, "image": "AMBER_1.jpg"}]
    with pytest.raises(BenchmarkFileError, match=r"line 7, column 'query': missing field"):
        read_amber_queries(_write(tmp_path / "query_all.json", queries))
    assert read_amber_queries(_write(tmp_path / "q.json", queries[:1]))[0].query == "Describe this image."
    with pytest.raises(ValueError, match="response id 99"):
        amber_discriminative_metrics(read_amber_annotations(files[0]), {99: "Yes"})
