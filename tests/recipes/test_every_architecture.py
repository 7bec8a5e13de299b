"""Every recipe runs a training step on every tiny architecture (``vlalign.models.tiny.ARCHITECTURES``).

One step each of SFT, DPO, KTO, reward-model training, GRPO and PPO, through the recipes' own
``run`` on the tiny model of each architecture: the loss is finite, the step changed the weights,
and the saved model reloads. What each recipe computes is tested in its own file on Qwen2-VL; this
file shows that nothing in a recipe is specific to one architecture.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlalign.config import load_config
from vlalign.data.io import load_samples, write_samples
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.models.tiny import ARCHITECTURES
from vlalign.recipes import dpo, grpo, kto, ppo, reward_model, sft
from vlalign.shapes.vocabulary import load_vocabulary
from vlalign.training.metrics import read_metrics


@pytest.fixture(scope="module")
def pairs(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight hallucination-injection pairs of the recipe world's descriptions."""
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    made, _ = inject_pairs(samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(tasks=("describe",)))
    out = tmp_path_factory.mktemp("every-arch-pairs") / "pairs.jsonl"
    write_samples(made[:8], out)
    return out


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A reward that splits most groups (1 for completions whose characters sum to an odd number)."""
    path = tmp_path_factory.mktemp("every-arch-reward") / "parity_reward.py"
    path.write_text("def parity(completion, sample):\n    return float(sum(map(ord, completion)) % 2)\n")
    return f"{path}:parity"


def _common(model_dir: Path, out: Path) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--train.warmup_ratio=0",
        "--train.max_steps=1",
        "--train.batch_size=2",
        "--train.lr=1e-3",
    ]


def _recipes(world: Path, pairs: Path, reward: str) -> dict[str, tuple[object, list[str]]]:
    prompts = world / "train_prompts.jsonl"
    rl = [f"--rewards.weights={{{reward}: 1.0}}", "--rollout.max_new_tokens=6", "--eval_tasks=[]"]
    return {
        "sft": (sft, [f"--data.train={world / 'train.jsonl'}", "--data.limit=4"]),
        "dpo": (dpo, [f"--data.train={pairs}"]),
        "dpo-lora": (dpo, [f"--data.train={pairs}", "--model.use_lora=true", "--model.lora.freeze_vision=false"]),
        "kto": (kto, [f"--data.train={pairs}", "--from_pairs=true"]),
        "rm": (reward_model, [f"--data.train={pairs}", f"--data.eval={pairs}"]),
        "grpo": (grpo, [f"--data.train={prompts}", "--grpo.tasks=[describe]", "--rollout.n=4", *rl]),
        "ppo": (ppo, [f"--data.train={prompts}", "--ppo.tasks=[describe]", *rl]),
    }


def _changed(start: Path, trained: Path) -> bool:
    """Some weight moved: a full model's tensors differ from the start's, or (LoRA) some ``lora_B``,
    which starts at zero, is no longer zero."""
    if (trained / "adapter_model.safetensors").is_file():
        adapter = load_file(trained / "adapter_model.safetensors")
        return any("lora_B" in k and bool(v.any()) for k, v in adapter.items())
    a, b = load_file(start / "model.safetensors"), load_file(trained / "model.safetensors")
    return any(k in a and a[k].shape == b[k].shape and not torch.equal(a[k], b[k]) for k in b)


def _lora_covers_language_and_vision(trained: Path) -> None:
    """LoRA's automatic targets reach the language model and (freeze_vision=false) the vision tower."""
    keys = list(load_file(trained / "adapter_model.safetensors"))
    assert any("lora_A" in k and ("language_model" in k or "text_model" in k) for k in keys), keys[:4]
    assert any("lora_A" in k and ("vision" in k or "visual" in k) for k in keys), keys[:4]


@pytest.mark.parametrize("recipe", ["sft", "dpo", "dpo-lora", "kto", "rm", "grpo", "ppo"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_step_of_every_recipe(arch, recipe, tiny_model_dir, recipe_world, pairs, parity, tmp_path):
    module, args = _recipes(recipe_world, pairs, parity)[recipe]
    start = tiny_model_dir(arch)
    out = tmp_path / "run"
    module.run(load_config(module.Config, None, _common(start, out) + args))
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0]), losses
    assert _changed(start, out / "model"), "the step left every weight as it was"
    if json.loads((start / "config.json").read_text()).get("text_config", {}).get("output_router_logits"):
        aux = [r["train/router_aux_loss"] for r in read_metrics(out) if "train/router_aux_loss" in r]
        assert len(aux) == 1 and aux[0] > 0, aux  # an MoE config asking for the router loss: trained and logged
    if recipe.endswith("-lora"):
        _lora_covers_language_and_vision(out / "model")
