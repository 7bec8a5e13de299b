"""The MoE router's auxiliary loss: the engine's equals the model's own, its gradient is trained, recipes add it.

(Every recipe logging ``train/router_aux_loss`` on the tiny Qwen3.5-MoE, whose config asks for the
router loss, is checked in tests/recipes/test_every_architecture.py.)
"""

from __future__ import annotations

import pytest
import torch

from vlalign.data.chat import pad_token_id_of
from vlalign.data.collate import build_rows, encode_completions, encode_prompts
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.moe import ROUTER_METRIC, RouterLoss, add_router_aux_loss, router_aux_coef, router_logits_off
from vlalign.models.tiny import ARCHITECTURES

COMPLETIONS = [["Yes.", "No, there is a blue square."], ["A red disc and a green triangle.", "Nothing."]]


def _inputs(processor, images):
    samples = [
        PromptSample(id="a", images=[images[0]], prompt=user_prompt("Is there a red circle?")),
        PromptSample(id="b", images=[images[1], images[2]], prompt=user_prompt("Describe the shapes.", 2)),
    ]
    return encode_prompts(processor, samples), encode_completions(processor, COMPLETIONS)


def _router_weights(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


def test_add_router_aux_loss_by_hand():
    """loss 2, aux 0.5, coef 0.1, weight 0.5: 2 + 0.5 * 0.1 * 0.5 = 2.025, the unweighted 0.5 logged;
    a dense model (no aux loss) or a config asking for none leaves the loss and the metrics alone."""
    metrics: dict = {}
    out = add_router_aux_loss(torch.tensor(2.0), RouterLoss(torch.tensor(0.5), 0.1), metrics, weight=0.5)
    torch.testing.assert_close(out, torch.tensor(2.025))
    assert metrics == {ROUTER_METRIC: torch.tensor(0.5)}
    for dense in (RouterLoss(None, None), RouterLoss(torch.tensor(0.5), None)):
        quiet: dict = {}
        assert add_router_aux_loss(torch.tensor(2.0), dense, quiet).item() == 2.0 and quiet == {}


def test_engine_aux_loss_is_the_model_own_and_trained(tiny_model, shape_images):
    """Naive rows (2-D mask): the engine's aux loss equals the model's own ``aux_loss`` on the same
    rows, and backward through ``add_router_aux_loss`` gives the router weights coef x the gradient
    of the model's own aux loss. The cache path records both its passes and reaches the routers too."""
    model, processor = tiny_model("qwen3_5_moe")
    coef = router_aux_coef(model)
    assert coef == pytest.approx(0.001) and router_logits_off(model) == {"output_router_logits": False}
    pad = pad_token_id_of(processor)
    prompts, completions = _inputs(processor, shape_images)
    routers = _router_weights(model)
    assert len(routers) == model.config.text_config.num_hidden_layers
    # the model's own computation on the naive rows
    rows = build_rows(prompts, completions, pad_token_id=pad)
    own = model(**rows.model_inputs(), output_router_logits=True).aux_loss
    own_grads = torch.autograd.grad(coef * own, list(routers.values()))
    # the engine, naive mode
    scored = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
    assert scored.router_aux_coef == coef
    torch.testing.assert_close(scored.router_aux_loss, own, rtol=0, atol=1e-7)
    metrics: dict = {}
    add_router_aux_loss(scored.logps.sum() * 0.0, scored, metrics).backward()
    for (name, weight), expected in zip(routers.items(), own_grads):
        torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-9)
        assert weight.grad.abs().max() > 0, name
    assert metrics[ROUTER_METRIC] == scored.router_aux_loss.detach()
    # the cache path: prompt pass and completion pass, both recorded; gradients reach the routers
    model.zero_grad(set_to_none=True)
    cached = completion_logprobs(model, prompts, completions, pad_token_id=pad)
    assert cached.mode == "shared" and cached.router_aux_loss is not None
    assert 1.0 <= float(cached.router_aux_loss) <= model.config.text_config.num_experts  # its range (balanced: 1)
    cached.router_aux_loss.backward()
    assert all(w.grad is not None and w.grad.abs().max() > 0 for w in routers.values())


def test_dense_models_carry_no_router_loss(tiny_model, shape_images):
    model, processor = tiny_model("qwen3_5")
    prompts, completions = _inputs(processor, shape_images)
    with torch.no_grad():
        scored = completion_logprobs(model, prompts, completions, pad_token_id=pad_token_id_of(processor))
    assert (scored.router_aux_loss, scored.router_aux_coef) == (None, None) and router_logits_off(model) == {}


@pytest.mark.skipif("qwen3_vl_moe" not in ARCHITECTURES, reason="no tiny Qwen3-VL-MoE registered")
def test_any_config_asking_for_it_gets_it_packed_layout_included(tiny_model, shape_images):
    """Qwen3-VL-MoE (its config asks for no router loss by default; asked here): naive rows give the
    model's own aux loss; the packed layout (a 4-D mask, which the model's own computation cannot
    take) counts each real token of its rows once, and its gradient reaches the routers."""
    model, processor = tiny_model("qwen3_vl_moe")
    assert router_aux_coef(model) is None
    model.config.text_config.output_router_logits = True
    pad = pad_token_id_of(processor)
    prompts, completions = _inputs(processor, shape_images)
    rows = build_rows(prompts, completions, pad_token_id=pad)
    with torch.no_grad():
        own = model(**rows.model_inputs(), output_router_logits=True).aux_loss
        naive = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
    torch.testing.assert_close(naive.router_aux_loss, own, rtol=0, atol=1e-7)
    packed = completion_logprobs(model, prompts, completions, pad_token_id=pad)
    assert packed.mode == "shared" and 1.0 <= float(packed.router_aux_loss) <= model.config.text_config.num_experts
    packed.router_aux_loss.backward()
    assert all(w.grad is not None and w.grad.abs().max() > 0 for w in _router_weights(model).values())
