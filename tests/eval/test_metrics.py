"""Evaluation metrics against hand-computed values: answer parsing, POPE, CHAIR, task accuracy,
win rate and the KL estimators."""

from __future__ import annotations

import math

import pytest
import torch

from vlalign.data.annotations import ObjectVocabulary, annotations_of, load_vocabulary
from vlalign.data.schema import DataError, PromptSample, user_prompt
from vlalign.eval.chair import chair
from vlalign.eval.parsing import pope_is_clear, pope_says_yes
from vlalign.eval.policy import kl_from_logprobs, scored_win_rate, win_rate
from vlalign.eval.pope import Confusion, confusion, confusion_metrics, pope_metrics
from vlalign.eval.tasks import answer_correct, task_accuracy
from vlalign.shapes.vocabulary import mentioned_objects
from vlalign.shapes.world import WorldConfig, generate_split, object_vocabulary

VOCAB = ObjectVocabulary(object_vocabulary(WorldConfig()))


# ----------------------------------------------------------------------------- POPE parsing


@pytest.mark.parametrize(
    ("text", "yes", "clear"),
    [
        ("Yes", True, True),
        ("Yes, there is a red circle in the image.", True, True),
        ("No, there is not.", False, True),
        ("There is no red circle.", False, True),
        ("Yes. There is no blue square.", True, True),  # only the first sentence counts
        ("No. Yes.", False, True),
        ("Not really", False, True),  # lower-cased (POPE's exact match would read yes)
        ("NO!", False, True),  # punctuation stripped
        ("The image shows a red circle", True, False),  # says neither: POPE counts yes
        ("", True, False),
        ("nothing", True, False),  # whole words only
        ("I don't know.", True, False),
    ],
)
def test_pope_parsing(text: str, yes: bool, clear: bool) -> None:
    assert pope_says_yes(text) is yes
    assert pope_is_clear(text) is clear


def test_pope_metrics_hand_computed() -> None:
    """Labels 6 yes, 4 no. Predictions: yes-labels -> Y Y Y Y N N (TP 4, FN 2), no-labels ->
    Y N N N (FP 1, TN 3). accuracy 7/10, precision 4/5, recall 4/6, F1 = 2*0.8*(2/3)/(0.8+2/3)
    = 8/11, yes-ratio 5/10; one answer ("I think so") says neither: unclear 1/10, read as yes."""
    answers = [
        "Yes",
        "Yes, there is.",
        "yes",
        "Yes.",
        "No",
        "Not at all.",
        "I think so",
        "No",
        "There is no such object.",
        "NO.",
    ]
    labels = ["Yes"] * 6 + ["No"] * 4
    m = pope_metrics(answers, labels)
    assert m["accuracy"] == pytest.approx(0.7, abs=1e-12)
    assert m["precision"] == pytest.approx(0.8, abs=1e-12)
    assert m["recall"] == pytest.approx(4 / 6, abs=1e-12)
    assert m["f1"] == pytest.approx(8 / 11, abs=1e-12)
    assert m["yes_ratio"] == pytest.approx(0.5, abs=1e-12)
    assert m["unclear"] == pytest.approx(0.1, abs=1e-12) and m["n"] == 10
    assert confusion([a != "No" for a in ["Yes", "No"]], [True, True]) == Confusion(tp=1, fp=0, tn=0, fn=1)


def test_pope_zero_denominators() -> None:
    """A model that always says no: no predicted positives -> precision 0, F1 0 (not NaN)."""
    m = confusion_metrics(confusion([False] * 4, [True, True, False, False]))
    assert m == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError, match="Yes' or 'No"):
        pope_metrics(["yes"], ["maybe"])


# ----------------------------------------------------------------------------- object mentions


