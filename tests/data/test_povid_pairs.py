"""POVID rows: the injected negative is inject's, the second negative is the policy's response to a
distorted image (corrupt's distortions, rank's generation), drops are counted with their reason,
and ``vlalign pairs --method=povid`` writes rows that the DPO recipe's povid loss trains on."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlalign.cli import main
from vlalign.config import load_config
from vlalign.data.annotations import ObjectVocabulary
from vlalign.data.io import load_samples
from vlalign.data.pairs.corrupt import CorruptConfig, corrupt_image, corrupt_pairs, image_seed
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.data.pairs.povid import distorted_prompts, povid_pairs
from vlalign.data.schema import PromptSample, SupervisedSample, user_prompt
from vlalign.eval.tasks import has_task
from vlalign.models.generate import generate_texts
from vlalign.models.load import load_model_and_processor
from vlalign.recipes import dpo
from vlalign.shapes.vocabulary import find_vocabulary
from vlalign.shapes.world import WorldConfig, object_vocabulary
from vlalign.training.metrics import read_metrics

VOCAB = ObjectVocabulary(object_vocabulary(WorldConfig()))


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")


def _row(sid: str, names: list[str], completion: str, task: str = "describe", question: str = "Describe the image."):
    objs = [{"colour": n.split()[0], "shape": n.split()[1]} for n in names]
    meta = {"task": task, "scene_id": sid, "objects": sorted(set(names)), "scene_objects": objs, "answer": completion}
    return SupervisedSample(f"{sid}/{task}", [_image(len(sid) + ord(sid[0]))], user_prompt(question), completion, meta)


ROWS = [
    _row("a", ["red circle"], "The image shows a red circle."),
    _row("b", ["red circle", "blue square"], "The image shows a red circle and a blue square."),
    _row("c", ["red circle", "green circle"], "The image shows a red circle and a green circle."),
    _row("d", ["red circle", "blue square"], "The image shows a red circle and a blue square."),
    _row("e", ["green circle"], "The image shows a green circle."),
    _row("f", ["blue square", "blue square"], "2", task="counting", question="How many blue squares are there?"),
]
"""Six faithful rows, in-memory images."""

RESPONSES = {
    "a": "The image shows a red circle and a blue square.",
    "b": "The image shows a green triangle.",
    "c": "The image shows a red circle and a green circle.",
    "d": "The image shows a blue square and a red circle.",
    "e": "   ",
    "f": "3",
}
"""What the fake policy says to each scene's distorted image."""


def _responder(seen: list[PromptSample]) -> Callable[[Sequence[PromptSample]], list[str]]:
    def respond(prompts: Sequence[PromptSample]) -> list[str]:
        seen.extend(prompts)
        return [RESPONSES[p.id.split("/")[0]] for p in prompts]

    return respond


def test_povid_rows_hand_worked() -> None:
    """Claim scores (true − false claims) / reference claims, with counts known (2 claims per object):
    a: chosen 2/2 = 1; "a red circle and a blue square" has 2 true claims and 1 false: 1/2 ⇒ 0.5.
    b: chosen 4/4 = 1; "a green triangle" has 1 false claim: −1/4 ⇒ 1.25.
    c: the response is the chosen text: dropped. d: the same claims reordered: 1 − 1 = 0, not worse:
    dropped (kept with require_worse=False, margin 0). e: empty: dropped. f: "3" is another answer
    than "2": 1. The rejected texts are inject_pairs' own; the second negative is the response."""
    seen: list[PromptSample] = []
    rows, stats = povid_pairs(ROWS, VOCAB, _responder(seen))
    injected, _ = inject_pairs(ROWS, VOCAB, InjectConfig())
    by_id = {p.id: p for p in injected}
    assert [r.id.split("/")[0] for r in rows] == ["a", "b", "f"]
    assert [r.meta["distorted_margin"] for r in rows] == [0.5, 1.25, 1.0]
    for row in rows:
        pair = by_id[row.id.removesuffix("/povid")]
        scene = row.id.split("/")[0]
        assert (row.chosen, row.rejected, row.rejected_extra) == (pair.chosen, pair.rejected, [RESPONSES[scene]])
        assert row.meta["source"] == "povid" and row.meta["injection"] == pair.meta["source"]
        assert row.meta["margin"] == pair.meta["margin"] and row.meta["injected"] == pair.meta["injected"]
        assert row.meta["distortion"]["method"] == "noise" and row.meta["distortion"]["level"] == 0.5
    assert stats.inputs == 6 and stats.made == 3 and stats.margins == [0.5, 1.25, 1.0]
    assert stats.dropped == {
        "distorted-image response equals chosen": 1,
        "distorted-image response not worse than chosen": 1,
        "empty distorted-image response": 1,
    }
    assert len(seen) == 6
    loose, loose_stats = povid_pairs(ROWS, VOCAB, _responder([]), require_worse=False)
    assert [r.meta["distorted_margin"] for r in loose] == [0.5, 1.25, 0.0, 1.0] and loose_stats.made == 4


