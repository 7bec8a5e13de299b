"""``vlalign kto``: the reference point is the step's mean mismatched log-ratio, desirable and
undesirable completions move apart, and bad inputs are named."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vlalign.config import load_config
from vlalign.data.annotations import load_vocabulary
from vlalign.data.io import load_samples, write_jsonl, write_samples
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.data.schema import DataError
from vlalign.models.load import load_model_and_processor
from vlalign.models.logprobs import completion_logprobs
from vlalign.recipes import kto
from vlalign.training import BatchPlan
from vlalign.training.metrics import read_metrics


@pytest.fixture(scope="module")
def pair_file(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Injection pairs of the recipe world's descriptions."""
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    pairs, _ = inject_pairs(samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(tasks=("describe",)))
    out = tmp_path_factory.mktemp("kto-pairs") / "pairs.jsonl"
    write_samples(pairs, out)
    return out


def _args(model_dir: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={train}",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--train.warmup_ratio=0",
        *extra,
    ]


def _records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "train/loss" in r]


def test_unpair_splits_each_pair_into_a_desirable_and_an_undesirable_row(pair_file):
    pairs = load_samples(pair_file, "preference", limit=3)
    rows = kto.unpair(pairs)
    assert [r.label for r in rows] == [True, False] * 3
    assert [r.completion for r in rows[:2]] == [pairs[0].chosen, pairs[0].rejected]
    assert rows[1].id == f"{pairs[0].id}/rejected" and rows[1].images == pairs[0].images


def test_reference_point_is_the_mean_mismatched_log_ratio(tiny_model_dir, pair_file, tmp_path):
    """Step 1's z0, computed by hand: the micro-batch of the batch plan, prompt i paired with the
    completion of sample i+1 (cyclically), log pi - log pi_ref summed over that completion's tokens
    by the naive (one row per completion) computation, averaged, floored at 0. The policy is the
    tiny model of seed 0, the reference (--ref-model) that of seed 1, so z0 is not trivially 0."""
    from vlalign.models.tiny import build_tiny_model

    policy_dir = tiny_model_dir("qwen2_vl")
    ref_dir = build_tiny_model("qwen2_vl", "tiny", tmp_path / "reference", seed=1)
    out = tmp_path / "run"
    cfg = load_config(
        kto.Config,
        None,
        _args(
            policy_dir,
            pair_file,
            out,
            "--from_pairs=true",
            "--data.limit=3",
            "--train.batch_size=3",
            "--train.max_steps=1",
            f"--ref-model={ref_dir}",
        ),
    )
    kto.run(cfg)
    logged = _records(out)[0]["kl/reference_point"]

    rows = kto.unpair(load_samples(pair_file, "preference", limit=3))
    batch = [rows[i] for i in BatchPlan(len(rows), 3, seed=0).micro_batches(0)[0]]
    policy, processor = load_model_and_processor(policy_dir, device="cpu", dtype="float32")
    reference, _ = load_model_and_processor(ref_dir, device="cpu", dtype="float32")
    encoder = kto.UnpairedEncoder(processor, max_length=None)
    ub = encoder(batch)
    mismatched = [[g[1]] for g in ub.completions]
    assert mismatched[0][0] == ub.completions[1][0] and mismatched[-1][0] == ub.completions[0][0]
    with torch.no_grad():
        lp = completion_logprobs(policy, ub.prompts, mismatched, mode="naive").sums.double()
        lr = completion_logprobs(reference.eval(), ub.prompts, mismatched, mode="naive").sums.double()
    expected = max(0.0, float((lp - lr).mean()))
    assert expected > 0.1, float((lp - lr).mean())
    assert logged == pytest.approx(expected, abs=1e-4)


def test_kto_moves_desirable_above_undesirable_on_a_fixed_batch(tiny_model_dir, pair_file, tmp_path):
    """Five steps on the same eight completions (four pairs, unpaired): the desirable completions'
    mean reward rises above the undesirable ones' (the margin grows from exactly 0), and the loss
    falls below its start (0.5 per completion, since every reward starts at 0 and z0 at 0)."""
    out = tmp_path / "run"
    final = kto.run(
        load_config(
            kto.Config,
            None,
            _args(
                tiny_model_dir("qwen2_vl"),
                pair_file,
                out,
                "--from_pairs=true",
                "--data.limit=4",
                "--train.batch_size=8",
                "--train.max_steps=5",
                "--train.lr=5e-4",
                "--train.schedule=constant",
                "--train.save_every=0",
                f"--data.eval={pair_file}",
                "--data.eval_limit=4",
            ),
        )
    )
    recs = _records(out)
    assert recs[0]["train/loss"] == pytest.approx(0.5, abs=1e-6) and recs[0]["rewards/margin"] == 0.0
    assert all(r["count/desirable"] == r["count/undesirable"] == 4 for r in recs)
    assert recs[-1]["rewards/margin"] > 1e-3 and recs[-1]["train/loss"] < recs[0]["train/loss"]
    assert all(math.isfinite(r["kl/reference_point"]) for r in recs)
    assert final["eval/rewards/margin"] > 0 and final["eval/count/desirable"] == 4


def test_bad_kto_inputs_are_named(tiny_model_dir, recipe_world, tmp_path):
    image = str(sorted((recipe_world / "images").rglob("*.png"))[0])
    rows = [
        {
            "id": f"u{i}",
            "images": [image],
            "prompt": "Describe the image.",
            "completion": "A red circle.",
            "label": i % 2 == 0,
        }
        for i in range(4)
    ]
    rows[2]["label"] = "yes"
    data = tmp_path / "bad.jsonl"
    write_jsonl(rows, data)
    model_dir = tiny_model_dir("qwen2_vl")
    with pytest.raises(DataError, match="line 3: 'label' must be true or false"):
        kto.run(load_config(kto.Config, None, _args(model_dir, data, tmp_path / "a", "--train.max_steps=1")))
    with pytest.raises(ValueError, match="batch_size >= 2"):
        kto.run(load_config(kto.Config, None, _args(model_dir, data, tmp_path / "b", "--train.batch_size=1")))
