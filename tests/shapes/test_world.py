"""The shapes world: phrasing, parsing, scenes, rendering, tasks, POPE negatives and the files written."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from vlalign.shapes.render import render_scene
from vlalign.shapes.tasks import object_statistics, pope_negatives, read_manifest, task_rows, write_world
from vlalign.shapes.vocabulary import COLOUR_RGB, SHAPE_PLURALS, caption_from_counts, mentioned_objects, parse_objects
from vlalign.shapes.world import (
    Scene,
    WorldConfig,
    WorldObject,
    allowed_objects,
    generate_scene,
    generate_split,
    object_vocabulary,
    tokenizer_corpus,
)

SPLITS = ("train", "validation", "test", "compositional")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scenes_by_id(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["scene_id"], []).append(row)
    return out


# ----------------------------------------------------------------------------- phrasing and parsing


def test_caption_hand_written():
    """Groups in canonical order (circle before square before star), ``an`` before a vowel."""
    cfg = WorldConfig()
    objs = [
        WorldObject("square", "blue", 0.2, 0.2, 0.2),
        WorldObject("star", "orange", 0.2, 0.5, 0.5),
        WorldObject("circle", "red", 0.2, 0.8, 0.8),
        WorldObject("square", "blue", 0.2, 0.2, 0.8),
    ]
    scene = Scene("train-000001", "train", tuple(objs))
    assert scene.caption(cfg) == "The image shows a red circle, two blue squares and an orange star."
    assert caption_from_counts([(1, "green", "cross")]) == "The image shows a green cross."
    assert caption_from_counts([(3, "red", "cross"), (1, "blue", "star")]) == (
        "The image shows three red crosses and a blue star."
    )


def test_parse_objects_tricky_strings():
    text = "Two violet discs and no red circle, 3 Squares; an Orange star and some boxes."
    got = [(m.shape, m.colour, m.count) for m in parse_objects(text)]
    assert got == [
        ("circle", "purple", 2),
        ("circle", "red", 0),
        ("square", None, 3),
        ("star", "orange", 1),
        ("square", None, None),
    ]
    first = parse_objects(text)[0]
    assert text[first.start : first.end] == "Two violet discs"
    # negated and colourless mentions are not affirmed objects
    assert mentioned_objects(text) == ["purple circle", "orange star"]
    assert mentioned_objects("A grey plus next to a grey plus.") == ["gray cross"]
    assert mentioned_objects("Nothing here.") == []


def test_every_vocabulary_phrase_parses_to_its_object():
    cfg = WorldConfig(shapes=tuple(SHAPE_PLURALS), colours=tuple(COLOUR_RGB), heldout_combinations=())
    vocab = object_vocabulary(cfg)
    assert sorted(vocab) == sorted(cfg.objects) and len(vocab) == len(SHAPE_PLURALS) * len(COLOUR_RGB)
    for name, phrases in vocab.items():
        assert name in phrases
        for phrase in phrases:
            assert mentioned_objects(f"There is a {phrase} here.") == [name], phrase


def test_tokenizer_corpus_covers_every_word_written(world_dir: Path):
    def words(text: str) -> set[str]:
        return set(re.findall(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]", text))

    corpus_words = set().union(*(words(line) for line in tokenizer_corpus()))
    seen: set[str] = set()
    for row in read_jsonl(world_dir / "train.jsonl") + read_jsonl(world_dir / "pope_test_adversarial.jsonl"):
        seen |= words(row["prompt"][0]["content"][1]["text"]) | words(row["answer"])
    assert seen and seen <= corpus_words, seen - corpus_words
    everything = set(SHAPE_PLURALS) | set(SHAPE_PLURALS.values()) | set(COLOUR_RGB) | {str(d) for d in range(10)}
    assert everything <= corpus_words
    small = tokenizer_corpus(
        WorldConfig(shapes=("circle",), colours=("red",), heldout_combinations=(), cooccurrence={})
    )
    assert "Is there a red circle in the image?" in small and "square" not in " ".join(small)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shapes": ("circle", "blob")}, "WorldConfig.shapes: unknown shape"),
        ({"colours": ("red", "mauve")}, "WorldConfig.colours: unknown colour"),
        ({"max_objects": 10, "grid": 3}, "grid*grid"),
        ({"heldout_combinations": ("red circle",)}, "both held out and in a co-occurrence pair"),
        ({"cooccurrence": {"red circle": "pink star"}}, "'pink star'"),
        ({"tasks": ("describe", "dance")}, "WorldConfig.tasks: unknown task"),
        ({"pope_splits": ("dev",)}, "WorldConfig.pope_splits"),
        ({"cooccurrence_strength": 1.5}, "cooccurrence_strength"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        WorldConfig(**overrides)


# ----------------------------------------------------------------------------- scenes


def test_scenes_are_deterministic_and_valid():
    cfg = WorldConfig(seed=3)
    assert generate_scene(cfg, "train", 17) == generate_scene(WorldConfig(seed=3), "train", 17)
    assert generate_scene(cfg, "train", 17) != generate_scene(WorldConfig(seed=4), "train", 17)
    assert generate_scene(cfg, "train", 17) != generate_scene(cfg, "test", 17)
    half = 0.5 / cfg.grid
    for scene in generate_split(cfg, "train", 300):
        assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
        cells = set()
        for o in scene.objects:
            lo, hi = cfg.object_size
            assert lo / cfg.grid - 1e-4 <= o.size <= hi / cfg.grid + 1e-4
            col, row = int(o.x * cfg.grid), int(o.y * cfg.grid)
            # the object's box stays inside its own grid cell, so objects never overlap
            assert abs(o.x - (col + 0.5) / cfg.grid) + o.size / 2 <= half + 1e-4
            assert abs(o.y - (row + 0.5) / cfg.grid) + o.size / 2 <= half + 1e-4
            cells.add((row, col))
        assert len(cells) == len(scene.objects)


def _partner_rate(cfg: WorldConfig, n: int) -> float:
    scenes = generate_split(cfg, "train", n)
    with_anchor = [s for s in scenes if "red circle" in s.counts() and len(s.objects) >= 2]
    return sum("blue square" in s.counts() for s in with_anchor) / len(with_anchor)


def test_cooccurrence_strength_controls_the_partner_rate():
    """P(blue square | red circle, >= 2 objects): near the base rate (about 1/32 per extra draw,
    so below 0.2) without bias; with strength 1 the partner is missing only when the anchor was the
    last object drawn, so well above one half."""
    assert _partner_rate(WorldConfig(cooccurrence_strength=0.0), 3000) < 0.2
    assert _partner_rate(WorldConfig(cooccurrence_strength=1.0), 3000) > 0.6


def test_compositional_split_holds_exactly_the_unseen_combinations():
    cfg = WorldConfig()
    held = set(cfg.heldout_combinations)
    assert held.isdisjoint(allowed_objects(cfg, "train"))
    for split in ("train", "validation", "test"):
        for scene in generate_split(cfg, split, 300):
            assert held.isdisjoint(scene.counts()), scene
    for scene in generate_split(cfg, "compositional", 300):
        assert held & set(scene.counts()), scene


# ----------------------------------------------------------------------------- rendering


def test_every_shape_renders_in_its_colour_inside_its_box():
    cfg = WorldConfig(shapes=tuple(SHAPE_PLURALS), heldout_combinations=(), image_size=48)
    masks = {}
    for shape in SHAPE_PLURALS:
        obj = WorldObject(shape, "blue", 0.5, 0.5, 0.5)
        img = render_scene(Scene("x", "train", (obj,)), cfg)
        assert img.size == (48, 48) and img.mode == "RGB"
        assert img.getpixel((24, 24)) == COLOUR_RGB["blue"], shape
        assert img.getpixel((1, 1)) == tuple(cfg.background)
        painted = {(x, y) for x in range(48) for y in range(48) if img.getpixel((x, y)) != tuple(cfg.background)}
        xs, ys = [p[0] for p in painted], [p[1] for p in painted]
        assert min(xs) >= 12 - 1 and max(xs) <= 36 and min(ys) >= 12 - 1 and max(ys) <= 36, shape
        masks[shape] = painted
    # legibility: any two shapes differ in at least 8% of the box's pixels (24 x 24 = 576)
    for a in masks:
        for b in masks:
            if a < b:
                assert len(masks[a] ^ masks[b]) >= 0.08 * 576, (a, b, len(masks[a] ^ masks[b]))


def test_render_scene_resolution_and_determinism():
    cfg = WorldConfig()
    scene = generate_scene(cfg, "test", 5)
    assert render_scene(scene, cfg, 64).size == (64, 64)
    assert render_scene(scene, cfg).tobytes() == render_scene(scene, cfg).tobytes()
    for o in scene.objects:  # the centre of every object shows its colour
        px = render_scene(scene, cfg, 96).getpixel((int(o.x * 96), int(o.y * 96)))
        assert max(abs(a - b) for a, b in zip(px, COLOUR_RGB[o.colour])) <= 40, (o, px)


# ----------------------------------------------------------------------------- POPE negatives


def test_pope_negatives_hand_worked():
    """popular: absent objects by scene frequency, green star (9) then blue square (5).
    adversarial with present {red circle, green star}: co-occurrence sums blue square 1+3 = 4,
    yellow cross 2+0 = 2, pink heart 0, so blue square then yellow cross."""
    candidates = ["red circle", "blue square", "green star", "yellow cross", "pink heart"]
    freq = {"red circle": 10, "blue square": 5, "green star": 9, "yellow cross": 1, "pink heart": 3}
    cooc = {"red circle": {"blue square": 1, "yellow cross": 2}, "green star": {"blue square": 3}}
    rng = random.Random(0)
    assert pope_negatives(["red circle"], candidates, 2, "popular", freq, cooc, rng) == ["green star", "blue square"]
    got = pope_negatives(["red circle", "green star"], candidates, 2, "adversarial", freq, cooc, rng)
    assert got == ["blue square", "yellow cross"]
    rand = pope_negatives(["red circle"], candidates, 3, "random", freq, cooc, rng)
    assert len(set(rand)) == 3 and "red circle" not in rand and set(rand) <= set(candidates)
    assert len(pope_negatives(["red circle"], candidates, 9, "popular", freq, cooc, rng)) == 4
    with pytest.raises(ValueError, match="unknown POPE mode"):
        pope_negatives([], candidates, 1, "hard", freq, cooc, rng)


def test_object_statistics_hand_worked():
    a = WorldObject("circle", "red", 0.2, 0.2, 0.2)
    b = WorldObject("square", "blue", 0.2, 0.5, 0.5)
    scenes = [Scene("s1", "train", (a, b, b)), Scene("s2", "train", (a,))]
    freq, cooc = object_statistics(scenes)
    assert freq == {"red circle": 2, "blue square": 1}
    assert cooc == {"red circle": {"blue square": 1}, "blue square": {"red circle": 1}}


# ----------------------------------------------------------------------------- written datasets


def test_files_rows_and_manifest(world_dir: Path, world_cfg: WorldConfig):
    manifest = read_manifest(world_dir)
    assert manifest["scenes"] == {"train": 150, "validation": 20, "test": 40, "compositional": 30}
    for name, info in manifest["files"].items():
        assert hashlib.sha256((world_dir / name).read_bytes()).hexdigest() == info["sha256"]
        assert len(read_jsonl(world_dir / name)) == info["rows"]
    assert sorted(manifest["object_vocabulary"]) == sorted(world_cfg.objects)
    train = [rows[0]["objects"] for rows in scenes_by_id(read_jsonl(world_dir / "train_prompts.jsonl")).values()]
    for anchor, partner in world_cfg.partners.items():
        holding = [objs for objs in train if anchor in objs]
        rate = sum(partner in objs for objs in holding) / len(holding)
        assert manifest["cooccurrence_rates"][anchor] == pytest.approx(rate, abs=1e-12)
    for split in SPLITS:
        sft, prompts = read_jsonl(world_dir / f"{split}.jsonl"), read_jsonl(world_dir / f"{split}_prompts.jsonl")
        assert [r["id"] for r in sft] == [r["id"] for r in prompts]
        for row, prompt_row in zip(sft, prompts):
            assert "completion" not in prompt_row
            assert row["completion"] == [{"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
            assert len(row["images"]) == 1 and (world_dir / row["images"][0]).is_file()
            assert [p["type"] for p in row["prompt"][0]["content"]] == ["image", "text"]


def test_write_world_is_deterministic(tmp_path: Path, world_dir: Path, world_cfg: WorldConfig):
    again = write_world(world_cfg, tmp_path / "again")
    assert again == read_manifest(world_dir)
    for split in SPLITS:
        for png in sorted((world_dir / "images" / split).iterdir())[:20]:
            assert png.read_bytes() == (tmp_path / "again" / "images" / split / png.name).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_world(world_cfg, tmp_path / "again")


def test_splits_never_share_a_scene(world_dir: Path):
    ids, layouts, images = {}, {}, {}
    for split in SPLITS:
        scenes = scenes_by_id(read_jsonl(world_dir / f"{split}_prompts.jsonl"))
        ids[split] = set(scenes)
        layouts[split] = {json.dumps(rows[0]["scene_objects"]) for rows in scenes.values()}
        images[split] = {p.read_bytes() for p in (world_dir / "images" / split).iterdir()}
        assert len(images[split]) == len(scenes)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert ids[a].isdisjoint(ids[b]) and layouts[a].isdisjoint(layouts[b])
                assert images[a].isdisjoint(images[b])


def test_compositional_file_combinations(world_dir: Path, world_cfg: WorldConfig):
    held = set(world_cfg.heldout_combinations)
    for split in ("train", "validation", "test"):
        for row in read_jsonl(world_dir / f"{split}.jsonl"):
            assert held.isdisjoint(row["objects"]) and row.get("question_object") not in held
    for rows in scenes_by_id(read_jsonl(world_dir / "compositional_prompts.jsonl")).values():
        assert held & set(rows[0]["objects"])


def test_answers_match_the_scene(world_dir: Path):
    tasks: dict[str, int] = {}
    zero_counts = 0
    for row in read_jsonl(world_dir / "train_prompts.jsonl") + read_jsonl(world_dir / "compositional_prompts.jsonl"):
        objs = row["scene_objects"]
        names = {f"{o['colour']} {o['shape']}" for o in objs}
        assert set(row["objects"]) == names
        task = row["task"]
        tasks[task] = tasks.get(task, 0) + 1
        if task == "counting":
            count = sum(o["shape"] == row["question_shape"] for o in objs)
            assert row["answer"] == str(count)
            zero_counts += count == 0
        elif task == "colour":
            same = [o for o in objs if o["shape"] == row["question_shape"]]
            assert len(same) == 1 and row["answer"] == same[0]["colour"]
        elif task == "existence":
            assert row["answer"] == ("Yes" if row["question_object"] in names else "No")
        else:
            mentions = parse_objects(row["answer"])
            said = {(m.name, m.count) for m in mentions}
            truth = {(n, sum(f"{o['colour']} {o['shape']}" == n for o in objs)) for n in names}
            assert said == truth and len(mentions) == len(names)
            assert mentioned_objects(row["answer"]) == row["objects"]
    assert tasks["describe"] == 180 and tasks["existence"] == 360 and tasks["counting"] == 180
    assert 0 < tasks["colour"] <= 180 and zero_counts > 0
    yes = sum(r["answer"] == "Yes" for r in read_jsonl(world_dir / "train.jsonl") if r["task"] == "existence")
    assert yes == 150  # one present and one absent object per scene


def _expected_negatives(row_objs, candidates, k, mode, manifest):
    freq, cooc = manifest["train_object_frequency"], manifest["train_cooccurrence"]
    absent = [c for c in candidates if c not in row_objs]
    if mode == "popular":
        return sorted(absent, key=lambda n: (-freq.get(n, 0), candidates.index(n)))[:k]
    score = {n: sum(cooc.get(p, {}).get(n, 0) for p in row_objs) for n in absent}
    return sorted(absent, key=lambda n: (-score[n], -freq.get(n, 0), candidates.index(n)))[:k]


@pytest.mark.parametrize("split", ["test", "compositional"])
def test_pope_files_follow_their_sampling_rule(world_dir: Path, world_cfg: WorldConfig, split: str):
    manifest = read_manifest(world_dir)
    candidates = allowed_objects(world_cfg, split)
    negatives_seen: dict[str, set[str]] = {}
    for mode in ("random", "popular", "adversarial"):
        scenes = scenes_by_id(read_jsonl(world_dir / f"pope_{split}_{mode}.jsonl"))
        assert len(scenes) == manifest["scenes"][split]
        negatives_seen[mode] = set()
        for rows in scenes.values():
            objs = rows[0]["objects"]
            yes = [r["question_object"] for r in rows if r["answer"] == "Yes"]
            no = [r["question_object"] for r in rows if r["answer"] == "No"]
            assert len(yes) == len(no) == min(world_cfg.pope_per_scene, len(objs))
            assert set(yes) <= set(objs) and len(set(yes)) == len(yes)
            assert set(no).isdisjoint(objs) and set(no) <= set(candidates) and len(set(no)) == len(no)
            assert all(r["pope_mode"] == mode and r["task"] == "existence" for r in rows)
            if mode != "random":
                assert no == _expected_negatives(objs, candidates, len(no), mode, manifest)
            negatives_seen[mode] |= set(no)
    assert len(negatives_seen["random"]) > len(negatives_seen["popular"])


def test_adversarial_pope_asks_for_the_cooccurring_partner(world_dir: Path, world_cfg: WorldConfig):
    """Where a pair's anchor is present and its partner absent, adversarial POPE asks about the partner."""
    partners = world_cfg.partners
    asked = total = 0
    for rows in scenes_by_id(read_jsonl(world_dir / "pope_test_adversarial.jsonl")).values():
        objs = rows[0]["objects"]
        no = {r["question_object"] for r in rows if r["answer"] == "No"}
        for name in objs:
            if name in partners and partners[name] not in objs:
                total += 1
                asked += partners[name] in no
    assert total > 0 and asked == total


