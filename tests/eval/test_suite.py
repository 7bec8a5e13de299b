"""The evaluation suite end to end on a tiny model: suite building, evaluate() on a model in
memory, the KL metric against an independent computation, and `vlalign eval`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vlalign.cli import main
from vlalign.data.io import load_samples
from vlalign.data.schema import DataError
from vlalign.eval.paired import metrics_from_counts, record_counts
from vlalign.eval.policy import completion_token_logprobs, kl_divergence
from vlalign.eval.pope import pope_metrics
from vlalign.eval.suite import SuiteConfig, build_suite, evaluate
from vlalign.eval.tasks import task_of

SMALL = dict(
    pope_questions=6,
    describe=3,
    questions_per_task=3,
    compositional_describe=2,
    compositional_questions_per_task=2,
    kl_prompts=3,
    max_new_tokens=6,
    batch_size=8,
)


def test_build_suite_caps_and_shares_pope_scenes(eval_world: Path) -> None:
    suite = build_suite(SuiteConfig(data=str(eval_world), **SMALL))
    assert set(suite.pope) == {"random", "popular", "adversarial"}
    scenes = [{s.meta["scene_id"] for s in rows} for rows in suite.pope.values()]
    assert scenes[0] == scenes[1] == scenes[2]  # the same images in every mode
    assert all(len(rows) >= 6 for rows in suite.pope.values())
    tasks = [task_of(s) for s in suite.heldout]
    assert tasks.count("describe") == 3 and tasks.count("counting") == 3
    assert {s.meta["split"] for s in suite.compositional} == {"compositional"}
    again = build_suite(SuiteConfig(data=str(eval_world), **SMALL))
    assert [s.id for s in again.heldout] == [s.id for s in suite.heldout]
    only = build_suite(SuiteConfig(data=str(eval_world), parts=("pope",), **SMALL))
    assert only.pope and not only.heldout and not only.compositional
    with pytest.raises(ValueError, match="unknown part"):
        build_suite(SuiteConfig(data=str(eval_world), parts=("chair",)))


def test_build_suite_custom_dataset_needs_vocabulary(eval_world: Path, tmp_path: Path) -> None:
    pope = {"random": str(eval_world / "pope_test_random.jsonl")}
    cfg = SuiteConfig(data=str(eval_world / "test_prompts.jsonl"), pope=pope)
    with pytest.raises(ValueError, match="vocabulary"):
        build_suite(cfg)
    cfg.vocabulary = str(eval_world / "manifest.json")
    suite = build_suite(cfg)
    assert suite.name.startswith("custom:") and list(suite.pope) == ["random"] and not suite.compositional


def test_evaluate_in_memory(tiny_model: Callable[..., Any], eval_world: Path) -> None:
    """Every metric is there and finite, records match the suite, and POPE from the records
    recomputes the reported numbers."""
    model, processor = tiny_model("qwen2_vl")
    suite = build_suite(SuiteConfig(data=str(eval_world), **SMALL))
    res = evaluate(model, processor, suite)
    assert len(res.records) == len(suite)
    for key in (
        "pope/adversarial/f1",
        "pope/random/yes_ratio",
        "chair/chair_i",
        "chair/chair_s",
        "chair/recall",
        "task/counting",
        "task/colour",
        "task/existence",
        "compositional/chair/chair_i",
        "compositional/task/counting",
        "perf/seconds",
    ):
        assert math.isfinite(res.metrics[key]), key
    adv = [r for r in res.records if r["part"] == "pope/adversarial"]
    again = pope_metrics([r["output"] for r in adv], [r["answer"] for r in adv])
    assert again["f1"] == res.metrics["pope/adversarial/f1"]
    assert "kl/seq" not in res.metrics and "win_rate" not in res.metrics
    # the paired bootstrap's counts recompute every suite metric they cover, exactly
    summed: dict[str, float] = {}
    for r in res.records:
        for k, v in record_counts(r).items():
            summed[k] = summed.get(k, 0.0) + v
    recomputed = metrics_from_counts({k: np.array([v]) for k, v in summed.items()})
    assert {"pope/random/f1", "chair/chair_i", "chair/recall", "task/colour", "compositional/chair/chair_s"} <= set(
        recomputed
    )
    assert {k: float(v[0]) for k, v in recomputed.items()} == {k: res.metrics[k] for k in recomputed}


def test_completion_logprobs_match_one_row_at_a_time(tiny_model: Callable[..., Any], eval_world: Path) -> None:
    """Batched, padded log-probs equal each completion scored alone, token by token (float32)."""
    model, processor = tiny_model("qwen2_vl")
    samples = load_samples(eval_world / "test_prompts.jsonl", "prompt")[:4]
    tok = processor.tokenizer
    ids = [
        tok("The image shows a red circle.")["input_ids"],
        tok("2")["input_ids"],
        tok("No")["input_ids"],
        tok("green")["input_ids"],
    ]
    batched = completion_token_logprobs(model, processor, samples, ids, batch_size=4)
    for sample, comp, got in zip(samples, ids, batched):
        alone = completion_token_logprobs(model, processor, [sample], [comp], batch_size=1)[0]
        assert got.shape == (len(comp),)
        assert torch.allclose(got, alone, atol=1e-5)


def test_kl_zero_for_same_model_positive_otherwise(tiny_model: Callable[..., Any], eval_world: Path) -> None:
    model, processor = tiny_model("qwen2_vl")
    other, _ = tiny_model("qwen2_vl")
    samples = load_samples(eval_world / "test_prompts.jsonl", "prompt")[:4]
    same = kl_divergence(model, other, processor, samples, max_new_tokens=5)
    assert same["kl"] == 0.0 and same["kl_token_k3"] == 0.0 and same["kl_tokens"] > 0
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05, alpha=1.0)
    moved = kl_divergence(model, other, processor, samples, max_new_tokens=5)
    assert moved["kl_token_k3"] > 0


def test_vlalign_eval_command(tiny_model_dir: Callable[..., Path], eval_world: Path, tmp_path: Path) -> None:
    """`vlalign eval --model A --baseline A`: eval.json with both columns, zero differences, a
    win rate of 1/2 (every description ties) and a KL of 0; TensorBoard (the default tracker) holds
    the same metrics (eval/..., baseline/...) and a table of the first descriptions under logs/eval."""
    model = str(tiny_model_dir("qwen2_vl"))
    args = [
        "eval",
        f"--model={model}",
        f"--baseline={model}",
        f"--output_dir={tmp_path}",
        "--device=cpu",
        "--dtype=float32",
        "--progress=false",
        f"--suite.data={eval_world}",
    ]
    args += [f"--suite.{k}={v}" for k, v in SMALL.items()]
    assert main(args) == 0
    out = json.loads((tmp_path / "eval.json").read_text())
    diff = out["difference"]
    assert all(v == 0 for k, v in diff.items() if not k.startswith("perf/"))
    assert out["metrics"]["win_rate"] == 0.5 and out["metrics"]["kl/seq"] == 0.0
    assert out["metrics"]["win_rate/same"] == 1.0
    assert len(out["records"]["model"]) == len(out["records"]["baseline"]) > 0
    intervals = out["difference_interval"]
    assert "pope/adversarial/f1" in intervals and "task/counting" in intervals
    assert all((v["difference"], v["low"], v["high"]) == (0.0, 0.0, 0.0) for v in intervals.values())
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((tmp_path / "logs" / "eval").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "logs" / "eval"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    for prefix, metrics in (("eval/", out["metrics"]), ("baseline/", out["baseline_metrics"])):
        (f1,) = events.Scalars(f"{prefix}pope/adversarial/f1")
        assert (f1.step, f1.value) == (0, pytest.approx(metrics["pope/adversarial/f1"]))
    (text,) = events.Tensors("eval/samples/text_summary")
    first = next(r for r in out["records"]["model"] if r["task"] == "describe")
    assert f"| {first['id']} |" in text.tensor_proto.string_val[0].decode()


def test_pope_rows_without_answer_fail_before_any_model(eval_world: Path, tmp_path: Path) -> None:
    """A custom suite's POPE file with `label` in place of `answer` (or an answer that is not
    Yes/No) stops build_suite, naming the file, the row and the column, with a hint at --bench=pope."""
    rows = [json.loads(line) for line in (eval_world / "pope_test_random.jsonl").read_text().splitlines()]
    images = eval_world / "images"
    for row in rows:
        row["images"] = [str((images.parent / im).resolve()) for im in row["images"]]
    rows[1]["label"] = rows[1].pop("answer")
    bad = tmp_path / "pope.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SuiteConfig(
        data=str(eval_world / "test_prompts.jsonl"), pope={"random": str(bad)}, vocabulary=str(eval_world)
    )
    with pytest.raises(DataError, match=r"pope.jsonl, row 2 .*column 'answer': missing.*--bench=pope"):
        build_suite(cfg)
    rows[1]["answer"] = "maybe"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 2 .*column 'answer': a POPE label must be 'Yes' or 'No'"):
        build_suite(cfg)
