"""``vlalign grpo``: one step moves log-probs the way the advantages say, a killed run resumes with
the same sampled completions, a failing reward stops the step by name, dynamic sampling is
deterministic, every estimator and KL placement runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlalign.config import load_config
from vlalign.data.collate import pad_token_id_of
from vlalign.data.io import load_samples
from vlalign.losses import dapo_group_filter
from vlalign.models.load import load_model_and_processor
from vlalign.models.reference import make_reference
from vlalign.recipes import grpo
from vlalign.recipes.rl_common import ADVANTAGES, policy_logprobs
from vlalign.recipes.rollouts import rollout, rollout_seed
from vlalign.rewards import RewardError, build_reward
from vlalign.training import BatchPlan
from vlalign.training.metrics import read_metrics

REWARDS = '''
def parity(completion, sample):
    """1 for completions whose characters sum to an odd number: splits most groups."""
    return float(sum(map(ord, completion)) % 2)

def fails_on_one(completion, sample):
    if sample.id.endswith("-000003/counting/0"):
        raise ValueError("cannot read this one")
    return 0.0
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grpo-rewards") / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def _args(model_dir: Path, world: Path, out: Path, reward: str, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={world / 'train_prompts.jsonl'}",
        "--grpo.tasks=[counting]",
        f"--rewards.weights={{{reward}: 1.0}}",
        f"--train.output_dir={out}",
        "--train.batch_size=2",
        "--train.lr=1e-3",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--rollout.n=4",
        "--rollout.max_new_tokens=6",
        "--eval_tasks=[]",
        *extra,
    ]


def _completions(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]


def test_one_step_raises_the_log_prob_of_positive_advantages(tiny_model_dir, recipe_world, reward_file, tmp_path):
    """One GRPO step (on-policy, AdamW 1e-3) on the tiny Qwen2-VL. The completions logged are those the
    starting model samples with the step's seed; after the step, every completion with a positive
    advantage is more likely than before and every one with a negative advantage less likely."""
    model_dir = tiny_model_dir("qwen2_vl")
    cfg = load_config(
        grpo.Config,
        None,
        _args(
            model_dir,
            recipe_world,
            tmp_path / "run",
            f"{reward_file}:parity",
            "--train.max_steps=1",
            f"--eval.data={recipe_world}",
            "--eval.questions_per_task=3",
            "--eval.kl_prompts=3",
            "--eval_tasks=[counting, colour]",
        ),
    )
    final = grpo.run(cfg)
    assert {"eval/task/counting", "eval/task/colour", "eval/kl/seq", "eval/kl/token_k3"} <= set(final)
    logged = _completions(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 1]

    start, processor = load_model_and_processor(model_dir, device="cpu", dtype="float32")
    trained, _ = load_model_and_processor(tmp_path / "run" / "model", device="cpu", dtype="float32")
    by_id = {s.id: s for s in load_samples(recipe_world / "train_prompts.jsonl", "prompt")}
    samples = [by_id[r["id"]] for r in logged]
    ro = rollout(start, processor, samples, settings=cfg.rollout, seed=rollout_seed(cfg.train.seed, 0))
    assert ro.texts == [r["completions"] for r in logged]
    pad = pad_token_id_of(processor)
    with torch.no_grad():
        before = policy_logprobs(start, ro, temperature=1.0, pad_token_id=pad).sums
        after = policy_logprobs(trained, ro, temperature=1.0, pad_token_id=pad).sums
    adv = torch.tensor([a for r in logged for a in r["advantages"]])
    assert (adv > 0).any() and (adv < 0).any()
    change = after - before
    assert bool((change[adv > 0] > 0).all()), (adv.tolist(), change.tolist())
    assert bool((change[adv < 0] < 0).all()), (adv.tolist(), change.tolist())
    metrics = read_metrics(tmp_path / "run")[0]
    assert metrics["policy/ratio_mean"] == 1.0 and metrics["policy/clip_frac"] == 0.0  # on-policy
    for key in (
        "rewards/parity/mean",
        "rewards/parity/std",
        "kl/ref",
        "policy/entropy",
        "completions/mean_length",
        "perf/tokens_per_s",
        "perf/gen_tokens_per_s",
        "train/grad_norm",
    ):
        assert key in metrics, key
    assert 0.5 < metrics["perf/useful_token_fraction"] <= 1.0  # tokens / slots of the update's rows


def test_reference_log_probs_are_computed_in_the_update_precision(
    tiny_model_dir, recipe_world, reward_file, tmp_path, vlalign_process
):
    """Under bf16 autocast (here on the CPU) the reference's log-probs of the rollout are computed in
    the precision of the policy's forward (accelerate wraps the prepared policy in autocast; the
    frozen reference copy is not wrapped): before the first update the policy equals the reference,
    so the KL between them is exactly 0. With the reference in float32 beside a bf16 policy the KL
    in the reward was about 5e-6 per sequence here: bf16's rounding, charged as a penalty."""
    args = _args(
        tiny_model_dir("qwen2_vl"),
        recipe_world,
        tmp_path / "run",
        f"{reward_file}:parity",
        "--train.max_steps=1",
        "--train.mixed_precision=bf16",
        "--update.kl_coef=0.1",
        "--update.kl_in=reward",
    )
    # a process of its own: accelerate keeps one mixed-precision setting per process
    proc = vlalign_process(
        ["grpo", *args], tmp_path / "cache", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    metrics = read_metrics(tmp_path / "run")[0]
    assert metrics["kl/ref_seq_in_reward"] == 0.0 and metrics["kl/ref"] == 0.0
    assert metrics["policy/ratio_mean"] == 1.0


def test_lora_step_with_the_adapter_disabled_reference(tiny_model_dir, recipe_world, reward_file, tmp_path):
    """LoRA: the reference is the policy with its adapter switched off, so at the first step (LoRA's B
    starts at zero) the KL to it is zero; the saved model is the adapter alone."""
    cfg = load_config(
        grpo.Config,
        None,
        _args(
            tiny_model_dir("qwen2_vl"),
            recipe_world,
            tmp_path / "run",
            f"{reward_file}:parity",
            "--train.max_steps=2",
            "--model.use_lora=true",
            "--update.kl_coef=0.1",
            "--train.lr=1e-2",
        ),
    )
    grpo.run(cfg)
    first, second = read_metrics(tmp_path / "run")
    assert first["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    assert second["kl/ref"] > 1e-6  # the adapter has moved the policy away from the base model
    assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_completions(
    tiny_model_dir, recipe_world, reward_file, tmp_path, vlalign_process, kill_after
):
    """Two epochs of two minibatches per step (off-policy reuse, old log-probs, shuffles), KL in the loss.
    A run killed (SIGKILL, in a subprocess) after its step-2 checkpoint and resumed samples, logs and
    trains exactly as an uninterrupted one: same completions, rewards, losses and final weights."""
    model_dir = tiny_model_dir("qwen2_vl")
    common = [
        f"{reward_file}:parity",
        "--train.max_steps=4",
        "--train.save_every=2",
        "--train.keep_checkpoints=1",
        "--train.grad_accum=2",
        "--update.epochs=2",
        "--update.minibatches=2",
        "--update.kl_coef=0.05",
    ]
    whole = tmp_path / "whole"
    grpo.run(load_config(grpo.Config, None, _args(model_dir, recipe_world, whole, *common)))

    broken = tmp_path / "broken"
    proc = vlalign_process(["grpo", *_args(model_dir, recipe_world, broken, *common)], tmp_path / "cache")
    kill_after(proc, broken / "checkpoints" / "step-0000002" / "state.json")
    assert not (broken / "model").exists()

    grpo.run(load_config(grpo.Config, None, [*_args(model_dir, recipe_world, broken, *common), "--train.resume=true"]))
    assert _completions(broken) == _completions(whole)
    assert [r["step"] for r in _completions(whole)] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    keys = ("step", "train/loss", "rewards/total/mean", "kl/ref", "policy/clip_frac")
    assert [[m.get(k) for k in keys] for m in read_metrics(broken)] == [
        [m.get(k) for k in keys] for m in read_metrics(whole)
    ]
    from safetensors.torch import load_file

    a, b = load_file(str(whole / "model" / "model.safetensors")), load_file(str(broken / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model_dir, recipe_world, reward_file, tmp_path, launch_two_processes):
    """``accelerate launch`` with two CPU processes (gloo), each with one micro-batch of 2 prompts, trains
    like one process with two micro-batches: same completions, metrics and weights (float32 rounding).
    REINFORCE++ whitens over both processes; group filtering may leave a process with fewer groups."""
    common = [
        f"--config={_reward_config(tmp_path, reward_file)}",
        *_args(
            tiny_model_dir("qwen2_vl"),
            recipe_world,
            tmp_path / "unused",
            "count_match",
            "--train.max_steps=3",
            "--advantage=reinforce_pp_baseline",
            "--update.kl_coef=0.05",
            "--update.epochs=2",
            "--grpo.filter_groups=true",
        ),
    ]
    common = [a for a in common if not a.startswith(("--rewards.weights", "--train.output_dir"))]
    one = tmp_path / "one"
    grpo.run(
        load_config(
            grpo.Config,
            str(tmp_path / "rewards.yaml"),
            [a for a in common if not a.startswith("--config")] + ["--train.grad_accum=2", f"--train.output_dir={one}"],
        )
    )
    two = tmp_path / "two"
    done = launch_two_processes("grpo", [*common, "--train.grad_accum=1", f"--train.output_dir={two}"])
    assert "3 steps of 4 prompts" in done.stdout
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in (
            "train/loss",
            "rewards/total/mean",
            "kl/ref",
            "policy/clip_frac",
            "policy/entropy",
            "groups/trained_frac",
            "completions/mean_length",
            "train/grad_norm",
        ):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    from safetensors.torch import load_file

    wa, wb = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=2e-5)


def _reward_config(tmp_path: Path, reward_file: Path) -> Path:
    """A config file naming the user reward (a 'file.py:function' key is easiest written in YAML)."""
    path = tmp_path / "rewards.yaml"
    path.write_text(f'rewards:\n  weights: {{"{reward_file}:parity": 1.0}}\n')
    return path


def test_a_failing_reward_stops_the_run_naming_function_sample_and_step(
    tiny_model_dir, recipe_world, reward_file, tmp_path
):
    cfg = load_config(
        grpo.Config,
        None,
        _args(
            tiny_model_dir("qwen2_vl"),
            recipe_world,
            tmp_path / "run",
            f"{reward_file}:fails_on_one",
            "--train.max_steps=40",
            "--train.batch_size=8",
            "--rollout.max_new_tokens=2",
        ),
    )
    with pytest.raises(
        RewardError,
        match=r"step \d+: reward function '.*fails_on_one' raised ValueError on sample "
        r"'train-000003/counting/0'.*cannot read this one",
    ) as info:
        grpo.run(cfg)
    assert info.value.function == "fails_on_one"


def test_dynamic_sampling_keeps_only_informative_groups_deterministically(
    tiny_model, recipe_world, reward_file, tmp_path
):
    """With filter_groups, every trained group has unequal rewards; refill rounds draw seeded prompts,
    so collecting the same step twice gives the same batch."""
    cfg = load_config(
        grpo.Config,
        None,
        _args(
            Path("unused"),
            recipe_world,
            tmp_path,
            f"{reward_file}:parity",
            "--grpo.filter_groups=true",
            "--grpo.resample_rounds=3",
            "--train.batch_size=4",
            "--rollout.n=2",
        ),
    )
    model, processor = tiny_model("qwen2_vl")
    train_set = grpo.load_prompts(cfg)
    assert {s.meta["task"] for s in train_set} == {"counting"}
    plan = BatchPlan(len(train_set), 4, 1, 1, 0)
    reward = build_reward(cfg.rewards.weights)
    run = SimpleNamespace(process_index=0)
    first, metrics = grpo.collect(run, model, processor, reward, train_set, plan, 5, cfg)
    again, _ = grpo.collect(run, model, processor, reward, train_set, plan, 5, cfg)
    assert 0 < len(first) <= 4
    assert bool(dapo_group_filter(first.rewards, group_size=2).all())
    assert first.texts == again.texts and [s.id for s in first.samples] == [s.id for s in again.samples]
    assert metrics["groups/trained_frac"] == len(first) / 4 and "rewards/parity/mean" in metrics
    assert first.prompts.sample_ids == [s.id for s in first.samples]


@pytest.mark.parametrize("advantage", ADVANTAGES)
def test_every_estimator_and_kl_placement_prepares_an_update(
    tiny_model, recipe_world, reward_file, tmp_path, advantage
):
    """Old / reference log-probs and advantages for each estimator, KL in the reward: outcome
    estimators give (R,) advantages, REINFORCE++ per-token (R, L) ones, zero on padding."""
    cfg = load_config(
        grpo.Config,
        None,
        _args(
            Path("unused"),
            recipe_world,
            tmp_path,
            f"{reward_file}:parity",
            f"--advantage={advantage}",
            "--update.kl_coef=0.1",
            "--update.kl_in=reward",
            "--train.batch_size=3",
        ),
    )
    model, processor = tiny_model("qwen2_vl")
    train_set = grpo.load_prompts(cfg)[:3]
    ro = rollout(model, processor, train_set, settings=cfg.rollout, seed=1)
    ro.rewards = torch.tensor([float(i % 3 == 0) for i in range(ro.num_rows)])
    reference = make_reference("copy", model, pad_token_id=pad_token_id_of(processor))
    metrics = grpo.prepare_update(
        model, reference, ro, cfg, pad_token_id=pad_token_id_of(processor), reduce_sum=lambda t: t
    )
    assert ro.old_logps.shape == ro.ref_logps.shape == (12, ro.width)
    assert float(metrics["kl/ref_seq_in_reward"]) == pytest.approx(0.0, abs=1e-5)  # the reference is the policy
    if advantage.startswith("reinforce_pp"):
        assert ro.advantages.shape == (12, ro.width)
        assert bool((ro.advantages[~ro.mask] == 0).all())
    else:
        assert ro.advantages.shape == (12,)
        assert bool(torch.isfinite(ro.advantages).all())


def test_a_reward_model_scores_the_completions(tiny_model_dir, recipe_world, reward_model_dir, tmp_path):
    """One GRPO step on descriptions with a `vlalign rm` folder as the reward: the rewards logged for
    the sampled completions are the reward model's scores of them, recomputed here."""
    from vlalign.rewards.model import load_reward_scorer

    args = _args(
        tiny_model_dir("qwen2_vl"),
        recipe_world,
        tmp_path / "run",
        "reward_model",
        "--grpo.tasks=[describe]",
        f"--reward_model={reward_model_dir}",
        "--train.max_steps=1",
    )
    grpo.run(load_config(grpo.Config, None, args))
    logged = _completions(tmp_path / "run")
    by_id = {s.id: s for s in load_samples(recipe_world / "train_prompts.jsonl", "prompt")}
    scorer = load_reward_scorer(reward_model_dir, device="cpu", dtype="float32")
    for row in logged:
        texts = row["completions"]
        expected = scorer([by_id[row["id"]]] * len(texts), texts)
        assert row["rewards"] == pytest.approx(expected, abs=1e-5)
    assert len(logged) == 2 and len(set(sum((r["rewards"] for r in logged), []))) > 1


def test_config_errors_are_named(recipe_world, tmp_path):
    def cfg(*extra: str) -> grpo.Config:
        return load_config(grpo.Config, None, _args(Path("m"), recipe_world, tmp_path, "count_match", *extra))

    with pytest.raises(ValueError, match="rollout.temperature must be > 0"):
        grpo.check_config(cfg("--rollout.temperature=0"))
    with pytest.raises(ValueError, match="set rollout.n >= 2"):
        grpo.check_config(cfg("--rollout.n=1"))
    with pytest.raises(ValueError, match=r"update.minibatches \(2\) must divide train.grad_accum \(3\)"):
        grpo.check_config(cfg("--update.minibatches=2", "--train.grad_accum=3"))
    with pytest.raises(ValueError, match="rewards.weights names reward_model but --reward_model"):
        grpo.check_config(cfg("--rewards.weights={reward_model: 1.0}"))
    with pytest.raises(ValueError, match="no row has a task in grpo.tasks"):
        grpo.load_prompts(cfg("--grpo.tasks=[juggling]"))
