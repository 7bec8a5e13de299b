"""Verifiable reward functions on hand-made completions, adversarial ones included.

Every expected value is worked out by hand in the case tables (the reason in a comment where it
is not obvious); box IoU is also checked against torchvision's independent implementation, and
the shapes-world rewards against the world's own canonical answers.
"""

from __future__ import annotations

import random

import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou

from vlalign.data.schema import DataError, PromptSample, user_prompt
from vlalign.rewards.verifiable import (
    REWARD_FUNCTIONS,
    answer_tag,
    box_iou,
    colour_match,
    count_match,
    exact_match,
    extract_answer,
    format_reward,
    iou,
    normalize_answer,
    overlong_penalty,
    parse_boxes,
    threshold_score,
    yes_no_match,
)
from vlalign.shapes.rewards import object_f1, scene_object_box, shapes_answer
from vlalign.shapes.tasks import task_rows
from vlalign.shapes.world import WorldConfig, generate_scene


def sample(**meta: object) -> PromptSample:
    return PromptSample(id="row-7", images=[], prompt=user_prompt("question?"), meta=dict(meta))


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Three", "3"),
        ("3.", "3"),
        ("3.0", "3"),
        ("  3  ", "3"),
        ("The answer is: Red!", "answer is red"),
        ("A", "a"),  # an article alone is kept (multiple-choice answer)
        ("the A", "a"),
        ("1,000 apples", "1000 apples"),
        ("twenty-one", "21"),
        ("YES.", "yes"),
        ("2.50", "2.5"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("completion", "require_tags", "expected"),
    [
        ("<answer>3</answer>", False, "3"),
        ("I think <answer> 3 </answer>", False, "3"),  # text outside the tags is ignored
        ("<ANSWER>3</Answer>", False, "3"),
        ("<think>4?</think> 3", False, "3"),  # the reasoning is not the answer
        ("<think>4?</think> 3", True, None),
        ("3", False, "3"),
        ("3", True, None),
        ("<answer>3</answer><answer>4</answer>", False, None),  # two answers
        ("<answer>3</answer><answer>3</answer>", False, None),
        ("<answer>3", False, None),  # unclosed
        ("3</answer>", False, None),
        ("</answer>3<answer>", False, None),  # closed before opened
        ("<answer></answer>", False, None),  # tag only
        ("<answer>  \n </answer>", False, None),
        ("<answer><think></think></answer>", False, None),
        ("<answer> . ! </answer>", False, None),  # punctuation only
        ("<think>the answer is 3", False, None),  # think left open
        ("", False, None),
        ("   ", False, None),
    ],
)
def test_extract_answer(completion: str, require_tags: bool, expected: str | None) -> None:
    assert extract_answer(completion, require_tags=require_tags) == expected


# ----------------------------------------------------------------------------- accuracy rewards

ADVERSARIAL = [
    "",  # empty
    "   \n\t ",  # whitespace
    "<answer></answer>",  # tags only
    "<answer> </answer> 3",  # the answer outside the tags
    "<think>3</think>",  # the answer only in the reasoning
    "<answer>3</answer><answer>4</answer>",  # two answer blocks
    "<answer>3</answer> <answer>3</answer>",
    "3 or 4",  # several answers
    "<answer>3, 4</answer>",
    "<answer>3",  # unclosed
]


@pytest.mark.parametrize("completion", ADVERSARIAL)
@pytest.mark.parametrize("reward", [exact_match, answer_tag, count_match])
def test_adversarial_completions_never_earn_accuracy(reward, completion: str) -> None:
    assert reward(completion, sample(answer="3")) == 0.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3", 1.0),
        ("Three", 1.0),
        ("three.", 1.0),
        ("<answer>3</answer>", 1.0),
        ("<think>two plus one</think><answer>3</answer>", 1.0),
        ("4", 0.0),
        ("There are 3.", 0.0),  # exact match: the whole answer must be the reference
        ("33", 0.0),  # no substring matching
    ],
)
def test_exact_match(completion: str, expected: float) -> None:
    assert exact_match(completion, sample(answer="3")) == expected


