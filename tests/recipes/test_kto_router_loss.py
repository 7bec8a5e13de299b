"""KTO's MoE router loss over an optimiser step of several micro-batches.

KTO adds the router loss to every completion's loss (``coef * aux`` of its micro-batch's forward) and
divides the step's sum by its number of completions, so the step adds ``coef`` times the
completion-weighted mean of the micro-batches' aux losses; ``train/router_aux_loss`` logs that mean
(:class:`vlalign.models.moe.StepRouterLoss`, shares = completions), not the last micro-batch's alone.
"""

from __future__ import annotations

import pytest
import torch

from vlalign.data.chat import pad_token_id_of
from vlalign.data.schema import UnpairedSample, user_prompt
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.moe import ROUTER_METRIC, router_aux_coef
from vlalign.models.reference import make_reference
from vlalign.recipes import kto
from vlalign.training import Run, TrainConfig

ROWS = [
    ("Describe.", "A red circle.", True),
    ("Colour?", "Blue.", False),
    ("Is there a triangle?", "Yes, there is one green triangle.", True),
    ("Describe.", "Two squares.", False),
    ("How many stars?", "Three.", True),
]


def test_kto_logs_the_completion_weighted_router_loss(tiny_model, shape_images, tmp_path):
    """Micro-batches of 2 and 3 completions on the tiny Qwen3.5-MoE: the logged router loss is the mean
    of the engine's aux loss of each micro-batch's policy forward (the starting weights: the optimiser
    steps after both), weighted 2 : 3. The policy starts as its reference, so every KTO loss is 0.5
    (rewards 0, z0 0 but for rounding) and ``train/loss`` = 0.5 + coef * that mean."""
    model, processor = tiny_model("qwen3_5_moe")
    coef = router_aux_coef(model)
    assert coef is not None and coef > 0
    pad = pad_token_id_of(processor)
    samples = [
        UnpairedSample(f"u{i}", [shape_images[i % len(shape_images)]], user_prompt(q), c, label, {})
        for i, (q, c, label) in enumerate(ROWS)
    ]
    encoder = kto.UnpairedEncoder(processor, max_length=None)
    batches = [encoder(samples[:2]), encoder(samples[2:])]
    with torch.no_grad():
        aux = [
            float(
                completion_logprobs(model, b.prompts, [[g[0]] for g in b.completions], pad_token_id=pad).router_aux_loss
            )
            for b in batches
        ]
    assert abs(aux[0] - aux[1]) > 1e-4  # the micro-batches differ: the mean is not the last one
    expected = (2 * aux[0] + 3 * aux[1]) / 5
    reference = make_reference("copy", model, pad_token_id=pad)
    run = Run(TrainConfig(output_dir=str(tmp_path / "run"), trackers=[], progress=False))
    metrics, _ = kto.kto_step(run, model, reference, batches, kto.Config(), pad)
    assert metrics[ROUTER_METRIC].item() == pytest.approx(expected, rel=1e-6)
    assert abs(float(metrics["kl/reference_point"])) < 1e-5
    assert metrics["train/loss"].item() == pytest.approx(0.5 + coef * expected, abs=1e-6)
    router = next(p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    assert router.grad is not None and router.grad.abs().max() > 0  # the router loss was trained
