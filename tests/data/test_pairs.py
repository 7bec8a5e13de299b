"""Preference-pair construction: each method on fixed scenes gives the pair it should; scorers by
hand; sample-and-rank never prefers the worse response; missing annotations are clear errors."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlalign.cli import main
from vlalign.commands.pairs import Config as PairsConfig
from vlalign.commands.pairs import run as run_pairs
from vlalign.config import load_config
from vlalign.data.annotations import Annotations, ObjectVocabulary
from vlalign.data.io import load_samples
from vlalign.data.pairs import margin_summary
from vlalign.data.pairs.corrupt import CorruptConfig, corrupt_image, corrupt_pairs, patch_boxes
from vlalign.data.pairs.inject import InjectConfig, Injector, ObjectStats, inject_pairs
from vlalign.data.pairs.rank import rank_pairs, sample_and_rank
from vlalign.data.schema import DataError, PromptSample, SupervisedSample, user_prompt
from vlalign.errors import UserError
from vlalign.eval.scorers import ClaimVerifier, GroundTruthScorer
from vlalign.shapes.world import WorldConfig, object_vocabulary

VOCAB = ObjectVocabulary(object_vocabulary(WorldConfig()))


def scene(sid: str, names: list[str], completion: str, task: str = "describe", **meta: Any) -> SupervisedSample:
    """A describe (or QA) row of a scene holding one object per name (repeats allowed)."""
    objs = [{"colour": n.split()[0], "shape": n.split()[1]} for n in names]
    question = meta.pop("question", "Describe the image.")
    return SupervisedSample(
        f"{sid}/{task}",
        [f"{sid}.png"],
        user_prompt(question),
        completion,
        {
            "task": task,
            "scene_id": sid,
            "objects": sorted(set(names)),
            "scene_objects": objs,
            "answer": completion,
            **meta,
        },
    )


@pytest.fixture
def scenes() -> list[SupervisedSample]:
    """red circle co-occurs with blue square (2 images) and with green circle (1 image)."""
    return [
        scene("a", ["red circle"], "The image shows a red circle."),
        scene("b", ["red circle", "blue square"], "The image shows a red circle and a blue square."),
        scene("d", ["red circle", "blue square"], "The image shows a red circle and a blue square."),
        scene("c", ["red circle", "green circle"], "The image shows a red circle and a green circle."),
    ]


# ----------------------------------------------------------------------------- injection


def test_inject_kinds_on_fixed_scene(scenes: list[SupervisedSample]) -> None:
    """On scene a (one red circle): add -> the most co-occurring absent object (blue square, in 2
    images with a red circle), in canonical order; attribute -> the co-occurring circle variant
    (green circle); count -> one becomes two, plural."""
    injector = Injector(VOCAB, ObjectStats.from_samples(scenes))
    ann = Annotations(frozenset({"red circle"}), {"red circle": 1})
    text = scenes[0].completion
    rng = random.Random(0)
    assert injector.describe(text, ann, "add", rng).text == "The image shows a red circle and a blue square."
    assert injector.describe(text, ann, "attribute", rng).text == "The image shows a green circle."
    assert injector.describe(text, ann, "count", rng).text == "The image shows two red circles."


def test_inject_noun_swaps_the_shape_and_keeps_the_colour(scenes: list[SupervisedSample]) -> None:
    """noun: the absent object with the same colour that co-occurs most with those present (red
    square, seen once beside a red circle); in free text the noun alone is replaced, and a plural
    phrase is left alone (with the reason)."""
    injector = Injector(VOCAB, ObjectStats.from_samples([*scenes, scene("e", ["red circle", "red square"], "x")]))
    ann = Annotations(frozenset({"red circle"}), {"red circle": 1})
    made = injector.describe(scenes[0].completion, ann, "noun", random.Random(0))
    assert (made.text, made.kind, made.detail) == ("The image shows a red square.", "noun", "red circle -> red square")
    free = injector.describe("A red circle sits here.", ann, "noun", random.Random(0))
    assert free.text == "A red square sits here."
    two = Annotations(frozenset({"blue square"}), {"blue square": 2})
    assert injector.describe("Two blue squares.", two, "noun", random.Random(0)) == "no noun to swap in 'blue squares'"
    every = Annotations(frozenset(VOCAB.names), None)
    assert injector.describe("A red circle.", every, "noun", random.Random(0)) == "no absent noun variant"


def test_inject_non_canonical_text_and_reasons(scenes: list[SupervisedSample]) -> None:
    injector = Injector(VOCAB, ObjectStats.from_samples(scenes))
    ann = Annotations(frozenset({"red circle", "blue square"}), {"red circle": 1, "blue square": 3})
    text = "A red circle sits left of 3 blue boxes."
    rng = random.Random(0)
    add = injector.describe(text, ann, "add", rng).text
    assert add == "A red circle sits left of 3 blue boxes and a green circle."
    for words, options in [
        ("Three blue boxes sit here.", {"Two blue boxes sit here.", "Four blue boxes sit here."}),
        ("There are 3 blue boxes.", {"There are 2 blue boxes.", "There are 4 blue boxes."}),
        ("A red circle sits here.", {"Two red circles sits here."}),
    ]:
        assert injector.describe(words, ann, "count", random.Random(1)).text in options
    full = Annotations(frozenset(VOCAB.names), None)
    assert injector.describe("The image shows a red circle.", full, "add", rng) == "no absent object to add"


def test_inject_short_answers(scenes: list[SupervisedSample]) -> None:
    injector = Injector(VOCAB, ObjectStats.from_samples(scenes))
    ann = Annotations(frozenset({"red circle"}), {"red circle": 1})
    rng = random.Random(0)
    no = scene("a", ["red circle"], "No", task="existence", question_object="blue square")
    assert injector.short_answer(no, "No", ann, rng).text == "Yes"
    yes = scene("a", ["red circle"], "Yes", task="existence")
    assert injector.short_answer(yes, "Yes", ann, rng) == "asks about a present object"
    denying = Injector(VOCAB, ObjectStats.from_samples(scenes), deny_present=True)
    assert denying.short_answer(yes, "Yes", ann, rng).text == "No"  # a present object denied
    assert denying.short_answer(no, "No", ann, rng).text == "Yes"
    count = scene("a", ["red circle"], "1", task="counting", question_shape="circle")
    assert injector.short_answer(count, "1", ann, rng).text == "2"
    colour = scene("a", ["red circle"], "red", task="colour", question_shape="circle")
    assert injector.short_answer(colour, "red", ann, rng).text == "green"  # the co-occurring variant


def test_inject_pairs_dataset(scenes: list[SupervisedSample]) -> None:
    rows = scenes + [
        scene("a", ["red circle"], "No", task="existence", question_object="blue square"),
        scene("a", ["red circle"], "Yes", task="existence"),
    ]
    pairs, stats = inject_pairs(rows, VOCAB, InjectConfig(probes_per_image=1, seed=0, balance_existence=False))
    assert stats.inputs == 6 and stats.dropped == {"asks about a present object": 1}
    assert stats.made == len(pairs) == 5 + 4  # 5 injections + one probe per image
    for p in pairs:
        assert p.chosen != p.rejected and p.meta["source"].startswith("inject-")
        assert p.meta["margin"] > 0  # the rejected response always scores lower under the claim verifier
    probe = next(p for p in pairs if p.id == "a/probe/0")
    assert (probe.chosen, probe.rejected, probe.meta["question_object"]) == ("No", "Yes", "blue square")
    assert probe.prompt[0]["content"][-1]["text"] == "Is there a blue square in the image?"
    again, _ = inject_pairs(rows, VOCAB, InjectConfig(probes_per_image=1, seed=0, balance_existence=False))
    assert [(p.id, p.rejected) for p in again] == [(p.id, p.rejected) for p in pairs]


def test_balanced_existence_pairs_prefer_yes_as_often_as_no(scenes: list[SupervisedSample]) -> None:
    """With balance_existence (the default) the existence pairs do not all prefer "No": the row about
    a present object gives (Yes > No), and every image gets a present-object probe beside its absent one."""
    rows = scenes + [
        scene("a", ["red circle"], "No", task="existence", question_object="blue square"),
        scene("a", ["red circle"], "Yes", task="existence", question_object="red circle"),
    ]
    pairs, stats = inject_pairs(rows, VOCAB, InjectConfig(probes_per_image=1, seed=0))
    assert stats.dropped == {}
    existence = [p for p in pairs if p.meta.get("task") == "existence"]
    assert sorted((p.chosen, p.rejected) for p in existence).count(("Yes", "No")) == len(existence) // 2
    assert len(existence) == 2 + 2 * 4  # the two rows, then one absent and one present probe per image
    present = next(p for p in pairs if p.id == "a/probe-present/0")
    assert (present.chosen, present.rejected, present.meta["question_object"]) == ("Yes", "No", "red circle")
    assert stats.made == len(pairs) == 4 + 2 + 2 * 4


def test_inject_without_annotations_is_a_clear_error() -> None:
    rows = [SupervisedSample("x1", ["x.png"], user_prompt("Describe the image."), "A cat.", {})]
    with pytest.raises(DataError, match="'x1'.*object annotations.*hallucination injection"):
        inject_pairs(rows, VOCAB)
    with pytest.raises(DataError, match="'x1'.*object annotations.*claim verifier"):
        ClaimVerifier(VOCAB)([PromptSample("x1", [], user_prompt("Describe.", 0), {"task": "describe"})], ["A cat."])


# ----------------------------------------------------------------------------- scorers and ranking


TRUTH = PromptSample(
    "s",
    [],
    user_prompt("Describe the image.", 0),
    {
        "task": "describe",
        "objects": ["blue square", "red circle"],
        "scene_objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}],
    },
)
RESPONSES = {  # text: (claim score, ground-truth F1), worked out in test_scorers_hand
    "The image shows a red circle and a blue square.": (1.0, 1.0),
    "The image shows a red circle, a blue square and a green star.": (0.75, 0.8),
    "The image shows two red circles and a blue square.": (0.5, 0.5),
    "The image shows a red circle.": (0.5, 2 / 3),
    "There is no blue square.": (-0.25, 0.0),
}


def test_scorers_hand() -> None:
    """Reference: 2 objects x (existence + count) = 4 claims. Added green star: 4 true, 1 false
    -> 3/4; two red circles: count false -> (3 - 1)/4; only the red circle: 2/4; "no blue square":
    one false claim -> -1/4. F1 of (object, count) pairs: {rc1, bs1, gs1} vs {rc1, bs1} -> 4/5;
    {rc2, bs1} -> 1/2; {rc1} -> 2/3; {} -> 0."""
    texts = list(RESPONSES)
    claims = ClaimVerifier(VOCAB)([TRUTH] * len(texts), texts)
    truth = GroundTruthScorer(VOCAB)([TRUTH] * len(texts), texts)
    for text, c, g in zip(texts, claims, truth):
        assert (c, g) == pytest.approx(RESPONSES[text], abs=1e-12), text
    qa = PromptSample("q", [], user_prompt("How many?", 0), {"task": "counting", "answer": "2"})
    assert GroundTruthScorer()([qa, qa], ["two", "3"]) == [1.0, 0.0]


@pytest.mark.parametrize("pairing", ["best_worst", "all"])
def test_perfect_scorer_never_prefers_the_worse(pairing: str) -> None:
    """Random groups of responses ranked by the ground truth: every pair's chosen response is
    strictly better by the ground truth, and its gap reaches the threshold."""
    rng = random.Random(0)
    texts = list(RESPONSES)
    samples = [PromptSample(f"s{i}", [], TRUTH.prompt, TRUTH.meta) for i in range(40)]
    groups = [[rng.choice(texts) for _ in range(4)] for _ in samples]
    pairs, stats = sample_and_rank(
        samples, groups, GroundTruthScorer(VOCAB), threshold=0.2, pairing=pairing, max_pairs_per_prompt=3
    )
    assert pairs and stats.made == len(pairs)
    for p in pairs:
        assert RESPONSES[p.chosen][1] - RESPONSES[p.rejected][1] >= 0.2
        assert p.meta["margin"] == pytest.approx(p.meta["chosen_score"] - p.meta["rejected_score"])
    assert sum(stats.dropped.values()) + len({p.id.split("/")[0] for p in pairs}) == 40


def test_rank_pairs_drop_reasons() -> None:
    s = [PromptSample(f"p{i}", [], user_prompt("q", 0), {}) for i in range(4)]
    groups = [["a", "a"], ["a", "b"], ["a", "b"], ["a", "b", "c"]]
    scores = [[1.0, 1.0], [0.5, 0.5], [0.6, 0.5], [0.0, 1.0, 0.5]]
    pairs, stats = rank_pairs(s, groups, scores, threshold=0.2)
    assert stats.dropped == {
        "fewer than 2 distinct responses": 1,
        "all scores equal": 1,
        "score gap below threshold": 1,
    }
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a")]
    assert margin_summary([0.5, 1.0, 2.0])["p50"] == 1.0


# ----------------------------------------------------------------------------- image corruption


def _checker(size: int = 40) -> Image.Image:
    """A smooth image where every pixel differs from the others (no two crops look alike)."""
    y, x = np.indices((size, size))
    return Image.fromarray(np.stack([5 * x + y, 5 * y + x // 2, (x * y) % 256], -1).astype(np.uint8), "RGB")


@pytest.mark.parametrize("method", ["crop", "mask", "noise"])
def test_corruption_is_deterministic_and_level_zero_is_identity(method: str) -> None:
    img = _checker()
    a = corrupt_image(img, method, 0.6, seed=5)
    b = corrupt_image(img, method, 0.6, seed=5)
    c = corrupt_image(img, method, 0.6, seed=6)
    assert a.size == img.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert np.array_equal(np.asarray(corrupt_image(img, method, 0.0, seed=5)), np.asarray(img))
    with pytest.raises(ValueError, match="level"):
        corrupt_image(img, method, 1.5, seed=0)


def test_mask_paints_the_right_number_of_patches() -> None:
    """grid 2, level 0.5: exactly 2 of the 4 patches become the mean colour, the others are untouched."""
    img = _checker()
    out = np.asarray(corrupt_image(img, "mask", 0.5, seed=1, grid=2))
    src = np.asarray(img)
    mean = src.reshape(-1, 3).mean(0).round()
    painted = 0
    for left, top, right, bottom in patch_boxes(img.size, 2):
        patch = out[top:bottom, left:right]
        if (patch == mean).all():
            painted += 1
        else:
            assert np.array_equal(patch, src[top:bottom, left:right])
    assert painted == 2


def test_noise_follows_the_diffusion_step() -> None:
    """On mid-grey (x = 0 after scaling) the output is sqrt(level) * eps * 127.5: std 25.5 at
    level 0.04 (within 3 %, 48 000 pixels); at level 1 the image no longer matters."""
    grey = Image.new("RGB", (160, 100), (127, 127, 127))
    out = np.asarray(corrupt_image(grey, "noise", 0.04, seed=0), dtype=np.float64)
    assert abs(out.std() - 25.5) / 25.5 < 0.03 and abs(out.mean() - 127.0) < 1.0
    black = Image.new("RGB", (160, 100), (0, 0, 0))
    a, b = corrupt_image(grey, "noise", 1.0, 3), corrupt_image(black, "noise", 1.0, 3)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_crop_keeps_the_requested_area() -> None:
    """level 0.75 keeps a window of half the side: resizing the corrupted image back down to that
    window's size finds it inside the original."""
    img = _checker(40)
    out = corrupt_image(img, "crop", 0.75, seed=2).resize((20, 20), Image.Resampling.BICUBIC)
    src = np.asarray(img, dtype=np.float64)
    best = min(
        np.abs(src[y : y + 20, x : x + 20] - np.asarray(out, dtype=np.float64)).mean()
        for y in range(21)
        for x in range(21)
    )
    assert best < 12.0