def test_distortion_is_corrupts_and_chunking_changes_nothing(tmp_path: Path) -> None:
    """The policy sees each image distorted by corrupt_image with corrupt's per-image seed; an image
    file gets exactly the corruption corrupt_pairs gives it; asking 2 prompts at a time gives the
    same rows as asking all at once, in 3 calls."""
    seen: list[PromptSample] = []
    rows, _ = povid_pairs(ROWS, VOCAB, _responder(seen))
    for prompt, row in zip(seen, ROWS):
        original = row.images[0]
        expected = corrupt_image(original, "noise", 0.5, image_seed(0, prompt.id, original, 0))
        assert np.array_equal(np.asarray(prompt.images[0]), np.asarray(expected))
        assert not np.array_equal(np.asarray(prompt.images[0]), np.asarray(original))
    calls: list[int] = []

    def counting(prompts: Sequence[PromptSample]) -> list[str]:
        calls.append(len(prompts))
        return _responder([])(prompts)

    chunked, _ = povid_pairs(ROWS, VOCAB, counting, chunk_size=2)
    assert calls == [2, 2, 2] and [(r.id, r.rejected_extra) for r in chunked] == [
        (r.id, r.rejected_extra) for r in rows
    ]
    _image(1).save(tmp_path / "x.png")
    on_file = [dataclasses.replace(ROWS[0], images=[str(tmp_path / "x.png")])]
    cfg = CorruptConfig(method="mask", level=0.5, grid=4, seed=3)
    pairs, _ = inject_pairs(on_file, VOCAB)
    via_povid = distorted_prompts(pairs, cfg)[0].images[0]
    via_corrupt = corrupt_pairs(on_file, cfg)[0][0].meta["rejected_images"][0]
    assert np.array_equal(np.asarray(via_povid), np.asarray(via_corrupt))
    with pytest.raises(ValueError, match="unknown distortion 'blur'"):
        distorted_prompts(pairs, CorruptConfig(method="blur"))


# ----------------------------------------------------------------------------- end to end


def test_vlalign_pairs_povid_rows_train_with_the_povid_loss(
    world_dir: Path, tmp_path: Path, tiny_model_dir: Callable[..., Path]
) -> None:
    """``vlalign pairs --method=povid`` with the tiny Qwen2-VL as the policy: every row's second
    negative is the policy's greedy response to that row's noised image (generated again here, the
    same way), and ``vlalign dpo --loss.weights={povid: 1.0}`` loads the file and trains one step
    with a finite loss per negative."""
    model_dir = tiny_model_dir("qwen2_vl")
    out = tmp_path / "povid.jsonl"
    args = ["pairs", "--method=povid", f"--povid.model={model_dir}", "--povid.device=cpu", "--povid.max_new_tokens=8"]
    data = ["--povid.dtype=float32", f"--data={world_dir / 'train.jsonl'}", "--tasks=[describe]", "--limit=6"]
    assert main([*args, *data, f"--out={out}", "--progress=false"]) == 0
    rows = load_samples(out, "preference")
    stats = json.loads((tmp_path / "povid.stats.json").read_text())
    assert stats["inputs"] == 6 and stats["made"] == len(rows) >= 2
    assert stats["made"] + stats["dropped_total"] == 6
    assert all(len(r.rejected_extra) == 1 and r.meta["source"] == "povid" for r in rows)

    samples = load_samples(world_dir / "train.jsonl", "supervised", limit=6, keep=has_task(("describe",)))
    pairs, _ = inject_pairs(samples, find_vocabulary("", str(world_dir / "train.jsonl")), InjectConfig())
    model, processor = load_model_and_processor(str(model_dir), dtype="float32", device="cpu")
    prompts = distorted_prompts(pairs, CorruptConfig(method="noise", level=0.5))
    again = {p.id: t[0] for p, t in zip(prompts, generate_texts(model, processor, prompts, max_new_tokens=8))}
    assert all(r.rejected_extra == [again[r.id.removesuffix("/povid")]] for r in rows)

    run_dir = tmp_path / "dpo"
    cfg = load_config(
        dpo.Config,
        None,
        [
            f"--model.name_or_path={model_dir}",
            "--model.device=cpu",
            "--model.dtype=float32",
            f"--data.train={out}",
            f"--train.output_dir={run_dir}",
            "--train.trackers=[]",
            "--train.progress=false",
            "--train.log_every=1",
            "--train.warmup_ratio=0",
            "--loss.weights={povid: 1.0}",
            "--train.batch_size=2",
            "--train.max_steps=1",
            "--train.save_every=0",
        ],
    )
    dpo.run(cfg)
    step = next(r for r in read_metrics(run_dir) if "train/loss" in r)
    assert step["step"] == 1 and step["train/pairs"] == 2
    assert all(math.isfinite(step[k]) for k in ("train/loss", "loss/negative_0", "loss/negative_1"))


def test_vlalign_pairs_povid_needs_a_policy(world_dir: Path, tmp_path: Path) -> None:
    """Without --povid.model the command stops before writing anything, naming the option."""
    out = tmp_path / "povid.jsonl"
    with pytest.raises(SystemExit, match="method=povid needs --povid.model"):
        main(["pairs", "--method=povid", f"--data={world_dir / 'train.jsonl'}", f"--out={out}"])
    assert not out.exists()
