"""``vlalign ppo`` with two processes: ``accelerate launch`` with two CPU processes (gloo), each with one
micro-batch of 2 prompts per step, trains like one process with two micro-batches of 2 on the same
global batch of 4 prompts: the same sampled completions, rewards, KL coefficients, losses and final
weights of policy and value head.

Why the runs agree: every process samples its prompts with the seed of the step and the prompt
(:func:`vlalign.recipes.rollouts.rollout_seed`), the advantages are whitened with moments summed over
both processes, the adaptive KL controller sees the mean over processes, and every loss divides by
the step's global token count before the backward, which DDP then averages. Only the order of the
float32 additions differs (per-process partial sums, then the all-reduce), so the numbers agree to a
few units in the sixth digit: ``rel=1e-5`` on the metrics; ``abs=1e-5`` on the sequence KL, a
difference of two sums of ~50 in magnitude (float32 spacing 4e-6 there); ``atol=5e-5`` on weights
trained with ``lr=1e-3`` for 3 steps x 2 epochs (Adam divides each gradient by its own running
scale, so the rounding of near-zero gradients reaches the weights; measured: 1.2e-5 on the policy,
1.4e-7 on the value head).

One minibatch per epoch: with ``update.minibatches=2`` the one-process run splits its four prompts
into two optimiser steps of two, while two processes would pair one prompt of each process, another
(equally valid) trajectory; ``update.minibatches`` must also divide each process's
``train.grad_accum``. Not compared: spreads (``*/std``, ``values/explained_variance``) are
per-process statistics averaged over processes, and ``value/clip_frac`` counts tokens at the clip
boundary, where one token flipped between the runs (1 of 64) in the measured run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlalign.config import load_config
from vlalign.recipes import ppo
from vlalign.training.metrics import read_metrics


def test_two_processes_match_one_process(
    tiny_model_dir, recipe_world, reward_model_dir, tmp_path, launch_two_processes
):
    """Shared critic, adaptive KL (so β depends on the KL averaged over processes), whitened advantages
    (moments over both processes), 2 epochs of one minibatch per step, 3 steps."""
    common = [
        f"--model.name_or_path={tiny_model_dir('qwen2_vl')}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={recipe_world / 'train_prompts.jsonl'}",
        f"--reward_model={reward_model_dir}",
        "--rewards.weights={reward_model: 1.0, object_f1: 0.5}",
        "--ppo.tasks=[describe]",
        "--ppo.kl_target=0.5",
        "--ppo.kl_horizon=20",
        "--train.batch_size=2",
        "--train.max_steps=3",
        "--train.lr=1e-3",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--rollout.max_new_tokens=8",
        "--update.epochs=2",
        "--update.minibatches=1",
        "--eval_tasks=[]",
    ]
    one = tmp_path / "one"
    ppo.run(load_config(ppo.Config, None, [*common, "--train.grad_accum=2", f"--train.output_dir={one}"]))

    two = tmp_path / "two"
    done = launch_two_processes("ppo", [*common, "--train.grad_accum=1", f"--train.output_dir={two}"], timeout=600)
    assert "3 steps of 4 prompts" in done.stdout  # two processes of one micro-batch of 2: 4 prompts a step

    one_sampled = {r["id"]: r for r in _completions(one)}
    two_sampled = _completions(two)  # the main process logs the completions of its own prompts only
    assert len(one_sampled) == 3 * 4 and len(two_sampled) == 3 * 2
    for record in two_sampled:
        same = one_sampled[record["id"]]
        assert record["step"] == same["step"] and record["completions"] == same["completions"]
        # the reward model scores a batch of 2 instead of 4 (other padding): float32 rounding
        assert record["rewards"] == pytest.approx(same["rewards"], rel=1e-5)
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in b] == [1, 2, 3]
    compared = ["train/loss", "value/loss", "value/mean", "kl/ref", "kl/coef", "rewards/total/mean"]
    compared += ["policy/clip_frac", "policy/approx_kl", "advantages/abs_mean", "train/grad_norm"]
    for ra, rb in zip(a, b, strict=True):
        for key in compared:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
        # a difference of two sequence sums of ~8 log-probs near -6: |sums| ~ 50, float32 spacing 4e-6
        assert rb["kl/seq"] == pytest.approx(ra["kl/seq"], abs=1e-5), ra["step"]
    for name in ("model.safetensors", "value_head.safetensors"):
        wa, wb = load_file(str(one / "model" / name)), load_file(str(two / "model" / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=5e-5)


def _completions(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