def test_corrupt_pairs_same_response_corrupted_image(scenes: list[SupervisedSample]) -> None:
    rows = [SupervisedSample("r", [_checker()], user_prompt("Describe the image."), "Text.", {})]
    pairs, stats = corrupt_pairs(
        rows + [SupervisedSample("n", [], user_prompt("Q", 0), "A", {})], CorruptConfig(method="mask", level=0.5)
    )
    assert len(pairs) == 1 and stats.dropped == {"no image": 1}
    p = pairs[0]
    assert p.chosen == p.rejected == "Text." and p.meta["source"] == "corrupt-mask"
    assert isinstance(p.meta["rejected_images"][0], Image.Image) and p.meta["margin"] > 0


# ----------------------------------------------------------------------------- the command


def test_vlalign_pairs_command(world_dir: Path, tmp_path: Path, tiny_model_dir: Callable[..., Path]) -> None:
    out = tmp_path / "inject.jsonl"
    assert main(["pairs", f"--data={world_dir / 'train.jsonl'}", f"--out={out}", "--limit=40"]) == 0
    pairs = load_samples(out, "preference")
    stats = json.loads((tmp_path / "inject.stats.json").read_text())
    assert stats["made"] == len(pairs) > 0 and stats["margin"]["n"] == len(pairs)
    assert all(p.chosen != p.rejected for p in pairs)
    out = tmp_path / "noise.jsonl"
    assert (
        main(
            [
                "pairs",
                "--method=corrupt",
                "--corrupt.method=noise",
                "--corrupt.level=0.5",
                f"--data={world_dir / 'train.jsonl'}",
                f"--out={out}",
                "--limit=6",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all((tmp_path / r["rejected_images"][0]).is_file() for r in rows)
    assert len({r["scene_id"] for r in rows}) == len({r["rejected_images"][0] for r in rows}) < len(rows)
    out = tmp_path / "rank.jsonl"
    assert (
        main(
            [
                "pairs",
                "--method=rank",
                f"--rank.model={tiny_model_dir('qwen2_vl')}",
                "--rank.n=3",
                "--rank.max_new_tokens=4",
                "--rank.scorer=ground_truth",
                "--rank.threshold=0.5",
                "--rank.device=cpu",
                f"--data={world_dir / 'test_prompts.jsonl'}",
                f"--out={out}",
                "--limit=12",
            ]
        )
        == 0
    )
    stats = json.loads((tmp_path / "rank.stats.json").read_text())
    assert stats["inputs"] == 12 and stats["made"] + stats["dropped_total"] == 12


def test_vlalign_pairs_tasks_filter_comes_before_the_limit(world_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "describe.jsonl"
    assert (
        main(["pairs", f"--data={world_dir / 'train.jsonl'}", f"--out={out}", "--tasks=[describe]", "--limit=5"]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert json.loads((tmp_path / "describe.stats.json").read_text())["inputs"] == 5
    assert rows and {r["task"] for r in rows} == {"describe"} and len({r["scene_id"] for r in rows}) <= 5
    with pytest.raises(ValueError, match=r"no row has a task in tasks=\['juggling'\]"):
        main(["pairs", f"--data={world_dir / 'train.jsonl'}", f"--out={tmp_path / 'none.jsonl'}", "--tasks=[juggling]"])


def test_vlalign_pairs_refuses_to_overwrite_its_output(
    world_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run onto an existing --out stops before reading any data, with one line naming the
    file and the option, and leaves the file as it was; --overwrite=true replaces it."""
    out = tmp_path / "pairs.jsonl"
    args = ["pairs", f"--data={world_dir / 'train.jsonl'}", f"--out={out}", "--limit=4"]
    assert main(args) == 0
    before = out.read_text()
    capsys.readouterr()
    assert main([*args[:-1], "--limit=8", "--data=missing.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vlalign pairs: {out} already exists; pass --overwrite=true to replace it, or choose another --out"
    assert out.read_text() == before
    with pytest.raises(UserError, match="already exists"):
        run_pairs(load_config(PairsConfig, None, [f"--out={out}"]))
    assert main([*args[:-1], "--limit=8", "--overwrite=true"]) == 0
    assert out.read_text() != before and len(load_samples(out, "preference")) > len(before.splitlines())
