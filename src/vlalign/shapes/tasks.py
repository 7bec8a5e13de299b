"""Shapes-world tasks, POPE negatives, and writing the world's datasets to disk.

:func:`write_world` writes, under one folder (every image path is relative to it)::

    images/<split>/<scene id>.png       one image per scene
    <split>.jsonl                       supervised rows (prompt + completion), all tasks
    <split>_sft.jsonl                   the fine-tuning mix: each scene's description, and one
                                        multi-turn conversation of its short-answer questions
    <split>_prompts.jsonl               the same questions as prompt-only rows (evaluation, RL)
    pope_<split>_<mode>.jsonl           POPE rows, mode in random / popular / adversarial
    <split>_video[_prompts].jsonl       with ``video_clips`` > 0 only: "Which shape moved?" clips
                                        (frames under videos/<split>/; :mod:`vlalign.shapes.video`)
    manifest.json                       config, files (rows, sha256), object vocabulary, statistics
                                        (train object frequency, co-occurrence, partner rates)

for the splits ``train``, ``validation``, ``test`` and ``compositional``. Rows use the TRL vision
layout: ``images`` (list of relative paths), ``prompt`` (user message with one
``{"type": "image"}`` part), and in supervised files ``completion`` (one assistant message). The
other columns are ground truth (they land in a sample's ``meta`` when loaded):

- ``id``, ``split``, ``scene_id``, ``task`` (describe / existence / counting / colour; POPE rows
  are existence questions with ``pope_mode`` set);
- ``answer``: the canonical answer (also the completion);
- ``objects``: distinct object names present (``"red circle"``), canonical order - the object
  annotation that CHAIR and hallucination injection use, with ``manifest["object_vocabulary"]``;
- ``scene_objects``: every object with shape, colour, size and centre (fractions of the side);
- ``question_object`` (existence) or ``question_shape`` (counting, colour).

POPE negatives (as in Li et al. 2023) per scene: as many absent objects as present ones asked
about, chosen *random*ly among the absent objects, as the most *popular* absent objects (most
train scenes containing them), or *adversarial*ly as the absent objects that co-occur most with
the present ones (sum over present objects of the train scenes holding both; ties broken by
popularity, then canonical order). Statistics come from the train split.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

from vlalign.config import to_dict
from vlalign.data.io import write_jsonl
from vlalign.shapes.render import render_scene
from vlalign.shapes.video import supervised_clip_row, write_clips
from vlalign.shapes.vocabulary import DESCRIBE_PROMPT, NO, YES, colour_question, counting_question, existence_question
from vlalign.shapes.world import SPLITS, Scene, WorldConfig, allowed_objects, generate_split, object_vocabulary

POPE_MODES: tuple[str, ...] = ("random", "popular", "adversarial")
Row = dict[str, Any]


# ----------------------------------------------------------------------------- statistics


def object_statistics(scenes: list[Scene]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Per object name, the number of scenes holding it; per pair, the scenes holding both."""
    freq: dict[str, int] = {}
    cooc: dict[str, dict[str, int]] = {}
    for scene in scenes:
        names = sorted(set(scene.counts()))
        for a in names:
            freq[a] = freq.get(a, 0) + 1
            row = cooc.setdefault(a, {})
            for b in names:
                if b != a:
                    row[b] = row.get(b, 0) + 1
    return freq, cooc


def pope_negatives(
    present: list[str],
    candidates: list[str],
    k: int,
    mode: str,
    freq: dict[str, int],
    cooc: dict[str, dict[str, int]],
    rng: random.Random,
) -> list[str]:
    """``k`` absent objects for POPE, chosen from ``candidates`` by ``mode`` (see module doc)."""
    absent = [c for c in candidates if c not in set(present)]
    if mode == "random":
        return rng.sample(absent, min(k, len(absent)))
    order = {name: i for i, name in enumerate(absent)}
    if mode == "popular":
        ranked = sorted(absent, key=lambda n: (-freq.get(n, 0), order[n]))
    elif mode == "adversarial":

        def score(n: str) -> int:
            return sum(cooc.get(p, {}).get(n, 0) for p in present)

        ranked = sorted(absent, key=lambda n: (-score(n), -freq.get(n, 0), order[n]))
    else:
        raise ValueError(f"unknown POPE mode {mode!r}; choose from {list(POPE_MODES)}")
    return ranked[:k]


# ----------------------------------------------------------------------------- rows


