"""Data parallelism: ``accelerate launch`` with two CPU processes (gloo) gives the losses, rewards,
held-out metrics and weights of one process holding the same global batch.

The two runs see the same samples at every step (:class:`vlalign.training.BatchPlan`): one process
with 2 micro-batches of 2 per step, or two processes with 1 micro-batch of 2 each. Every
per-example mean divides by the step's global count, summed before any backward, and DDP averages
the gradients, so only the order of float32 additions differs between the runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlalign.config import load_config
from vlalign.data.annotations import load_vocabulary
from vlalign.data.io import load_samples, write_samples
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.recipes import dpo, kto
from vlalign.training.metrics import read_metrics


@pytest.fixture(scope="module")
def pair_file(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    pairs, _ = inject_pairs(samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(tasks=("describe",)))
    out = tmp_path_factory.mktemp("dp-pairs") / "pairs.jsonl"
    write_samples(pairs, out)
    return out


RECIPES = {
    "dpo": (dpo, ["--loss.weights={mdpo: 1.0}"]),
    "kto": (kto, ["--from_pairs=true"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_two_processes_match_one_process(recipe, tiny_model_dir, pair_file, tmp_path, launch_two_processes):
    module, extra = RECIPES[recipe]
    common = [
        f"--model.name_or_path={tiny_model_dir('qwen2_vl')}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={pair_file}",
        f"--data.eval={pair_file}",
        "--data.limit=8",
        "--data.eval_limit=6",
        "--train.batch_size=2",
        "--train.max_steps=3",
        "--train.lr=1e-3",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.warmup_ratio=0",
        *extra,
    ]
    one = tmp_path / "one"
    module.run(load_config(module.Config, None, [*common, "--train.grad_accum=2", f"--train.output_dir={one}"]))

    two = tmp_path / "two"
    done = launch_two_processes(recipe, [*common, "--train.grad_accum=1", f"--train.output_dir={two}"])
    assert "3 steps of 4" in done.stdout  # two processes of one micro-batch of 2: a global batch of 4

    a, b = read_metrics(one), read_metrics(two)
    steps_a = [r for r in a if "train/loss" in r]
    steps_b = [r for r in b if "train/loss" in r]
    assert [r["step"] for r in steps_b] == [1, 2, 3]
    compared = ["train/loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen"]
    compared += ["rewards/conditional_margin", "train/pairs"] if recipe == "dpo" else ["kl/reference_point"]
    for ra, rb in zip(steps_a, steps_b, strict=True):
        for key in compared:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    final_a, final_b = a[-1], b[-1]
    assert final_b["eval/loss"] == pytest.approx(final_a["eval/loss"], rel=1e-5)
    wa = load_file(str(one / "model" / "model.safetensors"))
    wb = load_file(str(two / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=2e-5)
