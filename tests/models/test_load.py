"""Model loading: fast failure without network, LoRA targets, trainable parts, saving and reloading."""

from __future__ import annotations

import re
import shutil
import time

import pytest
import torch
from torch import nn

from vlalign.data.collate import SupervisedCollator
from vlalign.data.schema import SupervisedSample, user_prompt
from vlalign.models.load import (
    LoraSpec,
    ModelLoadError,
    checkpointing_enabled,
    find_parts,
    load_model_and_processor,
    resolve_source,
    save_model_and_processor,
)
from vlalign.models.tiny import ARCHITECTURES

LANGUAGE = {
    "qwen2_vl": "model.language_model",
    "qwen2_5_vl": "model.language_model",
    "llava": "model.language_model",
    "idefics3": "model.text_model",
    "gemma3": "model.language_model",
    "internvl": "model.language_model",
    "llava_onevision": "model.language_model",
    "llava_next": "model.language_model",
    "qwen3_5": "model.language_model",
    "qwen3_5_moe": "model.language_model",
    "qwen3_vl": "model.language_model",
    "qwen3_vl_moe": "model.language_model",
    "mistral3": "model.language_model",
    "mllama": "model.language_model",
    "gemma4": "model.language_model",
    "paligemma": "model.language_model",
}
VISION = {
    "qwen2_vl": "model.visual",
    "qwen2_5_vl": "model.visual",
    "llava": "model.vision_tower",
    "idefics3": "model.vision_model",
    "gemma3": "model.vision_tower",
    "internvl": "model.vision_tower",
    "llava_onevision": "model.vision_tower",
    "llava_next": "model.vision_tower",
    "qwen3_5": "model.visual",
    "qwen3_5_moe": "model.visual",
    "qwen3_vl": "model.visual",
    "qwen3_vl_moe": "model.visual",
    "mistral3": "model.vision_tower",
    "mllama": "model.vision_model",
    "gemma4": "model.vision_tower",
    "paligemma": "model.vision_tower",
}
PROJECTOR = {
    "qwen2_vl": "model.visual.merger",
    "qwen2_5_vl": "model.visual.merger",
    "llava": "model.multi_modal_projector",
    "idefics3": "model.connector",
    "gemma3": "model.multi_modal_projector",
    "internvl": "model.multi_modal_projector",
    "llava_onevision": "model.multi_modal_projector",
    "llava_next": "model.multi_modal_projector",
    "qwen3_5": "model.visual.merger",
    "qwen3_5_moe": "model.visual.merger",
    "qwen3_vl": "model.visual.merger",
    "qwen3_vl_moe": "model.visual.merger",
    "mistral3": "model.multi_modal_projector",
    "mllama": "model.multi_modal_projector",
    "gemma4": "model.embed_vision",
    "paligemma": "model.multi_modal_projector",
}
EXTRA_PROJECTORS = {  # Qwen3-VL's DeepStack mergers (one per feeding vision layer) project vision features too
    "qwen3_vl": ["model.visual.deepstack_merger_list.0", "model.visual.deepstack_merger_list.1"],
    "qwen3_vl_moe": ["model.visual.deepstack_merger_list.0", "model.visual.deepstack_merger_list.1"],
}

ATTENTION_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MIXER_LEAVES = {  # token mixers other than attention, by layer type (Qwen3.5's gated delta net)
    "linear_attention": tuple(
        f"linear_attn.{n}" for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
    ),
    "cross_attention": tuple(f"cross_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")),  # Mllama's
}
DENSE_MLP_LEAVES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MLP_LEAVES = {  # MoE: routed experts are fused 3-D weights (no nn.Linear); the shared expert is linear
    "qwen3_5_moe": tuple(f"mlp.shared_expert.{n}" for n in ("gate_proj", "up_proj", "down_proj"))
    + ("mlp.shared_expert_gate",),
    "qwen3_vl_moe": (),  # no shared expert; the router is not an nn.Linear
    "gemma4": DENSE_MLP_LEAVES + ("per_layer_input_gate", "per_layer_projection"),  # per-layer embeddings' gates
}
LANGUAGE_EXTRAS = {"gemma4": {"model.language_model.per_layer_model_projection"}}
"""Linear layers of the language model outside its layers (Gemma 4's per-layer-embedding projection)."""


def _lora_modules(model: nn.Module) -> set[str]:
    prefix = "base_model.model."
    return {n[len(prefix) :] for n, m in model.named_modules() if hasattr(m, "lora_A") and n.startswith(prefix)}


def _batch(processor, images):
    samples = [
        SupervisedSample(id=f"s{i}", images=[im], prompt=user_prompt("What colour is the square?"), completion=c)
        for i, (im, c) in enumerate(zip(images, ["blue", "It is red."]))
    ]
    return SupervisedCollator(processor)(samples)


# ---------------------------------------------------------------------------- no network