def test_task_rows_respect_task_selection():
    cfg = WorldConfig(tasks=("counting",), counting_per_scene=3)
    rows = task_rows(generate_scene(cfg, "train", 0), cfg)
    assert [r["task"] for r in rows] == ["counting"] * 3
    assert len({r["id"] for r in rows}) == 3


def test_world_command(tmp_path: Path, capsys: pytest.CaptureFixture):
    from vlalign.cli import main

    out = tmp_path / "w"
    args = [
        "world",
        f"--out={out}",
        "--world.n_train=6",
        "--world.n_validation=2",
        "--world.n_test=3",
        "--world.n_compositional=0",
        "--world.image_size=32",
        "--world.tasks=describe,counting",
    ]
    assert main(args) == 0
    manifest = read_manifest(out)
    assert manifest["scenes"] == {"train": 6, "validation": 2, "test": 3}
    assert manifest["files"]["train.jsonl"]["rows"] == 12 and "pope_test_random.jsonl" in manifest["files"]
    assert "train.jsonl" in capsys.readouterr().out
    assert main(["world", f"--out={tmp_path / 'x'}", "--world.shapes=circle,blob"]) == 2
    assert "WorldConfig.shapes: unknown shape(s) ['blob']" in capsys.readouterr().err
    assert main(["world", "--help"]) == 0
    assert "cooccurrence_strength" in capsys.readouterr().out
