"""``vlalign ppo``: the advantage wiring by hand, one step in the direction of the advantages, exact
resume (adaptive KL coefficient included), and a separate critic initialised from a reward model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vlalign.config import load_config
from vlalign.data.collate import encode_completions, encode_prompts, pad_token_id_of
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.models.heads import load_head, new_head
from vlalign.models.logprobs import completion_logprobs
from vlalign.recipes import ppo
from vlalign.recipes.rl_update import UpdateContext
from vlalign.recipes.rollouts import Rollouts
from vlalign.training import Run, TrainConfig
from vlalign.training.metrics import read_metrics


def _args(model_dir: Path, world: Path, rm_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={world / 'train_prompts.jsonl'}",
        f"--reward_model={rm_dir}",
        "--rewards.weights={reward_model: 1.0, object_f1: 0.5}",
        "--ppo.tasks=[describe]",
        f"--train.output_dir={out}",
        "--train.batch_size=2",
        "--train.grad_accum=2",
        "--train.lr=1e-3",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--rollout.max_new_tokens=8",
        "--update.minibatches=2",
        "--eval_tasks=[]",
        *extra,
    ]


# ----------------------------------------------------------------------------- by hand


def test_advantages_by_hand():
    """One completion of two tokens, score 1, values (0.5, 0.25), KL_t = old - ref = (0.1, -0.2), beta 0.5,
    gamma 1, lambda 0.5, no whitening:
    r = (-0.5*0.1, -0.5*(-0.2) + 1) = (-0.05, 1.1); delta_1 = 1.1 - 0.25 = 0.85 = A_1;
    delta_0 = -0.05 + 0.25 - 0.5 = -0.3, A_0 = -0.3 + 0.5*0.85 = 0.125; returns A + V = (0.625, 1.1).
    With the KL in the loss instead, the rewards carry no penalty: r = (0, 1), A_1 = 0.75,
    A_0 = 0.25 - 0.5 + 0.5*0.75 = 0.125."""
    cfg = load_config(ppo.Config, None, ["--ppo.lam=0.5", "--ppo.whiten_advantages=false"])
    sample = PromptSample(id="s", images=[], prompt=user_prompt("hi", 0))
    ro = Rollouts(
        samples=[sample],
        prompts=None,  # type: ignore[arg-type]
        token_ids=[[[5, 6]]],
        texts=[["ab"]],
        stopped=[[True]],
        group_size=1,
    )
    ro.rewards = torch.tensor([1.0])
    ro.old_logps = torch.tensor([[-1.0, -2.0]])
    ro.ref_logps = torch.tensor([[-1.1, -1.8]])
    ro.extras["values"] = torch.tensor([[0.5, 0.25]])
    metrics = ppo.ppo_advantages(ro, kl_coef=0.5, cfg=cfg, reduce_sum=lambda t: t)
    torch.testing.assert_close(ro.advantages, torch.tensor([[0.125, 0.85]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ro.extras["returns"], torch.tensor([[0.625, 1.1]]), rtol=0, atol=1e-6)
    assert float(metrics["kl/seq"]) == pytest.approx(-0.1, abs=1e-6)
    cfg.update.kl_in = "loss"
    ppo.ppo_advantages(ro, kl_coef=0.5, cfg=cfg, reduce_sum=lambda t: t)
    torch.testing.assert_close(ro.advantages, torch.tensor([[0.125, 0.75]]), rtol=0, atol=1e-6)


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="--reward_model"):
        ppo.check_config(load_config(ppo.Config, None, []))
    with pytest.raises(ValueError, match="temperature"):
        ppo.check_config(load_config(ppo.Config, None, ["--reward_model=x", "--rollout.temperature=0"]))
    with pytest.raises(ValueError, match="kl_target"):
        ppo.check_config(load_config(ppo.Config, None, ["--reward_model=x", "--ppo.kl_target=2", "--update.kl_coef=0"]))


# ----------------------------------------------------------------------------- one step


def test_one_step_raises_the_logprob_of_the_better_completion(tiny_model, shape_images, tmp_path):
    """Two completions of one prompt scored +1 and -1; after one PPO update (shared critic, GAE, whitened
    advantages, clipped surrogate + value loss) the log-prob of the +1 completion has risen and that of
    the -1 completion has fallen, and the value head has moved."""
    model, processor = tiny_model("qwen2_vl")
    pad = pad_token_id_of(processor)
    cfg = load_config(ppo.Config, None, ["--update.epochs=1", "--critic.vf_coef=0.5"])
    sample = PromptSample(id="s0", images=[shape_images[0]], prompt=user_prompt("Describe the image."))
    prompts = encode_prompts(processor, [sample])
    texts = ["The image shows a red circle.", "The image shows two blue squares."]
    ids = encode_completions(processor, [texts])
    ro = Rollouts(samples=[sample], prompts=prompts, token_ids=ids, texts=[texts], stopped=[[True, True]], group_size=2)
    ro.rewards = torch.tensor([1.0, -1.0])
    head = new_head(model, seed=0)
    head_before = head.score.weight.detach().clone()
    ro.old_logps, ro.extras["values"] = ppo.rollout_values(
        model, head, ro, shared=True, temperature=1.0, pad_token_id=pad, micro_batch=1
    )
    ppo.ppo_advantages(ro, kl_coef=0.0, cfg=cfg, reduce_sum=lambda t: t)
    assert bool((ro.advantages[0][ro.mask[0]] > 0).all()) and bool((ro.advantages[1][ro.mask[1]] < 0).all())

    run = Run(TrainConfig(output_dir=str(tmp_path / "run"), trackers=[], progress=False, max_grad_norm=0.0))
    optimizer = ppo.build_optimizer_for(model, head, replace(cfg, train=TrainConfig(lr=1e-3)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ctx = UpdateContext(temperature=1.0, pad_token_id=pad, micro_batches=1, norm_length=16, seed=0, step=0)
    metrics = ppo.ppo_update(run, model, head, optimizer, scheduler, ro, cfg, ctx, beta=cfg.update.kl_coef)
    assert metrics["value/loss"] > 0
    with torch.no_grad():
        after = completion_logprobs(model, prompts, ids).sums
    before = ro.old_logps.sum(-1)
    assert float(after[0]) > float(before[0]) and float(after[1]) < float(before[1])
    assert not torch.equal(head.score.weight, head_before)


# ----------------------------------------------------------------------------- the recipe


def _step_records(run_dir: Path) -> list[dict]:
    drop = ("time", "perf/")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(run_dir)]


def test_resumed_run_continues_identically(tiny_model_dir, recipe_world, reward_model_dir, tmp_path):
    """Four steps in one go, and two steps then a resume to four (adaptive KL, two minibatches, two
    epochs): the same sampled completions and scores (completions.jsonl), losses, KL coefficients and
    final weights of policy and value head."""
    model_dir = tiny_model_dir("qwen2_vl")
    common = ["--ppo.kl_target=0.5", "--ppo.kl_horizon=20", "--update.epochs=2", "--train.save_every=2"]
    whole = tmp_path / "whole"
    ppo.run(
        load_config(
            ppo.Config, None, _args(model_dir, recipe_world, reward_model_dir, whole, "--train.max_steps=4", *common)
        )
    )
    split = tmp_path / "split"
    ppo.run(
        load_config(
            ppo.Config, None, _args(model_dir, recipe_world, reward_model_dir, split, "--train.max_steps=2", *common)
        )
    )
    ppo.run(
        load_config(
            ppo.Config,
            None,
            _args(
                model_dir, recipe_world, reward_model_dir, split, "--train.max_steps=4", "--train.resume=true", *common
            ),
        )
    )
    a, b = _step_records(whole), _step_records(split)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and a == b
    sampled = (whole / "completions.jsonl").read_text()
    assert sampled == (split / "completions.jsonl").read_text() and sampled.count("\n") == 4 * 4
    coefs = [r["kl/coef"] for r in a]
    assert coefs[0] == pytest.approx(0.05) and len(set(coefs)) > 1  # the controller moved beta, and it resumed
    from safetensors.torch import load_file

    for name in ("model.safetensors", "value_head.safetensors"):
        wa, wb = load_file(str(whole / "model" / name)), load_file(str(split / "model" / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_separate_critic_from_the_reward_model(tiny_model_dir, recipe_world, reward_model_dir, tmp_path):
    """critic.shared=false with a reward-model folder: the critic starts from the reward model's backbone and
    head, trains (its head moves), is saved under critic/, and the final evaluation measures CHAIR, the KL
    from the start and the reward model's win rate over the starting model."""
    out = tmp_path / "sep"
    cfg = load_config(
        ppo.Config,
        None,
        _args(
            tiny_model_dir("qwen2_vl"),
            recipe_world,
            reward_model_dir,
            out,
            "--train.max_steps=2",
            "--critic.shared=false",
            f"--critic.name_or_path={reward_model_dir}",
            "--critic.lr=1e-2",
            "--eval_tasks=[describe]",
            f"--eval.data={recipe_world}",
            "--eval.describe=4",
            "--eval.kl_prompts=2",
            "--eval.max_new_tokens=8",
        ),
    )
    final = ppo.run(cfg)
    start_head = load_head(reward_model_dir / "reward_head.safetensors")
    trained_head = load_head(out / "critic" / "value_head.safetensors")
    assert not torch.equal(start_head.score.weight, trained_head.score.weight)
    assert 0.0 <= final["eval/win_rate"] <= 1.0 and "eval/kl/seq" in final and "eval/chair/chair_i" in final
    assert "eval/start/chair/chair_i" in final
    assert all("value/loss" in r for r in read_metrics(out) if "train/loss" in r)
