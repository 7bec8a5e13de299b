"""FSDP2 through ``accelerate launch`` (``fully_shard``, float32), on GPUs only: SFT, DPO and KTO trained
sharded give the losses and final weights of one unsharded process on the same global batch, a
sharded run killed after 2 steps and resumed with ``--resume`` ends like the uninterrupted one, and
the final ``model/`` is a whole Hugging Face folder.

Why GPUs: accelerate 1.15 applies FSDP only to GPU-like processes; with ``ACCELERATE_USE_CPU=true``
an FSDP config silently runs DDP, and without it a GPU-less machine starts unconnected processes
(docs/distributed.md). The CPU test of the sharded checkpoint code itself is
``tests/recipes/test_fsdp_checkpoints.py`` (``fully_shard`` with gloo, no accelerate).
``benchmarks/gpu_check.sh`` runs this file (section e).

Processes: 2 when the machine has 2 GPUs or more, else 1 (FSDP over one GPU still runs the sharded
code paths: DTensor parameters, gathered checkpoints and final model). Global batch: 4 rows a step
(batch 1 x ``train.grad_accum`` 4 in one plain process; batch 1 x grad_accum 4/processes under
FSDP). Tolerances: float32 on the GPU, but cuDNN's convolutions (the vision patch embedding) may use
TF32 and FSDP reduces gradients in another order, so ``rel=1e-4`` on losses and ``atol=1e-4`` on
weights after 3 AdamW steps of lr 1e-3; a resumed run repeats the same kernels on the same inputs, up
to non-deterministic atomics in the embedding's backward: ``atol=1e-6``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlalign.config import load_config
from vlalign.data.annotations import load_vocabulary
from vlalign.data.io import load_samples, write_samples
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.recipes import dpo, kto, sft
from vlalign.training.metrics import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate applies FSDP on GPUs only"),
]

FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: {processes}
machine_rank: 0
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Qwen2VLDecoderLayer,Qwen2VLVisionBlock
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
rdzv_backend: static
same_network: true
"""
PROCESSES = 2 if torch.cuda.device_count() >= 2 else 1


@pytest.fixture(scope="module")
def pair_file(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    pairs, _ = inject_pairs(samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(tasks=("describe",)))
    out = tmp_path_factory.mktemp("fsdp-pairs") / "pairs.jsonl"
    write_samples(pairs, out)
    return out


def _common(model_dir: Path, data: Path, recipe: str) -> list[str]:
    extra = {"dpo": ["--loss.weights={mdpo: 1.0}"], "kto": ["--from_pairs=true"]}.get(recipe, [])
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cuda",
        "--model.dtype=float32",
        "--train.mixed_precision=no",
        f"--data.train={data}",
        "--data.limit=12",
        "--train.batch_size=1",
        "--train.lr=1e-3",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.warmup_ratio=0",
        "--train.schedule=constant",  # a 2-step run extended to 3 keeps the 3-step run's learning rates
        *extra,
    ]


def _launch(tmp_path: Path, recipe: str, args: list[str]) -> subprocess.CompletedProcess:
    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP_CONFIG.format(processes=PROCESSES))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # ``python -m``: the GPU check may install the packages with --target, without console scripts
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*launch, "--config_file", str(config), "--main_process_port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLALIGN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([*cmd, "-m", "vlalign.cli", recipe, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.parametrize("recipe", ["sft", "dpo", "kto"])
def test_fsdp2_matches_one_process_resumes_and_saves_a_whole_model(
    recipe, tiny_model_dir, recipe_world, pair_file, tmp_path
):
    module = {"sft": sft, "dpo": dpo, "kto": kto}[recipe]
    data = recipe_world / "train.jsonl" if recipe == "sft" else pair_file
    common = _common(tiny_model_dir("qwen2_vl"), data, recipe)
    one = tmp_path / "one"
    module.run(
        load_config(
            module.Config, None, [*common, "--train.max_steps=3", "--train.grad_accum=4", f"--train.output_dir={one}"]
        )
    )

    sharded = [*common, f"--train.grad_accum={4 // PROCESSES}", "--train.save_every=2"]
    whole = tmp_path / "whole"
    done = _launch(tmp_path, recipe, [*sharded, "--train.max_steps=3", f"--train.output_dir={whole}"])
    assert "3 steps of 4" in done.stdout
    a, b = read_metrics(one), read_metrics(whole)
    steps_a, steps_b = [r for r in a if "train/loss" in r], [r for r in b if "train/loss" in r]
    assert [r["step"] for r in steps_b] == [1, 2, 3]
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4), ra["step"]
    wa, wb = load_file(str(one / "model" / "model.safetensors")), load_file(str(whole / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)  # whole tensors, not shards
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-4)

    split = tmp_path / "split"
    _launch(tmp_path, recipe, [*sharded, "--train.max_steps=2", f"--train.output_dir={split}"])
    _launch(tmp_path, recipe, [*sharded, "--train.max_steps=3", f"--train.output_dir={split}", "--resume"])
    resumed = [r for r in read_metrics(split) if "train/loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[-1]["train/loss"] == pytest.approx(steps_b[-1]["train/loss"], abs=1e-6)
    wc = load_file(str(split / "model" / "model.safetensors"))
    for key in wb:
        torch.testing.assert_close(wc[key], wb[key], rtol=0, atol=1e-6)

    from vlalign.models.load import load_model_and_processor

    model, _ = load_model_and_processor(whole / "model", device="cpu", dtype="float32")
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
