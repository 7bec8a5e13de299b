"""``update.logprob_pack_length``: the GRPO update's forwards pack several prompts (each with its group)
per row, and the update is the same.

Packing changes only the layout of the policy forward (block-diagonal attention, positions
restarted per prompt, mRoPE included on Qwen2-VL): every completion token sees exactly the tokens
of its own prompt and completion, so its log-prob, and hence the loss and every gradient, equal
those of the one-prompt-per-row layout up to float32 rounding. The layout itself is checked too:
fewer slots than without packing, and the engine's (tokens, slots) equal
:func:`~vlalign.models.packing.useful_token_counts` of the packed layout (what
``perf/useful_token_fraction`` reports).
"""

from __future__ import annotations

import math

import pytest
import torch

from vlalign.config import ConfigError
from vlalign.data.collate import encode_prompts, image_token_ids, pad_token_id_of
from vlalign.data.schema import PromptSample
from vlalign.models.generate import GenerationSettings
from vlalign.models.packing import useful_token_counts
from vlalign.recipes.rl_common import PolicyUpdateConfig, policy_logprobs
from vlalign.recipes.rl_update import update, update_context
from vlalign.recipes.rollouts import Rollouts
from vlalign.training import Run, TrainConfig

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