def test_mentions_synonyms_counts_negations() -> None:
    found = VOCAB.find("The image shows two violet discs, no red circle and 3 yellow blocks; not a green star.")
    assert [(m.name, m.count, m.negated) for m in found] == [
        ("purple circle", 2, False),
        ("red circle", 0, True),
        ("yellow square", 3, False),
        ("green star", 1, True),
    ]
    assert found[0].phrase == "violet discs"
    assert VOCAB.mentioned("A red circle and a Red Circle.") == ["red circle", "red circle"]
    assert VOCAB.mentioned("There is a circle.") == []  # a shape without colour names no object


def test_longest_phrase_wins_and_conflicts() -> None:
    vocab = ObjectVocabulary({"hot dog": ["hot dogs"], "dog": ["dogs", "puppy"]})
    assert vocab.mentioned("Two hot dogs and a puppy, no dog.") == ["hot dog", "dog"]
    with pytest.raises(DataError, match="belongs to both"):
        ObjectVocabulary({"cat": ["kitty"], "kitten": ["kitty"]})


def test_vocabulary_agrees_with_world_parser_on_captions() -> None:
    """On 200 canonical captions the vocabulary matcher finds the objects the world's parser finds."""
    cfg = WorldConfig(n_train=200)
    for scene in generate_split(cfg, "train"):
        text = scene.caption(cfg)
        found = list(dict.fromkeys(VOCAB.mentioned(text)))
        assert found == mentioned_objects(text)
        assert set(found) == set(scene.object_names(cfg))


def test_load_vocabulary_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        load_vocabulary(tmp_path / "missing.json")
    (tmp_path / "v.json").write_text('{"cat": "kitty"}')
    with pytest.raises(DataError, match="phrases"):
        load_vocabulary(tmp_path / "v.json")
    (tmp_path / "v.json").write_text('{"cat": ["kitty"]}')
    assert load_vocabulary(tmp_path / "v.json").mentioned("a kitty") == ["cat"]


def test_annotations_of() -> None:
    s = PromptSample(
        "s",
        [],
        user_prompt("q", 0),
        {
            "objects": ["red circle"],
            "scene_objects": [{"shape": "circle", "colour": "red"}, {"shape": "circle", "colour": "red"}],
        },
    )
    ann = annotations_of(s)
    assert ann is not None and ann.objects == {"red circle"} and ann.counts == {"red circle": 2}
    assert annotations_of(PromptSample("t", [], user_prompt("q", 0), {})) is None
    with pytest.raises(DataError, match="'t'.*object annotations.*CHAIR"):
        annotations_of(PromptSample("t", [], user_prompt("q", 0), {}), required_by="CHAIR")


# ----------------------------------------------------------------------------- CHAIR


def test_chair_three_captions() -> None:
    """A: objects {red circle, blue square}, caption names both: 2 mentions, 0 hallucinated.
    B: {green triangle}, caption adds a yellow star: 2 mentions, 1 hallucinated.
    C: {purple diamond, orange cross, red square}, "two purple diamonds, a blue circle and a
    violet rhombus": purple diamond twice (a synonym the second time) and a blue circle: 3
    mentions, 1 hallucinated. CHAIR_i = 2/7, CHAIR_s = 2/3, recall = (2 + 1 + 1) / (2 + 1 + 3)."""
    captions = [
        "The image shows a red circle and a blue square.",
        "The image shows a green triangle and a yellow star.",
        "The image shows two purple diamonds, a blue circle and a violet rhombus.",
    ]
    present = [["red circle", "blue square"], ["green triangle"], ["purple diamond", "orange cross", "red square"]]
    res = chair(captions, present, VOCAB)
    assert res.chair_i == pytest.approx(2 / 7, abs=1e-12)
    assert res.chair_s == pytest.approx(2 / 3, abs=1e-12)
    assert res.recall == pytest.approx(4 / 6, abs=1e-12)
    assert (res.mentions, res.hallucinated, res.n) == (7, 2, 3)
    assert res.captions[1].hallucinated == ["yellow star"] and res.captions[2].hallucinated == ["blue circle"]
    assert chair([], [], VOCAB).chair_i == 0.0