def _prompt(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def image_path(scene: Scene) -> str:
    """Path of a scene's image relative to the dataset folder."""
    return f"images/{scene.split}/{scene.id}.png"


def _row(scene: Scene, cfg: WorldConfig, task: str, k: int, question: str, answer: str, **extra: Any) -> Row:
    row: Row = {
        "id": f"{scene.id}/{task}/{k}",
        "images": [image_path(scene)],
        "prompt": _prompt(question),
        "task": task,
        "answer": answer,
        "split": scene.split,
        "scene_id": scene.id,
        "objects": scene.object_names(cfg),
        "scene_objects": [o.to_dict() for o in scene.objects],
    }
    row.update(extra)
    return row


def task_rows(scene: Scene, cfg: WorldConfig) -> list[Row]:
    """The prompt-only rows of one scene (every configured task), with ground truth."""
    rng = random.Random(f"vlalign-shapes-tasks/{cfg.seed}/{scene.id}")
    rows: list[Row] = []
    present = scene.object_names(cfg)
    if "describe" in cfg.tasks:
        rows.append(_row(scene, cfg, "describe", 0, DESCRIBE_PROMPT, scene.caption(cfg)))
    if "existence" in cfg.tasks:
        absent = [n for n in allowed_objects(cfg, scene.split) if n not in set(present)]
        for k in range(cfg.existence_per_scene):
            yes = k % 2 == 0 or not absent
            name = rng.choice(present if yes else absent)
            rows.append(
                _row(scene, cfg, "existence", k, existence_question(name), YES if yes else NO, question_object=name)
            )
    shape_counts = scene.shape_counts()
    if "counting" in cfg.tasks:
        absent_shapes = [s for s in cfg.shapes if s not in shape_counts]
        for k in range(cfg.counting_per_scene):
            pool = absent_shapes if absent_shapes and rng.random() < cfg.count_absent_prob else list(shape_counts)
            shape = rng.choice(pool)
            rows.append(
                _row(
                    scene,
                    cfg,
                    "counting",
                    k,
                    counting_question(shape),
                    str(shape_counts.get(shape, 0)),
                    question_shape=shape,
                )
            )
    if "colour" in cfg.tasks:
        single = [s for s in cfg.shapes if shape_counts.get(s) == 1]
        for k, shape in enumerate(rng.sample(single, min(cfg.colour_per_scene, len(single)))):
            colour = next(o.colour for o in scene.objects if o.shape == shape)
            rows.append(_row(scene, cfg, "colour", k, colour_question(shape), colour, question_shape=shape))
    return rows


def conversation_row(scene: Scene, cfg: WorldConfig) -> Row | None:
    """One multi-turn conversation about a scene: its short-answer questions, shuffled.

    ``conversation_existence`` existence questions about distinct objects (half present, half absent),
    ``conversation_counting`` counting and ``conversation_colour`` colour questions, in a seeded
    random order; earlier answers stand as assistant
    turns in the prompt and the last answer is the completion, so that supervised fine-tuning
    learns every answer from one pass over the image. Descriptions stay single-turn (a caption
    in the context would give the answers away). None when the scene has fewer than two questions.
    """
    rng = random.Random(f"vlalign-shapes-conversation/{cfg.seed}/{scene.id}")
    present = scene.object_names(cfg)
    absent = [n for n in allowed_objects(cfg, scene.split) if n not in set(present)]
    qa: list[tuple[str, str]] = []
    if "existence" in cfg.tasks:
        n_yes = min(len(present), (cfg.conversation_existence + 1) // 2)
        n_no = min(len(absent), cfg.conversation_existence - n_yes)
        qa += [(existence_question(n), YES) for n in rng.sample(present, n_yes)]
        qa += [(existence_question(n), NO) for n in rng.sample(absent, n_no)]
    counts = scene.shape_counts()
    if "counting" in cfg.tasks:
        absent_shapes = [s for s in cfg.shapes if s not in counts]
        pool = sorted(counts) + rng.sample(absent_shapes, min(1, len(absent_shapes)))
        for shape in rng.sample(pool, min(cfg.conversation_counting, len(pool))):
            qa.append((counting_question(shape), str(counts.get(shape, 0))))
    if "colour" in cfg.tasks:
        single = [s for s in cfg.shapes if counts.get(s) == 1]
        for shape in rng.sample(single, min(cfg.conversation_colour, len(single))):
            qa.append((colour_question(shape), next(o.colour for o in scene.objects if o.shape == shape)))
    if len(qa) < 2:
        return None
    rng.shuffle(qa)
    messages: list[dict[str, Any]] = _prompt(qa[0][0])
    for (_, answer), (question, _) in zip(qa, qa[1:]):
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
    return {
        "id": f"{scene.id}/conversation/0",
        "images": [image_path(scene)],
        "prompt": messages,
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": qa[-1][1]}]}],
        "task": "conversation",
        "split": scene.split,
        "scene_id": scene.id,
        "objects": present,
        "scene_objects": [o.to_dict() for o in scene.objects],
    }


def supervised_row(row: Row) -> Row:
    """A prompt-only row with its answer as the assistant completion (TRL conversational layout)."""
    out: Row = {
        "id": row["id"],
        "images": row["images"],
        "prompt": row["prompt"],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}],
    }
    out.update({k: v for k, v in row.items() if k not in out})
    return out