def test_exact_match_text_answers_and_require_tags() -> None:
    s = sample(answer="Yes")
    assert exact_match("yes", s) == 1.0
    assert exact_match("  YES! ", s) == 1.0
    assert exact_match("yes", s, require_tags=True) == 0.0
    assert exact_match("<answer>Yes</answer>", s, require_tags=True) == 1.0
    assert exact_match("A", sample(answer="(A)")) == 1.0
    assert exact_match("B", sample(answer="A")) == 0.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<answer>3</answer>", 1.0),
        ("<think>count</think>\n<answer>three</answer>", 1.0),
        ("3", 0.0),  # no tags
        ("3 <answer></answer>", 0.0),  # answer outside the tags
        ("<answer>4</answer> 3", 0.0),
    ],
)
def test_answer_tag(completion: str, expected: float) -> None:
    assert answer_tag(completion, sample(answer="3")) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("  <think>\nlong\nreasoning\n</think>\n\n<answer>3</answer>\n", 1.0),
        ("<answer>b</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
        ("<think>a</think><answer>b</answer> extra", 0.0),  # text after the answer
        ("preamble <think>a</think><answer>b</answer>", 0.0),
        ("<think></think><answer>b</answer>", 0.0),  # empty think
        ("<think>a</think><answer> </answer>", 0.0),  # empty answer
        ("<think>a</think><answer>.</answer>", 0.0),
        ("<think>a <answer>x</answer></think><answer>b</answer>", 0.0),  # extra tags
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
        ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),  # the format is lower case
        ("", 0.0),
    ],
)
def test_format_reward(completion: str, expected: float) -> None:
    assert format_reward(completion, sample()) == expected


@pytest.mark.parametrize(
    ("completion", "truth", "expected"),
    [
        ("3", "3", 1.0),
        ("There are three squares.", "3", 1.0),
        ("3 squares, 3 in total", "3", 1.0),  # one distinct count
        ("<think>1, 2, 3</think><answer>3</answer>", "3", 1.0),  # numbers in the reasoning don't count
        ("2 circles and 3 squares", "3", 0.0),  # two different counts
        ("3 or 4", "3", 0.0),
        ("one", "1", 1.0),
        ("a square", "1", 0.0),  # articles are not counts
        ("No squares.", "0", 1.0),
        ("none", "0", 1.0),
        ("0", "0", 1.0),
        ("zero", "0", 1.0),
        ("2.5", "2", 0.0),
        ("twelve", "12", 1.0),
        ("", "0", 0.0),
        ("<answer></answer>", "0", 0.0),
    ],
)
def test_count_match(completion: str, truth: str, expected: float) -> None:
    assert count_match(completion, sample(answer=truth)) == expected


@pytest.mark.parametrize(
    ("completion", "truth", "expected"),
    [
        ("red", "red", 1.0),
        ("Red.", "red", 1.0),
        ("The triangle is RED", "red", 1.0),
        ("grey", "gray", 1.0),  # synonyms
        ("gray", "grey", 1.0),
        ("violet", "purple", 1.0),
        ("blue", "red", 0.0),
        ("red or blue", "red", 0.0),  # two colours
        ("red, red", "red", 1.0),
        ("<answer>blue</answer> red", "red", 0.0),  # the answer outside the tags
        ("<answer></answer>", "red", 0.0),
        ("", "red", 0.0),
        ("magenta", "magenta", 1.0),  # the reference word is always understood
        ("magenta or red", "magenta", 0.0),
    ],
)
def test_colour_match(completion: str, truth: str, expected: float) -> None:
    assert colour_match(completion, sample(answer=truth)) == expected