def test_hub_name_with_hub_off_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model_and_processor("Qwen/Qwen2-VL-2B-Instruct")
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "'Qwen/Qwen2-VL-2B-Instruct' is not a local folder" in message
    assert "HF_HUB_OFFLINE" in message and "local folder" in message


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "http://10.255.255.1:81"])
def test_hub_name_with_unreachable_hub_fails_fast(endpoint, monkeypatch, tmp_path):
    """A refused port and a black-holed address: both fail within the probe timeout, no hang."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="unreachable.*local folder"):
        load_model_and_processor("llava-hf/llava-1.5-7b-hf", probe_timeout=1.0)
    assert time.perf_counter() - start < 3.0


def test_missing_folder_and_file_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(tmp_path / "nowhere" / "model")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_source(tmp_path / "f.bin")


def test_truncated_weights_are_named(tiny_model_dir, tmp_path):
    """A weights file cut short (a copy interrupted, a full disk) is a ModelLoadError naming the
    folder, not safetensors' bare error."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("qwen2_vl"), folder)
    (weights,) = folder.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=re.escape(repr(str(folder))) + r".*truncated or corrupt"):
        load_model_and_processor(str(folder), device="cpu")


# ----------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_auto_targets_language_model_projections(arch, tiny_model):
    """Default LoRA: exactly the 7 attention/MLP projections of every language-model layer."""
    model, _ = tiny_model(arch, lora=LoraSpec(r=4, alpha=8))
    n_layers = model.config.text_config.num_hidden_layers
    crosses = getattr(model.config.text_config, "cross_attention_layers", None) or ()  # Mllama
    kinds = getattr(model.config.text_config, "layer_types", None) or [
        "cross_attention" if i in crosses else "full_attention" for i in range(n_layers)
    ]
    expected = {
        f"{LANGUAGE[arch]}.layers.{i}.{leaf}"
        for i in range(n_layers)
        for leaf in MIXER_LEAVES.get(kinds[i], ATTENTION_LEAVES) + MLP_LEAVES.get(arch, DENSE_MLP_LEAVES)
    } | LANGUAGE_EXTRAS.get(arch, set())
    assert _lora_modules(model) == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_on_vision_and_trainable_projector(arch, tiny_model):
    plain, _ = tiny_model(arch)
    parts = find_parts(plain)
    projectors = [PROJECTOR[arch], *EXTRA_PROJECTORS.get(arch, [])]
    assert (parts.language, parts.vision, parts.projectors) == (LANGUAGE[arch], VISION[arch], projectors)
    vision_linear = {
        n
        for n, m in plain.named_modules()
        if n.startswith(VISION[arch] + ".")
        and not any(n.startswith(p + ".") for p in projectors)
        and isinstance(m, nn.Linear)
        and "patch_embed" not in n  # Gemma 4's patch embedding is linear; a patch embedding is never adapted
    }
    model, _ = tiny_model(arch, lora=LoraSpec(r=4, freeze_vision=False, train_projector=True))
    lora = _lora_modules(model)
    assert {n for n in lora if n.startswith(VISION[arch] + ".")} == vision_linear
    assert not any(re.search(r"patch_embed|lm_head|embed_tokens", n) for n in lora)
    projector_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    projector_params = [n for n, _ in plain.named_parameters() if any(n.startswith(p + ".") for p in projectors)]
    assert len(projector_trainable) == len(projector_params) > 0


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_full_finetuning_can_freeze_the_vision_tower(arch, tiny_model):
    model, _ = tiny_model(arch, freeze_vision=True)
    for name, param in model.named_parameters():
        frozen = name.startswith(VISION[arch] + ".") and not name.startswith(PROJECTOR[arch] + ".")
        assert param.requires_grad is (not frozen), name
    model, _ = tiny_model(arch)
    assert all(p.requires_grad for p in model.parameters())


def test_dtype_and_gradient_checkpointing(tiny_model, shape_images):
    """Checkpointing gives the same gradients as a plain backward (float32, to 1e-6)."""
    grads = []
    for checkpointing in (False, True):
        model, processor = tiny_model("qwen2_vl", gradient_checkpointing=checkpointing)
        assert checkpointing_enabled(model) is checkpointing
        model.train()
        batch = _batch(processor, shape_images[:2])
        model(**batch.model_inputs(), labels=batch.labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)
    model, _ = tiny_model("qwen2_vl", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------------- saving


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


@pytest.mark.parametrize("arch", ["qwen2_vl", "gemma3"])
def test_save_adapter_merged_and_full_reload_identically(arch, tiny_model, shape_images, tmp_path):
    model, processor = tiny_model(arch, lora=LoraSpec(r=4, alpha=8, dropout=0.0, train_projector=True))
    batch = _batch(processor, shape_images[:2])
    with torch.no_grad():  # move the adapters (and the projector copy) away from their init
        for _name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    reference = _logits(model, batch)

    adapter = save_model_and_processor(model, processor, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    reloaded, reloaded_processor = load_model_and_processor(adapter, device="cpu", dtype="float32")
    assert hasattr(reloaded, "peft_config") and type(reloaded_processor).__name__ == type(processor).__name__
    torch.testing.assert_close(_logits(reloaded, batch), reference, atol=1e-5, rtol=0)

    merged = save_model_and_processor(model, processor, tmp_path / "merged", mode="merged")
    assert hasattr(model, "peft_config")  # the model itself stays wrapped
    plain, _ = load_model_and_processor(merged, device="cpu", dtype="float32")
    assert not hasattr(plain, "peft_config")
    torch.testing.assert_close(_logits(plain, batch), reference, atol=1e-5, rtol=0)

    full = save_model_and_processor(plain, processor, tmp_path / "full")
    again, _ = load_model_and_processor(full, device="cpu", dtype="float32")
    torch.testing.assert_close(_logits(again, batch), reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs a PEFT model"):
        save_model_and_processor(plain, processor, tmp_path / "x", mode="adapter")