def pope_rows(
    scene: Scene,
    cfg: WorldConfig,
    mode: str,
    freq: dict[str, int],
    cooc: dict[str, dict[str, int]],
) -> list[Row]:
    """POPE rows of one scene: present objects (``Yes``) then as many negatives (``No``)."""
    rng = random.Random(f"vlalign-shapes-pope/{cfg.seed}/{mode}/{scene.id}")
    present = scene.object_names(cfg)
    asked = rng.sample(present, min(cfg.pope_per_scene, len(present)))
    negatives = pope_negatives(present, allowed_objects(cfg, scene.split), len(asked), mode, freq, cooc, rng)
    rows = []
    for k, (name, answer) in enumerate([(n, YES) for n in asked] + [(n, NO) for n in negatives]):
        row = _row(scene, cfg, "existence", k, existence_question(name), answer, question_object=name, pope_mode=mode)
        row["id"] = f"{scene.id}/pope-{mode}/{k}"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _split_size(cfg: WorldConfig, split: str) -> int:
    return {
        "train": cfg.n_train,
        "validation": cfg.n_validation,
        "test": cfg.n_test,
        "compositional": cfg.n_compositional,
    }[split]


def manifest_config(cfg: WorldConfig) -> dict[str, Any]:
    """The config as the manifest records it: ``video_clips`` is left out at 0 (its default), so that
    worlds without videos keep the manifest they had before the video task existed."""
    config = to_dict(cfg)
    if not cfg.video_clips:
        del config["video_clips"]
    return config


def write_world(cfg: WorldConfig, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Render every split of ``cfg`` and write its datasets under ``out_dir``; return the manifest.

    Deterministic: the same config writes byte-identical files. An existing non-empty
    ``out_dir`` is an error unless ``overwrite`` (then it is emptied first).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (or choose another folder)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {s: generate_split(cfg, s) for s in SPLITS if _split_size(cfg, s) > 0}
    freq, cooc = object_statistics(splits.get("train") or [sc for v in splits.values() for sc in v])
    files: dict[str, dict[str, Any]] = {}

    def record(name: str, rows: list[Row]) -> None:
        write_jsonl(rows, out / name)
        files[name] = {"rows": len(rows), "sha256": _sha256(out / name)}

    for split, scenes in splits.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        prompt_rows: list[Row] = []
        sft_rows: list[Row] = []
        for scene in scenes:
            render_scene(scene, cfg).save(out / image_path(scene), format="PNG")
            rows = task_rows(scene, cfg)
            prompt_rows.extend(rows)
            sft_rows += [supervised_row(r) for r in rows if r["task"] == "describe"]
            conversation = conversation_row(scene, cfg)
            sft_rows += [conversation] if conversation is not None else []
        record(f"{split}.jsonl", [supervised_row(r) for r in prompt_rows])
        record(f"{split}_sft.jsonl", sft_rows)
        record(f"{split}_prompts.jsonl", prompt_rows)
        if split in cfg.pope_splits:
            for mode in POPE_MODES:
                record(f"pope_{split}_{mode}.jsonl", [r for sc in scenes for r in pope_rows(sc, cfg, mode, freq, cooc)])
        if cfg.video_clips:
            clips = write_clips(cfg, scenes, out)
            record(f"{split}_video.jsonl", [supervised_clip_row(r) for r in clips])
            record(f"{split}_video_prompts.jsonl", clips)
    manifest = {
        "format": "vlalign-shapes-world/1",
        "config": manifest_config(cfg),
        "scenes": {split: len(scenes) for split, scenes in splits.items()},
        "files": files,
        "object_vocabulary": object_vocabulary(cfg),
        "cooccurrence_pairs": cfg.partners,
        "cooccurrence_rates": {  # share of train scenes holding an object that also hold its partner
            a: cooc.get(a, {}).get(b, 0) / freq[a] for a, b in sorted(cfg.partners.items()) if freq.get(a)
        },
        "train_object_frequency": dict(sorted(freq.items())),
        "train_cooccurrence": {a: dict(sorted(row.items())) for a, row in sorted(cooc.items())},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a written world (its config, vocabulary and statistics)."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {data_dir} a folder written by write_world?")
    return json.loads(path.read_text())
