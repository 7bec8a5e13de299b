"""Helpers of :mod:`vlalign.training.distributed` for sharded and mixed-modality runs, in one process.

* :func:`vision_touch` is exactly zero and gives every trainable vision-tower and projector parameter
  a gradient of exactly zero (what a text-only process contributes to DDP's all-reduce), and leaves the
  language model's gradients as the loss alone makes them; frozen parameters stay without gradient.
* :func:`whole_weights` does nothing to an unsharded model.
* :func:`sharding_of` names FSDP and ZeRO-3 and nothing else; :func:`fill_deepspeed_batch` sets
  DeepSpeed's ``auto`` micro-batch from ``train.batch_size`` and keeps a value the user set.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from accelerate.utils import DistributedType

from vlalign.models.load import find_parts, load_model_and_processor
from vlalign.training.distributed import fill_deepspeed_batch, sharding_of, vision_touch, whole_weights


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_vision_touch_gives_zero_gradients_to_the_vision_tower_only(tiny_model_dir):
    model, _ = load_model_and_processor(tiny_model_dir("qwen2_vl"), device="cpu", dtype="float32")
    parts = find_parts(model)
    vision = [p for p in (parts.vision, *parts.projectors) if p]
    for name, param in model.named_parameters():  # freeze one vision block: it must stay without gradient
        if ".blocks.1." in name:
            param.requires_grad_(False)
    ids = torch.tensor([[1, 2, 3, 4]])
    loss = model(input_ids=ids).logits.float().square().mean()  # text only: the vision tower never runs
    touch = vision_touch(model)
    assert touch.item() == 0.0
    (loss + touch).backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
        elif _under(name, vision):
            assert param.grad is not None and not param.grad.any(), name
    language = [p for n, p in model.named_parameters() if _under(n, [parts.language]) and p.grad is not None]
    assert language and any(p.grad.any() for p in language)


def test_whole_weights_leaves_an_unsharded_model_alone():
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    with whole_weights(model):
        assert torch.equal(model.weight, before)
    assert type(model.weight) is torch.nn.Parameter


def _run(kind: DistributedType, stage: int = 0, batch_size: int = 2, config: dict | None = None):
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=config if config is not None else {})
    state = SimpleNamespace(deepspeed_plugin=plugin)
    return SimpleNamespace(
        accelerator=SimpleNamespace(distributed_type=kind, state=state), cfg=SimpleNamespace(batch_size=batch_size)
    )


def test_sharding_of_names_fsdp_and_zero3_only():
    assert sharding_of(_run(DistributedType.FSDP)) == "FSDP"
    assert sharding_of(_run(DistributedType.DEEPSPEED, stage=3)) == "DeepSpeed ZeRO-3"
    assert sharding_of(_run(DistributedType.DEEPSPEED, stage=2)) is None
    assert sharding_of(_run(DistributedType.MULTI_CPU)) is None


def test_fill_deepspeed_batch_sets_auto_and_keeps_a_given_value():
    auto = {"train_micro_batch_size_per_gpu": "auto"}
    fill_deepspeed_batch(SimpleNamespace(deepspeed_config=auto), 3)
    assert auto["train_micro_batch_size_per_gpu"] == 3
    absent: dict = {}
    fill_deepspeed_batch(SimpleNamespace(deepspeed_config=absent), 2)
    assert absent["train_micro_batch_size_per_gpu"] == 2
    given = {"train_micro_batch_size_per_gpu": 8}
    fill_deepspeed_batch(SimpleNamespace(deepspeed_config=given), 2)
    assert given["train_micro_batch_size_per_gpu"] == 8
