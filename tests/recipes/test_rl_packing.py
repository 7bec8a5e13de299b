"""``update.logprob_pack_length``: every log-prob forward of a GRPO or PPO step (the update's, the
old-policy and reference passes, PPO's rollout values from a value head or a separate critic) packs
several prompts (each with its group) per row, and every number is the same.

Packing changes only the layout of the policy forward (block-diagonal attention, positions
restarted per prompt, mRoPE included on Qwen2-VL): every completion token sees exactly the tokens
of its own prompt and completion, so its log-prob, and hence the loss and every gradient, equal
those of the one-prompt-per-row layout up to float32 rounding. The layout itself is checked too:
fewer slots than without packing, and the engine's (tokens, slots) equal
:func:`~vlalign.models.packing.useful_token_counts` of the packed layout (what
``perf/useful_token_fraction`` reports; ``perf/useful_token_fraction_scoring`` for the other passes).
Fewer rows ran: a forward pre-hook on each model records the batch rows of its forwards.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from vlalign.config import ConfigError, load_config
from vlalign.data.collate import encode_prompts, image_token_ids, pad_token_id_of
from vlalign.data.schema import PromptSample
from vlalign.models.generate import GenerationSettings
from vlalign.models.heads import CriticModel, new_head
from vlalign.models.packing import TokenSlots, useful_token_counts
from vlalign.models.reference import make_reference
from vlalign.recipes import grpo, ppo
from vlalign.recipes.rl_common import PolicyUpdateConfig, old_logprobs, policy_logprobs, reference_logprobs
from vlalign.recipes.rl_update import update, update_context
from vlalign.recipes.rollouts import Rollouts
from vlalign.training import Run, TrainConfig
from vlalign.training.metrics import read_metrics

LENGTHS = [[3, 1], [2, 6], [1, 1], [4, 2]]
"""Four prompts x G = 2, ragged completions (so rows differ in length and padding is real)."""


def _rollouts(processor, images) -> Rollouts:
    """Four image prompts with fixed completions of ordinary tokens, advantages and reference log-probs."""
    samples = [
        PromptSample(
            id=f"p{i}",
            images=[images[i % len(images)]],
            prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q {i}" * (i + 1)}]}],
        )
        for i in range(len(LENGTHS))
    ]
    banned = set(image_token_ids(processor))
    gen = torch.Generator().manual_seed(3)
    ids = [
        [[int(t) for t in torch.randint(3, 200, (n,), generator=gen) if int(t) not in banned] or [5] for n in g]
        for g in LENGTHS
    ]
    ro = Rollouts(
        samples=samples,
        prompts=encode_prompts(processor, samples),
        token_ids=ids,
        texts=[["x"] * len(g) for g in ids],
        stopped=[[True] * len(g) for g in ids],
        group_size=2,
    )
    ro.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3])
    ro.ref_logps = torch.full((8, ro.width), -3.0)
    return ro


def _pack_length(ro: Rollouts) -> int:
    """Two prompts (with their groups) per row: the longer of the pairs (0, 1) and (2, 3)."""
    totals = [n + sum(len(c) for c in g) for n, g in zip(ro.prompts.lengths, ro.token_ids)]
    return max(totals[0] + totals[1], totals[2] + totals[3])


def _one_update(tmp_path, model, ro, cfg: PolicyUpdateConfig, pad: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and parameter change of one ``update`` (one micro-batch, SGD lr = 1, no clipping: minus the gradient)."""
    run = Run(
        TrainConfig(
            output_dir=str(tmp_path / f"run-{cfg.logprob_pack_length}"), trackers=[], progress=False, max_grad_norm=0.0
        )
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ctx = update_context(
        GenerationSettings(temperature=0.7, max_new_tokens=16), TrainConfig(grad_accum=1), cfg, step=0, pad_token_id=pad
    )
    assert ctx.pack_length == cfg.logprob_pack_length  # the config reaches the forward
    rows: list[int] = []  # rows of each forward of the update (a plain torch hook)
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        metrics = update(run, model, optimizer, scheduler, ro, cfg, ctx)
    finally:
        hook.remove()
    assert rows == ([2] if cfg.logprob_pack_length else [4])  # packed: two prompts per row
    assert math.isfinite(metrics["train/loss"])
    return metrics["train/loss"], {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_packed_update_equals_the_unpacked_one(tiny_model, shape_images, tmp_path, aggregation):
    results, layouts = [], []
    for packed in (False, True):
        model, processor = tiny_model("qwen2_vl")
        pad = pad_token_id_of(processor)
        ro = _rollouts(processor, shape_images)
        pack = _pack_length(ro) if packed else 0
        with torch.no_grad():
            out = policy_logprobs(model, ro, temperature=0.7, pad_token_id=pad, pack_length=pack)
        layouts.append(
            (out.num_tokens, out.num_slots, useful_token_counts(ro.prompts.lengths, ro.token_ids, pack or None))
        )
        cfg = PolicyUpdateConfig(
            aggregation=aggregation, kl_coef=0.05, entropy_coef=0.01, reference="copy", logprob_pack_length=pack
        )
        results.append(_one_update(tmp_path, model, ro, cfg, pad))
    (plain_tokens, plain_slots, plain_counts), (tokens, slots, counts) = layouts
    assert tokens == plain_tokens and slots < plain_slots  # the same tokens in fewer slots ...
    assert (tokens, slots) == counts and (plain_tokens, plain_slots) == plain_counts  # ... as the metric counts them
    (loss0, delta0), (loss1, delta1) = results
    assert abs(loss1 - loss0) < 1e-5, (loss0, loss1)
    assert max(float(d.abs().max()) for d in delta0.values()) > 1e-4  # the step did something
    for name in delta0:
        torch.testing.assert_close(delta1[name], delta0[name], rtol=1e-5, atol=1e-5, msg=name)


def test_negative_pack_length_is_refused():
    with pytest.raises(ConfigError, match="logprob_pack_length"):
        PolicyUpdateConfig(logprob_pack_length=-1)


# ----------------------------------------------------------------------------- the scoring passes


def _count_rows(module, rows: list[int]):
    """Record the batch rows of each forward of ``module`` (a plain torch hook); returns its handle."""
    return module.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)


def _scoring_passes(model, reference, head, critic, ro, pad: int, pack: int) -> tuple[dict, dict, TokenSlots]:
    """Old log-probs, reference log-probs, and PPO's rollout scoring with a shared and a separate critic,
    all four prompts in one micro-batch; with the rows each model's forwards ran."""
    rows: dict[str, list[int]] = {"policy": [], "reference": [], "critic": []}
    modules = {"policy": model, "reference": reference.model, "critic": critic.backbone}
    hooks = [_count_rows(modules[k], rows[k]) for k in rows]
    slots = TokenSlots()
    layout = {"temperature": 0.7, "micro_batch": 4, "pack_length": pack}
    try:
        out = {
            "old": old_logprobs(model, ro, pad_token_id=pad, slots=slots, **layout),
            "reference": reference_logprobs(reference, ro, slots=slots, **layout),
        }
        out["shared_logps"], out["shared_values"] = ppo.rollout_values(
            model, head, ro, shared=True, pad_token_id=pad, **layout
        )
        out["separate_logps"], out["separate_values"] = ppo.rollout_values(
            model, critic, ro, shared=False, pad_token_id=pad, **layout
        )
    finally:
        for h in hooks:
            h.remove()
    return out, rows, slots


def test_packed_scoring_passes_equal_the_unpacked_ones(tiny_model, shape_images):
    """The old-policy, reference and PPO rollout-scoring passes (log-probs and values of a value head on
    the policy, and of a separate critic model) with ``pack_length`` (two prompts per row) equal the
    passes with one prompt per row (fp32, 1e-5), in half the rows of every model; the tokens and slots
    counted are those of the packed layout."""
    model, processor = tiny_model("qwen2_vl")
    model.eval()
    pad = pad_token_id_of(processor)
    ro = _rollouts(processor, shape_images)
    reference = make_reference("copy", model, pad_token_id=pad)
    critic = CriticModel(copy.deepcopy(model), new_head(model, seed=1))
    head = new_head(model, seed=0)
    plain, plain_rows, plain_slots = _scoring_passes(model, reference, head, critic, ro, pad, 0)
    pack = _pack_length(ro)
    packed, rows, slots = _scoring_passes(model, reference, head, critic, ro, pad, pack)
    assert plain_rows == {"policy": [4, 4, 4], "reference": [4], "critic": [4]}
    assert rows == {"policy": [2, 2, 2], "reference": [2], "critic": [2]}  # fewer rows ran in every pass
    for key, value in plain.items():
        assert value.shape == (ro.num_rows, ro.width) and float(value[ro.mask].abs().min()) > 0, key
        torch.testing.assert_close(packed[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert float((plain["shared_values"] - plain["separate_values"]).abs().max()) > 1e-3  # two different critics
    tokens, width = useful_token_counts(ro.prompts.lengths, ro.token_ids, pack)
    assert (slots.tokens, slots.slots) == (2 * tokens, 2 * width)  # old + reference passes, packed
    assert slots.tokens == plain_slots.tokens and slots.slots < plain_slots.slots
    assert plain_slots.fraction() < slots.fraction() <= 1.0


# ----------------------------------------------------------------------------- whole steps


def _rl_args(model_dir: Path, world: Path, out: Path, pack: int, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={world / 'train_prompts.jsonl'}",
        f"--train.output_dir={out}",
        "--train.batch_size=4",  # prompts of different lengths (existence, counting): padded without packing
        "--train.lr=1e-3",
        "--train.max_steps=1",
        "--train.save_every=0",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--rollout.n=3",
        "--rollout.max_new_tokens=6",
        "--eval_tasks=[]",
        "--update.epochs=2",  # off-policy: the old log-probs are computed (and used by the second epoch)
        "--update.kl_coef=0.05",  # a reference pass
        "--update.reference=copy",
        f"--update.logprob_pack_length={pack}",
        *extra,
    ]


def _compare_steps(plain_dir: Path, packed_dir: Path, skip: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The one logged step of each run: every number but timings, layouts and ``skip`` equal within 1e-5."""
    (plain,), (packed,) = ([r for r in read_metrics(d) if "train/loss" in r] for d in (plain_dir, packed_dir))
    numbers = [k for k in plain if not k.startswith(("perf/", "time", *skip)) and isinstance(plain[k], (int, float))]
    assert set(numbers) <= set(packed) and len(numbers) > 10
    for key in numbers:
        assert packed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), (key, plain[key], packed[key])
    assert (plain_dir / "completions.jsonl").read_text() == (packed_dir / "completions.jsonl").read_text()
    return plain, packed


def test_a_packed_grpo_step_logs_the_unpacked_numbers(tiny_model_dir, recipe_world, tmp_path):
    """One GRPO step with old-policy and reference passes (two update epochs, a KL in the loss): with
    every prompt of a micro-batch in one row the logged losses, KL, ratios, entropies and gradient norms
    equal those of one prompt per row, and the scoring passes fill every slot of their rows."""
    model_dir = tiny_model_dir("qwen2_vl")
    reward = tmp_path / "parity.py"  # splits most groups, so the step moves the policy
    reward.write_text("def parity(completion, sample):\n    return float(sum(map(ord, completion)) % 2)\n")
    extra = ("--grpo.tasks=[existence, counting]", f"--rewards.weights={{{reward}:parity: 1.0}}")
    for pack in (0, 4096):
        grpo.run(load_config(grpo.Config, None, _rl_args(model_dir, recipe_world, tmp_path / str(pack), pack, *extra)))
    plain, packed = _compare_steps(tmp_path / "0", tmp_path / "4096")
    assert "kl/ref" in plain and plain["policy/ratio_mean"] != 1.0  # the reference and old log-probs took part
    assert packed["perf/useful_token_fraction_scoring"] == packed["perf/useful_token_fraction"] == 1.0
    assert plain["perf/useful_token_fraction_scoring"] == plain["perf/useful_token_fraction"] < 1.0  # same layout


@pytest.mark.parametrize("shared", [True, False])
def test_a_packed_ppo_step_logs_the_unpacked_numbers(tiny_model_dir, recipe_world, reward_model_dir, tmp_path, shared):
    """One PPO step (old log-probs and values, reference, two update epochs), with a value head on the
    policy or a separate critic: packed rows log the numbers of one prompt per row (values and returns
    included, ``value/clip_frac`` too: it once counted the rounding of ``v_old + (v - v_old)`` inside the
    clip range, about 0.1 of the tokens in either layout, and differed here; see ``losses.value_loss``)."""
    model_dir = tiny_model_dir("qwen2_vl")
    extra = (
        f"--reward_model={reward_model_dir}",
        "--rewards.weights={reward_model: 1.0}",
        "--ppo.tasks=[existence, counting]",
        f"--critic.shared={str(shared).lower()}",
    )
    for pack in (0, 4096):
        ppo.run(load_config(ppo.Config, None, _rl_args(model_dir, recipe_world, tmp_path / str(pack), pack, *extra)))
    plain, packed = _compare_steps(tmp_path / "0", tmp_path / "4096")
    assert {"values/mean", "returns/mean", "value/loss", "kl/seq"} <= set(plain)
    assert packed["perf/useful_token_fraction_scoring"] == packed["perf/useful_token_fraction"] == 1.0
    assert plain["perf/useful_token_fraction_scoring"] == plain["perf/useful_token_fraction"] < 1.0  # same layout
