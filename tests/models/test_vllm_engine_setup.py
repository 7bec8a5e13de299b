"""What the vLLM rollout engine decides without vLLM: start-up errors, weight names, merged LoRA weights.

(The engine itself is tested in tests/vllm, in the environment ``make test-vllm`` creates.)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from vlalign.errors import UserError
from vlalign.models.generate import GenerationSettings
from vlalign.models.load import LoraSpec
from vlalign.models.vllm_engine import VLLMError, check_vllm, merged_weights, unsupported_reason, vllm_weight_name

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_fails_in_one_line(tiny_model_dir) -> None:
    with pytest.raises(VLLMError) as info:
        check_vllm(tiny_model_dir("qwen2_vl"))
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "rollout.engine=hf" in message and "make test-vllm" in message


def test_architectures_vllm_cannot_load_are_named(tiny_model_dir, tmp_path: Path) -> None:
    """Gemma3's tiny tokenizer lacks the newline tokens vLLM looks up; Qwen2-VL at merge 1 (small) is
    ignored by vLLM; a model_type outside the tested set is refused; the tested ones pass."""
    assert "single tokens" in unsupported_reason(tiny_model_dir("gemma3"))
    assert "spatial_merge_size 1" in unsupported_reason(tiny_model_dir("qwen2_vl", "small"))
    for arch in ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3"):
        assert unsupported_reason(tiny_model_dir(arch)) is None, arch
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    assert "not one vlalign runs in vLLM" in unsupported_reason(tmp_path)


def test_llava_vision_tower_names_gain_vision_model() -> None:
    assert vllm_weight_name("llava", "model.vision_tower.encoder.layers.0.mlp.fc1.weight") == (
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    assert vllm_weight_name("llava", "vision_tower.vision_model.x") == "vision_tower.vision_model.x"
    assert vllm_weight_name("llava", "model.language_model.layers.0.x") == "model.language_model.layers.0.x"
    assert vllm_weight_name("qwen2_vl", "model.visual.x") == "model.visual.x"


def test_merged_lora_weights_equal_peft_merge(tiny_model) -> None:
    """With non-zero B, the merged weights equal PEFT's own merge_and_unload of a copy (names and
    values), and the policy keeps its adapter."""
    model, _ = tiny_model("qwen2_vl", lora=LoraSpec(r=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    ours = dict(merged_weights(model))
    reference, _ = tiny_model("qwen2_vl", lora=LoraSpec(r=4, alpha=8))
    reference.load_state_dict(model.state_dict())
    merged = dict(reference.merge_and_unload().named_parameters())
    assert set(ours) == set(merged)
    for name, value in merged.items():
        torch.testing.assert_close(ours[name], value.detach(), rtol=0, atol=1e-6, msg=name)
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_hf_stays_the_default_engine() -> None:
    assert GenerationSettings().engine == "hf"
