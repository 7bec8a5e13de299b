"""Two "nodes" of one CPU process each, launched as a real multi-node run: two ``accelerate launch``
commands with ``num_machines: 2`` and ``--machine_rank 0`` / ``--machine_rank 1`` (static rendezvous
on 127.0.0.1, gloo), the way ``examples/accelerate/multi_node.yaml`` is used on two machines.

A DPO run stopped after 2 steps and resumed with ``--resume`` on both nodes must end with the
per-step losses and the final weights of one process holding the same global batch (batch 1 x
grad_accum 2 in one process, batch 1 x 1 on each of 2 processes): the same arithmetic as
``test_data_parallel.py`` (only the order of float32 additions differs; its tolerances), plus an
exact resume (each process restores its own RNG state from ``rng-<rank>.pt``).
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
from vlalign.recipes import dpo
from vlalign.training.metrics import read_metrics

TWO_NODES = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 2
num_processes: 2
machine_rank: 0
main_process_ip: 127.0.0.1
use_cpu: true
mixed_precision: 'no'
gpu_ids: all
rdzv_backend: static
same_network: true
"""


def _two_nodes(tmp_path: Path, args: list[str]) -> None:
    """``vlalign dpo <args>`` on two local "nodes" (two accelerate launches, machine ranks 0 and 1)."""
    config = tmp_path / "two_nodes.yaml"
    config.write_text(TWO_NODES)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["VLALIGN_CACHE"] = str(tmp_path / "cache")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    nodes = [
        subprocess.Popen(
            [*launch, "--machine_rank", str(rank), "--main_process_port", str(port), "-m", "vlalign.cli", "dpo", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def pair_file(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    pairs, _ = inject_pairs(samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(tasks=("describe",)))
    out = tmp_path_factory.mktemp("mn-pairs") / "pairs.jsonl"
    write_samples(pairs[:8], out)
    return out


@pytest.mark.slow
def test_two_nodes_resume_and_match_one_process(tiny_model_dir, pair_file, tmp_path):
    common = [
        f"--model.name_or_path={tiny_model_dir('qwen2_vl')}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={pair_file}",
        "--data.eval=",
        "--train.batch_size=1",
        "--train.lr=1e-3",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.warmup_ratio=0",
        "--train.schedule=constant",  # a 2-step run extended to 3 keeps the 3-step run's learning rates
    ]
    one = tmp_path / "one"
    dpo.run(
        load_config(
            dpo.Config, None, [*common, "--train.max_steps=3", "--train.grad_accum=2", f"--train.output_dir={one}"]
        )
    )
    nodes = tmp_path / "nodes"
    _two_nodes(tmp_path, [*common, "--train.max_steps=2", "--train.save_every=2", f"--train.output_dir={nodes}"])
    assert sorted(p.name for p in (nodes / "checkpoints" / "step-0000002").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    _two_nodes(tmp_path, [*common, "--train.max_steps=3", f"--train.output_dir={nodes}", "--resume"])

    steps_a = [r for r in read_metrics(one) if "train/loss" in r]
    steps_b = [r for r in read_metrics(nodes) if "train/loss" in r]
    assert [r["step"] for r in steps_b] == [1, 2, 3]
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5, abs=1e-6)
    wa = load_file(str(one / "model" / "model.safetensors"))
    wb = load_file(str(nodes / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=2e-5)
