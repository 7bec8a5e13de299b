"""The MoE router loss of an optimiser step of several micro-batches (SFT, reward model).

:class:`vlalign.models.moe.StepRouterLoss` adds ``share * coef * aux`` to each micro-batch's loss and
logs ``sum share * aux / sum share`` over the step (SFT: shares are completion tokens; the reward
model: pairs). The reward model's forward captures the router logits twice (the recipe around
the forward, the log-prob engine inside it): on a packed layout (a 4-D mask) only the engine knows
the real tokens, and the recipe's capture reads them from it.
"""

from __future__ import annotations

import pytest
import torch

from vlalign.data.chat import pad_token_id_of
from vlalign.data.collate import SupervisedCollator
from vlalign.data.schema import PreferenceSample, SupervisedSample, user_prompt
from vlalign.models.heads import RewardModel, RewardModelInfo, hidden_size_of, new_head
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.moe import ROUTER_METRIC, RouterCapture, RouterLoss, StepRouterLoss
from vlalign.recipes import reward_model
from vlalign.recipes.sft import sft_step
from vlalign.training import Run, TrainConfig


def _run(tmp_path) -> Run:
    return Run(TrainConfig(output_dir=str(tmp_path / "run"), trackers=[], progress=False))


def test_step_router_loss_by_hand(tiny_model):
    """coef 0.001 (the tiny Qwen3.5-MoE's). Micro-batch 1: aux 0.5, share 0.25; micro-batch 2: aux 1.0,
    share 0.75. Losses: 2 + 0.25 * 0.001 * 0.5 = 2.000125 and 3 + 0.75 * 0.001 * 1.0 = 3.00075; logged
    (0.25 * 0.5 + 0.75 * 1.0) / (0.25 + 0.75) = 0.875 (the last micro-batch alone would be 1.0). Two
    processes with the same numbers (reduce = sum of both) log the same mean. A dense model adds
    nothing and logs nothing."""
    model, _ = tiny_model("qwen3_5_moe")
    step = StepRouterLoss(model)
    out = [
        step.add(torch.tensor(2.0), RouterLoss(torch.tensor(0.5), 0.001), weight=torch.tensor(0.25)),
        step.add(torch.tensor(3.0), RouterLoss(torch.tensor(1.0), 0.001), weight=0.75),
    ]
    torch.testing.assert_close(torch.stack(out), torch.tensor([2.000125, 3.00075]))
    torch.testing.assert_close(step.metrics()[ROUTER_METRIC], torch.tensor(0.875))
    torch.testing.assert_close(step.metrics(lambda t: t * 2)[ROUTER_METRIC], torch.tensor(0.875))
    dense = StepRouterLoss(tiny_model("qwen3_5")[0])
    assert dense.add(torch.tensor(2.0), RouterLoss(None, None), weight=0.5).item() == 2.0
    assert dense.metrics() == {}


def test_sft_logs_the_token_weighted_mean_of_its_micro_batches(tiny_model, shape_images, tmp_path):
    """Two micro-batches of 1 and 2 completions: the logged router loss is the mean of the model's own
    ``aux_loss`` of each micro-batch (its forward with labels and ``output_router_logits``), weighted by
    their completion tokens; it differs from the last micro-batch's alone."""
    model, processor = tiny_model("qwen3_5_moe")
    collate = SupervisedCollator(processor)
    batches = [
        collate([SupervisedSample("a", [shape_images[0]], user_prompt("Describe."), "A red circle.")]),
        collate(
            [
                SupervisedSample("b", [shape_images[1]], user_prompt("Colour?"), "Blue."),
                SupervisedSample("c", [shape_images[2]], user_prompt("Describe."), "A green triangle and no square."),
            ]
        ),
    ]
    with torch.no_grad():
        own = [float(model(**b.model_inputs(), labels=b.labels, output_router_logits=True).aux_loss) for b in batches]
    tokens = [float(b.completion_mask.sum()) for b in batches]
    expected = sum(t * a for t, a in zip(tokens, own)) / sum(tokens)
    assert abs(own[0] - own[1]) > 1e-4  # the two micro-batches differ: the mean is not the last one
    metrics = sft_step(_run(tmp_path), model, batches)
    assert metrics[ROUTER_METRIC].item() == pytest.approx(expected, rel=1e-6)


def test_the_reward_model_step_on_a_packed_moe_batch(tiny_model, shape_images, tmp_path):
    """Tiny Qwen3-VL-MoE asked for its router loss: the reward model's forward takes the packed layout
    (a 4-D mask), whose real tokens the recipe's own capture cannot see. The step runs, adds the router
    loss and logs the pair-weighted mean of the engine's aux loss of each micro-batch."""
    backbone, processor = tiny_model("qwen3_vl_moe")
    backbone.config.text_config.output_router_logits = True
    model = RewardModel(backbone, new_head(backbone, seed=0))
    encoder = reward_model.PairEncoder(processor, RewardModelInfo(hidden_size_of(backbone)), max_length=None)
    pairs = [
        PreferenceSample(f"p{i}", [shape_images[i]], user_prompt(q), chosen, rejected)
        for i, (q, chosen, rejected) in enumerate(
            [
                ("Describe.", "A red circle.", "A blue square and a red circle."),
                ("Colour?", "Blue.", "Green."),
                ("Is there a triangle?", "Yes.", "No, there is none."),
            ]
        )
    ]
    batches = [encoder(pairs[:1]), encoder(pairs[1:])]
    pad = pad_token_id_of(processor)
    with torch.no_grad():
        engine = [
            completion_logprobs(backbone, b.prompts, b.completions, pad_token_id=pad, return_hidden=True)
            for b in batches
        ]
    assert all(e.mode == "shared" and e.router_aux_loss is not None for e in engine)
    expected = (1 * float(engine[0].router_aux_loss) + 2 * float(engine[1].router_aux_loss)) / 3
    cfg = reward_model.Config()
    metrics = reward_model.rm_step(_run(tmp_path), model, batches, cfg, pad_token_id=pad)
    assert metrics[ROUTER_METRIC].item() == pytest.approx(expected, rel=1e-6)
    router = next(p for n, p in backbone.named_parameters() if n.endswith("mlp.gate.weight"))
    assert router.grad is not None and router.grad.abs().max() > 0


def test_nested_captures_share_the_inner_masks(tiny_model, shape_images):
    """An outer capture around the engine's call on the packed layout records the same forward and
    gives the engine's aux loss (before, its forward's 4-D mask left it without real tokens: refused)."""
    backbone, processor = tiny_model("qwen3_vl_moe")
    backbone.config.text_config.output_router_logits = True
    encoder = reward_model.PairEncoder(processor, RewardModelInfo(hidden_size_of(backbone)), max_length=None)
    batch = encoder([PreferenceSample("p", [shape_images[0]], user_prompt("Describe."), "A red circle.", "No.")])
    pad = pad_token_id_of(processor)
    with torch.no_grad():
        with RouterCapture(backbone) as outer:
            inner = completion_logprobs(backbone, batch.prompts, batch.completions, pad_token_id=pad)
        assert len(outer.forwards) == 1
        torch.testing.assert_close(outer.aux_loss(), inner.router_aux_loss, rtol=0, atol=0)
