"""POPE read from its published file format and scored as its ``evaluate.py`` scores it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from vlalign.eval.benchmarks import (
    BenchmarkFileError,
    check_pope_images,
    count_disagreements,
    format_pope_table,
    missing_pope_images,
    pope_answer_official,
    pope_file_name,
    pope_metrics,
    read_pope_answers,
    read_pope_file,
)

QUESTIONS = [
    {
        "question_id": 1,
        "image": "COCO_val2014_000000000001.jpg",
        "text": "Is there a dog in the image?",
        "label": "yes",
    },
    {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a car in the image?", "label": "no"},
    {
        "question_id": 3,
        "image": "COCO_val2014_000000000002.jpg",
        "text": "Is there a cat in the image?",
        "label": "yes",
    },
    {"question_id": 4, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a bus in the image?", "label": "no"},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _images(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / name)
    return root


@pytest.mark.parametrize(
    ("text", "reading"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("NO", "yes"),  # not one of the words No / no / not
        ("No!", "yes"),  # "No!" is one piece: the "!" stays on it
        ("Not at all.", "yes"),  # "Not" is capitalised; only "not" counts
        ("(no)", "yes"),
        ("No\n\nThe image shows a cat.", "yes"),  # split on spaces only: "No\n\nThe" is one piece
        ("Yes, there is no dog.", "no"),  # commas deleted, "no" is a piece of the first sentence
        ("Yes. There is no dog.", "yes"),  # only the first sentence counts
        ("No, there is not.", "no"),
        ("There is a dog, not a cat.", "no"),
        ("", "yes"),
    ],
)
def test_official_answer_rule(text, reading):
    """evaluate.py: first sentence (before the first "."), commas removed, split(" "); no iff No/no/not is a piece."""
    assert pope_answer_official(text) == reading


def test_metrics_worked_by_hand():
    """Labels y y y y n n n n; answers y y y n y n n n.

    TP = 3, FN = 1, FP = 1, TN = 3: accuracy 6/8, precision 3/4, recall 3/4, F1 = 2PR/(P+R) = 0.75,
    yes-ratio = 4/8.
    """
    labels = ["yes"] * 4 + ["no"] * 4
    answers = ["yes", "yes", "yes", "no", "yes", "no", "no", "no"]
    m = pope_metrics(labels, answers)
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 1, 3)
    assert m.accuracy == 0.75 and m.precision == 0.75 and m.recall == 0.75 and m.f1 == 0.75
    assert m.yes_ratio == 0.5


def test_metrics_from_raw_answers_and_edge_cases():
    """Raw texts read by the official rule: "No!" is a yes (FP on a no label), "Yes, there is no cat" a no.

    labels y n n y; texts "Yes" "No!" "No" "Yes, there is no cat" -> answers y y n n:
    TP 1, FP 1, TN 1, FN 1 -> every metric 0.5. All-no answers: precision is 0/0, where
    evaluate.py raises ZeroDivisionError; here NaN, and F1 NaN with it.
    """
    texts = ["Yes", "No!", "No", "Yes, there is no cat"]
    m = pope_metrics(["yes", "no", "no", "yes"], [pope_answer_official(t) for t in texts])
    assert (m.tp, m.fp, m.tn, m.fn) == (1, 1, 1, 1)
    assert m.accuracy == m.precision == m.recall == m.f1 == m.yes_ratio == 0.5
    none = pope_metrics(["yes", "no"], ["no", "no"])
    assert math.isnan(none.precision) and math.isnan(none.f1) and none.recall == 0.0 and none.yes_ratio == 0.0
    with pytest.raises(ValueError, match="pairs them by position"):
        pope_metrics(["yes"], [])


def test_read_jsonl_and_images(tmp_path):
    path = _write_jsonl(tmp_path / pope_file_name("coco", "random"), QUESTIONS)
    root = _images(tmp_path / "val2014", ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"])
    questions = read_pope_file(path, image_root=root)
    assert [q.question_id for q in questions] == [1, 2, 3, 4]
    assert [q.line for q in questions] == [1, 2, 3, 4] and questions[1].label == "no"
    (root / "COCO_val2014_000000000002.jpg").unlink()
    assert missing_pope_images(questions, root) == ["COCO_val2014_000000000002.jpg"]
    with pytest.raises(BenchmarkFileError, match=r"line 3, column 'image'.*1 of the file's images are missing"):
        check_pope_images(questions, root)


def test_read_json_array_names_lines(tmp_path):
    """The SEEM-built files are one indented JSON array: errors still name the line of the record."""
    bad = [dict(q) for q in QUESTIONS]
    bad[2]["label"] = "Yes"
    path = tmp_path / "gqa_pope_seem_random.json"
    path.write_text(json.dumps(bad, indent=4))
    with pytest.raises(BenchmarkFileError) as info:
        read_pope_file(path)
    assert info.value.line == 14 and info.value.column == "label" and str(path) in str(info.value)
    path.write_text(json.dumps(QUESTIONS, indent=4))
    assert [q.line for q in read_pope_file(path)] == [2, 8, 14, 20]


@pytest.mark.parametrize(
    ("change", "column", "message"),
    [
        ({"question_id": "2"}, "question_id", "expected an integer"),
        ({"question_id": True}, "question_id", "expected an integer"),
        ({"label": 1}, "label", "expected a string"),
        ({"label": "maybe"}, "label", 'expected one of "yes", "no"'),
        ({"image": ""}, "image", "empty image name"),
        ({"question_id": 1}, "question_id", "repeats the one on line 1"),
    ],
)
def test_wrong_column_fails_fast(tmp_path, change, column, message):
    rows = [dict(q) for q in QUESTIONS]
    rows[1].update(change)
    path = _write_jsonl(tmp_path / "q.json", rows)
    with pytest.raises(BenchmarkFileError, match=message) as info:
        read_pope_file(path)
    assert (info.value.path, info.value.line, info.value.column) == (str(path), 2, column)
    assert f"{path}, line 2, column '{column}'" in str(info.value)


def test_missing_field_and_bad_json(tmp_path):
    rows = [dict(q) for q in QUESTIONS]
    del rows[3]["text"]
    with pytest.raises(BenchmarkFileError, match=r"line 4, column 'text': missing field"):
        read_pope_file(_write_jsonl(tmp_path / "a.json", rows))
    broken = tmp_path / "b.json"
    broken.write_text(json.dumps(QUESTIONS[0]) + "\n{not json\n")
    with pytest.raises(BenchmarkFileError, match=r"b.json, line 2: invalid JSON"):
        read_pope_file(broken)


def test_answers_file_table_and_disagreements(tmp_path):
    """The answer file of the POPE README format, scored per mode; the table prints percent and the average row."""
    answers = _write_jsonl(
        tmp_path / "ans.json",
        [{"question": q["text"], "answer": a} for q, a in zip(QUESTIONS, ["Yes", "No", "No.", "Yes"])],
    )
    texts = read_pope_answers(answers)
    labels = [q["label"] for q in QUESTIONS]
    random = pope_metrics(labels, [pope_answer_official(t) for t in texts])  # y n n y vs y n y n: TP1 TN1 FN1 FP1
    perfect = pope_metrics(labels, labels)
    table = format_pope_table({"random": random, "popular": perfect})
    assert table.splitlines()[2] == "| random | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |"
    assert table.splitlines()[3] == "| popular | 100.0 | 100.0 | 100.0 | 100.0 | 50.0 |"
    assert table.splitlines()[4] == "| Average | 75.0 | 75.0 | 75.0 | 75.0 | 50.0 |"

    def strict(text: str) -> str:
        word = text.strip().split()[0].strip(".,!()").lower() if text.strip() else ""
        return word if word in ("yes", "no") else "unclear"

    found = count_disagreements(
        ["Yes", "No!", "NO", "No, it is not.", "(no)", "Maybe"], pope_answer_official, strict, examples=2
    )
    assert (found.total, found.count) == (6, 4)  # No!, NO, (no) -> official yes; Maybe -> unclear
    assert found.examples == (("No!", "yes", "no"), ("NO", "yes", "no"))