# ----------------------------------------------------------------------------- task accuracy


def _q(task: str, answer: str) -> PromptSample:
    return PromptSample(f"{task}/{answer}", [], user_prompt("q", 0), {"task": task, "answer": answer})


@pytest.mark.parametrize(
    ("task", "answer", "text", "ok"),
    [
        ("counting", "3", "three", True),
        ("counting", "3", "There are 3 squares.", True),
        ("counting", "3", "Three.", True),
        ("counting", "3", "3 or 4", False),
        ("counting", "0", "There are none.", True),
        ("counting", "3", "4", False),
        ("colour", "purple", "violet", True),
        ("colour", "purple", "Purple.", True),
        ("colour", "purple", "red or purple", False),
        ("existence", "No", "No, there is not.", True),
        ("existence", "No", "yes and no", False),
        ("existence", "Yes", "Yes.", True),
        ("caption_word", "a cat", "The cat.", True),
        ("caption_word", "a cat", "A dog.", False),
    ],
)
def test_answer_normalisation(task: str, answer: str, text: str, ok: bool) -> None:
    assert answer_correct(text, _q(task, answer)) is ok


def test_task_accuracy_groups_by_task_and_skips_descriptions() -> None:
    samples = [
        _q("counting", "2"),
        _q("counting", "1"),
        _q("colour", "red"),
        PromptSample("d", [], user_prompt("q", 0), {"task": "describe", "objects": []}),
    ]
    acc = task_accuracy(["two", "2", "Red", "anything"], samples)
    assert acc == {"colour": 1.0, "colour_n": 1.0, "counting": 0.5, "counting_n": 2.0}


# ----------------------------------------------------------------------------- policy metrics


def test_win_rate_hand() -> None:
    """a vs b: 1 > 0 win, 2 = 2 tie (1/2), 3 < 5 loss, 4 > 1 win -> 2.5 / 4."""
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == 0.625
    with pytest.raises(ValueError):
        win_rate([1], [])


def test_scored_win_rate_identical_answers_tie_despite_batch_noise() -> None:
    """The scorer gives each text its length, plus 1e-7 times the number of texts in the call: the
    same text scores differently in the two calls, as padding makes a batched model do. Answers:
    "aa" = "aa" tie (1/2), "abc" > "a" win, "b" < "bb" loss, "x" = "x" tie -> 2 / 4."""

    def scorer(samples: list[str], texts: list[str]) -> list[float]:
        return [len(t) + 1e-7 * len(texts) * (1 if texts is first else 2) for t in texts]

    first = ["aa", "abc", "b", "x"]
    second = ["aa", "a", "bb", "x"]
    res = scored_win_rate(scorer, ["s"] * 4, first, second)
    assert res["win_rate"] == 0.5
    assert res["same"] == 0.5
    assert res["score_a"] == pytest.approx(7 / 4, abs=1e-6) and res["score_b"] == pytest.approx(6 / 4, abs=1e-6)


def test_kl_estimators_hand() -> None:
    """Sequence 1: log pi (-1, -2), log ref (-1.5, -1): d = (0.5, -1), k1 sum -0.5;
    sequence 2: log pi (-0.2,), log ref (-0.7,): d = 0.5, k1 0.5. kl = mean(-0.5, 0.5) = 0.
    k3(d) = exp(-d) + d - 1: (e^-0.5 - 0.5) , (e^1 - 2), (e^-0.5 - 0.5); mean of the three."""
    policy = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.2])]
    ref = [torch.tensor([-1.5, -1.0]), torch.tensor([-0.7])]
    out = kl_from_logprobs(policy, ref)
    assert out["kl"] == pytest.approx(0.0, abs=1e-7)
    k3 = (2 * (math.exp(-0.5) - 0.5) + (math.e - 2)) / 3
    assert out["kl_token_k3"] == pytest.approx(k3, abs=1e-7)
