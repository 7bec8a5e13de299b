"""Shared recipe pieces: the dtype a trained model loads in, the distributed guards every recipe
applies, the held-out suite of a task list."""

from __future__ import annotations

import ast
import inspect
import logging
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from vlalign.eval.suite import SuiteConfig
from vlalign.recipes import dpo, grpo, kto, ppo, reward_model, sft
from vlalign.recipes.common import ModelConfig, guard_distributed, task_suite, trained_weights_dtype


def test_auto_dtype_keeps_float32_master_weights_for_full_fine_tuning(caplog):
    assert trained_weights_dtype("auto", lora=False) == "float32"
    assert trained_weights_dtype("auto", lora=True) == "auto"  # frozen base: bf16 on a capable GPU
    assert trained_weights_dtype("float32", lora=False) == "float32"
    with caplog.at_level(logging.WARNING, logger="vlalign"):
        assert trained_weights_dtype("bfloat16", lora=False) == "bfloat16"  # an explicit choice stands
    assert "updates smaller than the weights' rounding step are lost" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlalign"):
        trained_weights_dtype("bfloat16", lora=True)
    assert caplog.text == ""


def test_why_bf16_weights_lose_small_updates():
    """The docstring's arithmetic: AdamW's first step moves each weight by lr (here 5e-5). A bf16
    weight of 0.0625 = 2**-4 has a rounding step of 2**-4 * 2**-7 = 4.9e-4, so the update (under half
    of it) rounds away; in float32 the weight moves by lr."""
    for dtype, moved in ((torch.bfloat16, 0.0), (torch.float32, 5e-5)):
        w = torch.nn.Parameter(torch.full((4,), 0.0625, dtype=dtype))
        opt = torch.optim.AdamW([w], lr=5e-5, weight_decay=0.0)
        w.grad = torch.ones_like(w)
        opt.step()
        assert torch.allclose((0.0625 - w.detach().float()), torch.full((4,), moved), rtol=1e-3, atol=0.0)


def _run(distributed_type: DistributedType, device: str = "cuda:1") -> SimpleNamespace:
    """What the guards read of a :class:`vlalign.training.Run` (a DeepSpeed config left at ``auto``)."""
    plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto"})
    accelerator = SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(deepspeed_plugin=plugin))
    return SimpleNamespace(accelerator=accelerator, device=torch.device(device), cfg=SimpleNamespace(batch_size=4))


def test_guard_refuses_accumulation_under_deepspeed_and_gives_each_process_its_device():
    """Under DeepSpeed (which steps its engine at every backward) more than one micro-batch per optimiser
    step is refused, naming the setting to change; one is fine, and so is any number under DDP. The
    model config that comes back loads onto this process's device when it said auto, and is unchanged
    otherwise."""
    deepspeed, ddp = _run(DistributedType.DEEPSPEED), _run(DistributedType.MULTI_GPU)
    with pytest.raises(ValueError, match="under DeepSpeed use train.grad_accum=1"):
        guard_distributed(deepspeed, ModelConfig(), micro_batches_per_step=2)
    with pytest.raises(ValueError, match="under DeepSpeed use update.minibatches"):
        guard_distributed(deepspeed, ModelConfig(), micro_batches_per_step=4, hint="update.minibatches")
    assert guard_distributed(deepspeed, ModelConfig(), micro_batches_per_step=1).device == "cuda:1"
    assert deepspeed.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    assert guard_distributed(ddp, ModelConfig(), micro_batches_per_step=8).device == "cuda:1"
    assert guard_distributed(ddp, ModelConfig(device="cpu"), micro_batches_per_step=8).device == "cpu"


@pytest.mark.parametrize(
    "loop", [sft.run, reward_model.run, dpo.train, kto.run, grpo.run, ppo.run], ids=lambda f: f.__module__
)
def test_every_recipe_applies_the_distributed_guard_before_loading_its_model(loop):
    """SFT, the reward model and PPO get the same guards as DPO, KTO and GRPO: each loop calls
    guard_distributed and loads the policy with the config it returns."""
    tree = ast.parse(inspect.getsource(loop))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    guards = [c for c in calls if c.func.id == "guard_distributed"]
    assert len(guards) == 1
    loads = [c for c in calls if c.func.id == "load_policy"]
    assert loads and guards[0].lineno <= loads[0].end_lineno  # before the load, or its argument


def test_task_suite_keeps_the_tasks_asked_for_and_pope_only_with_describe(recipe_world):
    """Held-out prompts of other tasks are dropped; POPE stays only when describe is asked for; nothing
    to evaluate (no parts, no tasks, or no prompt of the tasks) is None."""
    cfg = SuiteConfig(data=str(recipe_world), parts=("pope", "heldout"), describe=4, questions_per_task=3)
    counting = task_suite(cfg, ["counting"])
    assert counting is not None and counting.pope == {}
    assert counting.heldout and {s.meta.get("task") for s in counting.heldout} == {"counting"}
    described = task_suite(cfg, ["describe", "counting"])
    assert described is not None and described.pope and len(described.heldout) > len(counting.heldout)
    assert task_suite(cfg, []) is None and task_suite(SuiteConfig(parts=()), ["counting"]) is None
    assert task_suite(cfg, ["juggling"]) is None
