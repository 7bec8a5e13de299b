"""DeepSpeed ZeRO-2 and ZeRO-3 through ``accelerate launch``, on GPUs only (``ONLY=zero2`` or
``ONLY=zero3 bash benchmarks/gpu_check.sh``): not run on the development machine.

Why GPUs: accelerate 1.15 drives DeepSpeed only from GPU-like processes. Its ``PartialState`` takes
the DeepSpeed branch only when ``cpu`` is false, and without a CUDA/XPU/NPU/... device it then finds
no backend and sets ``num_processes = 1`` and ``process_index = 0`` on every process (while
DeepSpeed's own ``init_distributed`` has joined them into a gloo group of 2): ``prepare`` fails with
"train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2".
With ``ACCELERATE_USE_CPU=true`` the DeepSpeed branch is skipped and the run is plain DDP. DeepSpeed's
CPU accelerator (``DS_ACCELERATOR=cpu``) is a DeepSpeed setting; accelerate does not read it.

What is checked, over ``min(GPUs, 2)`` processes against one plain process on the same global batch
of 4 (one micro-batch per step: accelerate steps the DeepSpeed engine at every backward, so the
recipes refuse ``train.grad_accum > 1`` under DeepSpeed):

* DPO (full fine-tuning, float32, no clipping on either side): per-step losses ``rel=1e-4`` and final
  weights ``atol=1e-4`` after 3 AdamW steps of lr 1e-3 (cuDNN's TF32 convolutions in the vision
  patch embedding and another reduction order); the final ``model/`` holds whole tensors (ZeRO-3:
  gathered from the partitions); a run stopped after 2 steps and resumed ends like the uninterrupted
  one (``atol=1e-6``); under ZeRO-3 the reference is the cached log-probs (``reference: precomputed``,
  chosen automatically: no whole copy on every GPU);
* GRPO under ZeRO-3: the decode loop runs with the weights gathered
  (:func:`vlalign.training.distributed.whole_weights`), so processes that stop after different numbers
  of tokens do not hang; 2 steps give the one-process losses (``rel=1e-4``).
"""

from __future__ import annotations

import importlib.util
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
from vlalign.recipes import dpo, grpo
from vlalign.training.metrics import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate drives DeepSpeed on GPUs only"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]

DS_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: {processes}
machine_rank: 0
mixed_precision: 'no'
deepspeed_config:
  zero_stage: {stage}
  gradient_accumulation_steps: 1
  gradient_clipping: 0.0
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
rdzv_backend: static
same_network: true
"""
PROCESSES = 2 if torch.cuda.device_count() >= 2 else 1
STAGES = [int(s) for s in os.environ.get("VLALIGN_ZERO_STAGES", "2,3").split(",")]


@pytest.fixture(scope="module")
def pair_file(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    pairs, _ = inject_pairs(samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(tasks=("describe",)))
    out = tmp_path_factory.mktemp("ds-pairs") / "pairs.jsonl"
    write_samples(pairs, out)
    return out


def _launch(tmp_path: Path, stage: int, recipe: str, args: list[str]) -> subprocess.CompletedProcess:
    config = tmp_path / f"zero{stage}.yaml"
    config.write_text(DS_CONFIG.format(processes=PROCESSES, stage=stage))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd = [*launch, "--main_process_port", str(port), "-m", "vlalign.cli", recipe, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLALIGN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _common(model_dir: Path) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cuda",
        "--model.dtype=float32",
        "--train.mixed_precision=no",
        "--train.max_grad_norm=0",
        "--train.grad_accum=1",
        "--train.lr=1e-3",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.warmup_ratio=0",
        "--train.schedule=constant",  # a 2-step run extended to 3 keeps the 3-step run's learning rates
    ]


def _losses(folder: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(folder) if "train/loss" in r]


@pytest.mark.parametrize("stage", STAGES)
def test_dpo_under_zero_matches_one_process_and_resumes(stage, tiny_model_dir, pair_file, tmp_path):
    common = [*_common(tiny_model_dir("qwen2_vl")), f"--data.train={pair_file}", "--data.limit=12", "--data.eval="]
    one = tmp_path / "one"
    dpo.run(
        load_config(
            dpo.Config, None, [*common, "--train.batch_size=4", "--train.max_steps=3", f"--train.output_dir={one}"]
        )
    )
    sharded = [*common, f"--train.batch_size={4 // PROCESSES}", "--train.save_every=2"]
    whole = tmp_path / "whole"
    done = _launch(tmp_path, stage, "dpo", [*sharded, "--train.max_steps=3", f"--train.output_dir={whole}"])
    assert "3 steps of 4" in done.stdout
    if stage == 3:
        assert "reference: precomputed" in done.stdout
    assert _losses(whole) == pytest.approx(_losses(one), rel=1e-4)
    wa, wb = load_file(str(one / "model" / "model.safetensors")), load_file(str(whole / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-4)

    split = tmp_path / "split"
    _launch(tmp_path, stage, "dpo", [*sharded, "--train.max_steps=2", f"--train.output_dir={split}"])
    _launch(tmp_path, stage, "dpo", [*sharded, "--train.max_steps=3", f"--train.output_dir={split}", "--resume"])
    assert _losses(split)[-1] == pytest.approx(_losses(whole)[-1], abs=1e-6)
    wc = load_file(str(split / "model" / "model.safetensors"))
    for key in wb:
        torch.testing.assert_close(wc[key], wb[key], rtol=0, atol=1e-6)


@pytest.mark.skipif(3 not in STAGES, reason="ZeRO-3 not selected")
def test_grpo_under_zero3_generates_without_hanging(tiny_model_dir, recipe_world, tmp_path):
    reward = tmp_path / "parity_reward.py"
    reward.write_text("def parity(completion, sample):\n    return float(sum(map(ord, completion)) % 2)\n")
    common = [
        *_common(tiny_model_dir("qwen2_vl")),
        f"--data.train={recipe_world / 'train_prompts.jsonl'}",
        "--grpo.tasks=[describe]",
        f"--rewards.weights={{{reward}:parity: 1.0}}",
        "--rollout.n=4",
        "--rollout.max_new_tokens=6",
        "--eval_tasks=[]",
        "--train.max_steps=2",
    ]
    one = tmp_path / "one"
    grpo.run(load_config(grpo.Config, None, [*common, "--train.batch_size=2", f"--train.output_dir={one}"]))
    sharded = tmp_path / "sharded"
    _launch(tmp_path, 3, "grpo", [*common, f"--train.batch_size={2 // PROCESSES}", f"--train.output_dir={sharded}"])
    assert _losses(sharded) == pytest.approx(_losses(one), rel=1e-4, abs=1e-6)
