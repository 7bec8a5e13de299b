"""GRPO and PPO end to end with ``rollout.engine=vllm`` (vLLM environment: ``make test-vllm``).

Two steps each on three tiny architectures: the engine generates, the trainer scores the token ids
with its shared-prefix forward, the policy's new weights reach the engine before the second rollout.
The truncated importance weights (GRPO, ``update.rollout_is_cap``) measure that last point: the
trainer's and the engine's log-probs of the sampled tokens agree at both steps, so the engine sampled
from the updated policy at step 2 (with stale weights they would differ by the update's change).
One prompt per micro-batch (train.batch_size=1): see test_engine_logprobs_match_the_policy.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm runs these tests in its own environment)")

from vlalign.config import load_config  # noqa: E402
from vlalign.recipes import grpo, ppo  # noqa: E402
from vlalign.training.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.vllm

ARCHS = ("qwen2_vl", "llava", "idefics3")


def _args(model_dir: Path, world: Path, out: Path, reward: str) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--train.warmup_ratio=0",
        "--train.max_steps=2",
        "--train.batch_size=1",
        "--train.grad_accum=2",
        "--train.lr=1e-3",
        f"--data.train={world / 'train_prompts.jsonl'}",
        f"--rewards.weights={{{reward}: 1.0}}",
        "--rollout.max_new_tokens=6",
        "--rollout.n=4",
        "--rollout.engine=vllm",
        "--rollout.vllm_max_model_len=512",
        "--eval_tasks=[]",
    ]


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A reward that splits most groups (1 for completions whose characters sum to an odd number)."""
    path = tmp_path_factory.mktemp("vllm-reward") / "parity_reward.py"
    path.write_text("def parity(completion, sample):\n    return float(sum(map(ord, completion)) % 2)\n")
    return f"{path}:parity"


@pytest.mark.parametrize("arch", ARCHS)
def test_grpo_with_vllm(arch: str, tiny_model_dir, world_dir: Path, parity: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    extra = ["--grpo.tasks=[describe]", "--update.rollout_is_cap=2.0"]
    grpo.run(load_config(grpo.Config, None, _args(tiny_model_dir(arch), world_dir, out, parity) + extra))
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows), rows
    # the image tokens vLLM bans carry ~1e-3 of probability in these random models; a stale engine at
    # step 2 would be off by the update's change of log-probs (~1e-2 and more at lr 1e-3)
    for r in rows:
        assert r["rollout_is/log_ratio_abs"] < 5e-3, r
        assert r["rollout_is/capped_frac"] == 0.0, r


@pytest.mark.parametrize("arch", ARCHS)
def test_ppo_with_vllm(arch: str, tiny_model_dir, world_dir: Path, parity: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ppo.run(
        load_config(ppo.Config, None, _args(tiny_model_dir(arch), world_dir, out, parity) + ["--ppo.tasks=[describe]"])
    )
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows), rows


def _completions(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines() if line.strip()]


def test_killed_grpo_run_resumes_with_the_same_vllm_completions(
    tiny_model_dir, world_dir: Path, parity: str, tmp_path: Path, vlalign_process, kill_after
) -> None:
    """A GRPO run with the vLLM engine killed (SIGKILL, in a subprocess) after its step-2 checkpoint and
    resumed samples exactly what an uninterrupted run samples at step 3: the resumed engine starts from
    the folder's weights and takes the checkpoint's (the policy changed, so it syncs), and every
    completion's seed is a function of (seed, step, sample id, k)."""
    model_dir = tiny_model_dir("qwen2_vl")
    common = ["--grpo.tasks=[describe]", "--train.max_steps=3", "--train.save_every=2", "--train.keep_checkpoints=1"]
    whole = tmp_path / "whole"
    grpo.run(load_config(grpo.Config, None, _args(model_dir, world_dir, whole, parity) + common))
    broken = tmp_path / "broken"
    proc = vlalign_process(["grpo", *_args(model_dir, world_dir, broken, parity), *common], tmp_path / "cache")
    kill_after(proc, broken / "checkpoints" / "step-0000002" / "state.json")
    resume = [*_args(model_dir, world_dir, broken, parity), *common, "--train.resume=true"]
    grpo.run(load_config(grpo.Config, None, resume))
    assert _completions(broken) == _completions(whole)
    assert sorted({r["step"] for r in _completions(whole)}) == [1, 2, 3]


def _online_args(model: str | Path, world_dir: Path, tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    """Iterative DPO arguments (2 rounds of 6 prompts x 3 samples on vLLM, ranked by length, 2 steps
    each) and the run folder; ``extra``: more ``--online.generation.*`` options."""
    scorer = tmp_path / "length_scorer.py"
    scorer.write_text("def score(samples, completions):\n    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "online"
    args = [
        f"--model.name_or_path={model}",
        "--model.device=cpu",
        "--model.dtype=float32",
        "--data.train=",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.warmup_ratio=0",
        "--online.rounds=2",
        f"--online.prompts={world_dir / 'train_prompts.jsonl'}",
        "--online.prompts_per_round=6",
        "--online.generation.n=3",
        "--online.generation.max_new_tokens=6",
        "--online.generation.engine=vllm",
        *extra,
        f"--online.scorer={scorer}:score",
        "--online.threshold=1",
        "--train.batch_size=1",
        "--train.max_steps=2",
        "--train.lr=1e-3",
    ]
    return args, out


def test_iterative_dpo_samples_with_vllm(tiny_model_dir, world_dir: Path, tmp_path: Path) -> None:
    """Two rounds of sample (vLLM, an engine per round's saved policy) -> rank -> DPO; round 2 samples
    the policy round 1 trained (a folder vlalign saved, loaded by vLLM)."""
    from vlalign.data.io import load_samples
    from vlalign.recipes import dpo

    extra = "--online.generation.vllm_max_model_len=512"
    args, out = _online_args(tiny_model_dir("qwen2_vl"), world_dir, tmp_path, extra)
    final = dpo.run(load_config(dpo.Config, None, args))
    assert final["online/rounds"] == 2
    for r in (1, 2):
        assert len(load_samples(out / f"round-{r}" / "pairs.jsonl", "preference")) >= 2