@pytest.mark.parametrize(
    ("completion", "truth", "expected"),
    [
        ("Yes", "Yes", 1.0),
        ("yes, there is a red circle.", "Yes", 1.0),
        ("No", "Yes", 0.0),
        ("No, there is not.", "No", 1.0),  # 'no' and 'not' agree
        ("There is not a red circle", "No", 1.0),
        ("Yes or no", "Yes", 0.0),  # both
        ("yes, there is not", "No", 0.0),
        ("maybe", "Yes", 0.0),
        ("", "No", 0.0),
        ("<answer></answer> yes", "Yes", 0.0),
    ],
)
def test_yes_no_match(completion: str, truth: str, expected: float) -> None:
    assert yes_no_match(completion, sample(answer=truth)) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("The image shows a red circle and a blue square.", 1.0),
        # said {red circle, green star}, 1 correct: P = 1/2, R = 1/2, F1 = 1/2
        ("The image shows a red circle and a green star.", 0.5),
        # said {red circle}: P = 1, R = 1/2, F1 = 2·1·(1/2)/(3/2) = 2/3
        ("A red circle.", 2 / 3),
        # a negated mention is not an affirmation: said {red circle}
        ("A red circle and no green star.", 2 / 3),
        ("A circle and a square.", 0.0),  # no colours: no object named
        ("", 0.0),
    ],
)
def test_object_f1(completion: str, expected: float) -> None:
    value = object_f1(completion, sample(objects=["red circle", "blue square"]))
    assert value == pytest.approx(expected, abs=1e-15)


def test_shapes_answer_pays_canonical_answers_and_not_wrong_ones() -> None:
    """Every canonical answer of real shapes-world rows earns 1; a wrong count, colour or yes/no
    earns 0; a caption with one hallucinated object added to the n true ones earns
    F1 = 2·P·R/(P + R) with P = n/(n + 1), R = 1, i.e. 2n/(2n + 1)."""
    cfg = WorldConfig(existence_per_scene=2, colour_per_scene=2, counting_per_scene=2)
    rows = [r for i in range(12) for r in task_rows(generate_scene(cfg, "train", i), cfg)]
    samples = [PromptSample(r["id"], r["images"], r["prompt"], r) for r in rows]
    assert {s.meta["task"] for s in samples} == {"describe", "existence", "counting", "colour"}
    for s in samples:
        assert shapes_answer(s.meta["answer"], s) == 1.0, s.id
        assert shapes_answer(f"<think>look</think><answer>{s.meta['answer']}</answer>", s) == 1.0, s.id
    wrong = {
        "counting": lambda a: str(int(a) + 1),
        "colour": lambda a: "blue" if a != "blue" else "red",
        "existence": lambda a: "No" if a == "Yes" else "Yes",
    }
    for s in samples:
        if s.meta["task"] in wrong:
            assert shapes_answer(wrong[s.meta["task"]](s.meta["answer"]), s) == 0.0, s.id
        else:
            n = len(s.meta["objects"])
            extra = next(o for o in cfg.objects if o not in s.meta["objects"])
            caption = s.meta["answer"].rstrip(".") + f" and a {extra}."
            assert shapes_answer(caption, s) == pytest.approx(2 * n / (2 * n + 1), abs=1e-15), s.id
    with pytest.raises(DataError, match=r"shapes_answer.*row-7.*meta\['task'\] = 'riddle'"):
        shapes_answer("3", sample(task="riddle", answer="3"))


# ----------------------------------------------------------------------------- boxes and scores


def test_box_iou_hand_worked() -> None:
    """Truth [0,0,2,2], prediction [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7, IoU 1/7."""
    s = sample(box=[0, 0, 2, 2])
    assert box_iou("[1, 1, 3, 3]", s) == pytest.approx(1 / 7, abs=1e-15)
    assert box_iou('<answer>{"bbox_2d": [1,1,3,3]}</answer>', s) == pytest.approx(1 / 7, abs=1e-15)
    assert box_iou("[0, 0, 2, 2]", s) == 1.0
    assert box_iou("[0.0, 0.0, 2.0, 2.0] and again [0, 0, 2, 2]", s) == 1.0  # one distinct box
    assert box_iou("[1, 1, 3, 3]", s, threshold=0.5) == 0.0
    assert box_iou("[0, 0, 2, 1.5]", s, threshold=0.5) == 1.0  # IoU 3/4
    assert box_iou("[0, 0, 2, 2] [1, 1, 3, 3]", s) == 0.0  # two boxes
    assert box_iou("[2, 2, 0, 0]", s) == 0.0  # inverted
    assert box_iou("[5, 5, 6, 6]", s) == 0.0  # disjoint
    assert box_iou("the square, top left", s) == 0.0
    assert box_iou("<answer></answer> [0, 0, 2, 2]", s) == 0.0
    assert parse_boxes("[1,2,3,4] x [ 0.5 , 1 , 2.25, 3 ]") == [(1, 2, 3, 4), (0.5, 1, 2.25, 3)]


def test_iou_matches_torchvision() -> None:
    rng = random.Random(0)
    boxes = []
    for _ in range(50):
        x1, y1 = rng.uniform(0, 10), rng.uniform(0, 10)
        boxes.append((x1, y1, x1 + rng.uniform(0.1, 5), y1 + rng.uniform(0.1, 5)))
    t = torch.tensor(boxes, dtype=torch.float64)
    reference = tv_box_iou(t, t)
    ours = torch.tensor([[iou(a, b) for b in boxes] for a in boxes], dtype=torch.float64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-14)


def test_scene_object_box() -> None:
    box = scene_object_box({"shape": "circle", "colour": "red", "size": 0.25, "x": 0.5, "y": 0.25})
    assert box == [0.375, 0.125, 0.625, 0.375]  # exact in binary


def test_box_iou_bad_meta() -> None:
    with pytest.raises(DataError, match=r"box_iou.*row-7.*meta\['box'\].*four numbers"):
        box_iou("[0, 0, 1, 1]", sample(box=[0, 0, 1]))
    with pytest.raises(DataError, match=r"no meta field 'box'"):
        box_iou("[0, 0, 1, 1]", sample())


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3.2", 1.0),
        ("<answer>3.3</answer>", 1.0),  # |3.3 - 3.0| = 0.3 < 0.35
        ("3.5", 0.0),  # |0.5| >= 0.35
        ("2.7", 1.0),
        ("three", 1.0),
        ("3.2 or 3.9", 0.0),  # two scores
        ("", 0.0),
        ("<answer></answer>", 0.0),
    ],
)
def test_threshold_score(completion: str, expected: float) -> None:
    assert threshold_score(completion, sample(answer="3.0")) == expected


def test_threshold_score_is_strict() -> None:
    """|3.5 - 3.0| = 0.5 exactly in binary: not < 0.5."""
    assert threshold_score("3.5", sample(answer=3.0), threshold=0.5) == 0.0
    assert threshold_score("3.4375", sample(answer=3.0), threshold=0.5) == 1.0
    with pytest.raises(DataError, match="'answer'.*a number"):
        threshold_score("3", sample(answer="great"))


def test_overlong_penalty_hand_worked() -> None:
    """max 10, cache 4: free length 6. |y| = 6 -> 0; 8 -> (6 - 8)/4 = -0.5; 12 -> -1 (clamped)."""
    opts = {"max_length": 10, "cache_length": 4}
    assert overlong_penalty(" ".join(["w"] * 6), sample(), **opts) == 0.0
    assert overlong_penalty(" ".join(["w"] * 8), sample(), **opts) == -0.5
    assert overlong_penalty(" ".join(["w"] * 12), sample(), **opts) == -1.0
    assert overlong_penalty(" ".join(["w"] * 8), sample(), **opts, penalty_factor=2.0) == -1.0
    assert overlong_penalty("abcdefghi", sample(), **opts, count_tokens=len) == -0.75  # 9 characters


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("exact_match", "answer"),
        ("answer_tag", "answer"),
        ("count_match", "answer"),
        ("colour_match", "answer"),
        ("yes_no_match", "answer"),
        ("object_f1", "objects"),
        ("shapes_answer", "task"),
        ("box_iou", "box"),
        ("threshold_score", "answer"),
    ],
)
def test_missing_meta_field_names_field_function_and_sample(name: str, field: str) -> None:
    with pytest.raises(DataError, match=rf"reward '{name}': sample 'row-7' has no meta field '{field}'"):
        REWARD_FUNCTIONS[name]("3", sample())


def test_wrong_kind_of_ground_truth_is_an_error() -> None:
    with pytest.raises(DataError, match=r"count_match.*row-7.*'red'.*integer count"):
        count_match("3", sample(answer="red"))
    with pytest.raises(DataError, match=r"colour_match.*row-7.*'3'.*colour word"):
        colour_match("red", sample(answer="3"))
    with pytest.raises(DataError, match=r"yes_no_match.*'maybe'"):
        yes_no_match("yes", sample(answer="maybe"))
    with pytest.raises(DataError, match=r"object_f1.*list of object names"):
        object_f1("a red circle", sample(objects="red circle"))
