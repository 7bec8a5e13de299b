"""Checkpoints of FSDP2-sharded modules (``torch.distributed.fsdp.fully_shard``, DTensor parameters),
with two CPU processes (gloo, ``torchrun``).

accelerate 1.15 does not apply FSDP on CPU processes (see docs/distributed.md), but torch's
``fully_shard`` runs there, and the checkpoint code only sees DTensor parameters and optimiser states:
this test shards a small network with ``fully_shard`` itself and drives
:class:`vlalign.training.checkpoints.Checkpointer` through an ``Accelerator(cpu=True)``, as a recipe
does. Checked:

* the trainable state written is whole (each tensor of the unsharded shape), equal to the gathered
  parameters, and loads into an unsharded copy of the network;
* 2 steps, save, a fresh sharded network (other initial weights) and optimiser, load, 2 more steps
  end with exactly the weights of 4 steps in one go (``torch.equal``): the optimiser shards (AdamW's
  moments are DTensors) are saved per process and restored as DTensors;
* the 4 sharded steps match 4 unsharded steps on the whole batch to float32 rounding (each
  process holds half of the 8 rows, its loss divides by the global count of 8 and FSDP averages
  the gradients over the 2 processes, so the loss is multiplied by 2; ``atol=1e-6`` on weights of
  size ~0.5 after 4 AdamW steps of lr 1e-2, Adam's normalisation amplifying only gradients near zero,
  none here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

WORKER = r"""
import json, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.fsdp import fully_shard
from vlalign.training.checkpoints import Checkpointer, is_sharded, load_trainable_state_dict, trainable_state_dict

out = Path(sys.argv[1])
acc = Accelerator(cpu=True)
rank, world = acc.process_index, acc.num_processes
x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
y = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))


def network(seed, shard=True):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    if shard:
        fully_shard(net[0]); fully_shard(net[2]); fully_shard(net)
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2)


def steps(net, opt, n, rows, scale):
    for _ in range(n):
        loss = ((net(x[rows]) - y[rows]) ** 2).sum() / 8 * scale
        loss.backward(); opt.step(); opt.zero_grad()


mine = slice(4 * rank, 4 * rank + 4)
whole, whole_opt = network(0)
steps(whole, whole_opt, 4, mine, world)
final = trainable_state_dict(whole)

split, split_opt = network(0)
steps(split, split_opt, 2, mine, world)
at_two = trainable_state_dict(split)
ckpt = Checkpointer(out / "run")
path = ckpt.save(2, modules={"model": split}, optimizer=split_opt, accelerator=acc)
resumed, resumed_opt = network(7)
ckpt.load(path, modules={"model": resumed}, optimizer=resumed_opt, accelerator=acc)
steps(resumed, resumed_opt, 2, mine, world)
after = trainable_state_dict(resumed)

if rank == 0:
    from safetensors.torch import load_file
    saved = load_file(str(path / "model.safetensors"))
    plain, plain_opt = network(3, shard=False)
    load_trainable_state_dict(plain, saved)
    reference, reference_opt = network(0, shard=False)
    steps(reference, reference_opt, 4, slice(0, 8), 1)
    result = {
        "sharded": is_sharded(whole),
        "files": sorted(p.name for p in path.iterdir()),
        "shapes": {k: list(v.shape) for k, v in saved.items()},
        "saved_is_gathered": all(torch.equal(saved[k], at_two[k]) for k in at_two),
        "loaded_unsharded": all(torch.equal(p, at_two[k]) for k, p in plain.named_parameters()),
        "resume_exact": all(torch.equal(after[k], final[k]) for k in final),
        "vs_one_process": max(float((final[k] - p).abs().max()) for k, p in reference.named_parameters()),
    }
    (out / "result.json").write_text(json.dumps(result))
acc.wait_for_everyone()
"""


def _torchrun() -> list[str]:
    """``torchrun`` with two processes on a free port (``python -m``: no console script needed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]


def test_sharded_checkpoint_is_whole_and_resumes_exactly(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = _torchrun()
    done = subprocess.run([*cmd, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["sharded"]
    shards = ["optimizer-0.pt", "optimizer-1.pt"]  # each process's shard of AdamW's moments
    assert result["files"] == ["model.safetensors", *shards, "rng-0.pt", "rng-1.pt", "state.json"]
    assert result["shapes"] == {"0.weight": [8, 6], "0.bias": [8], "2.weight": [3, 8], "2.bias": [3]}
    assert result["saved_is_gathered"] and result["loaded_unsharded"]
    assert result["resume_exact"]
    assert result["vs_one_process"] == pytest.approx(0.0, abs=1e-6)


FINAL_MODEL = r"""
import sys
from pathlib import Path
from torch.distributed.fsdp import fully_shard
from vlalign.models.load import load_model_and_processor
from vlalign.recipes.common import save_final_model
from vlalign.training import Run, TrainConfig

source, out = sys.argv[1], Path(sys.argv[2])
run = Run(TrainConfig(output_dir=str(out), trackers=[], progress=False), desc="sft")
model, processor = load_model_and_processor(source, device="cpu", dtype="float32")
for module in model.modules():
    if type(module).__name__ in ("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"):
        fully_shard(module)
fully_shard(model)
save_final_model(run, model, processor, "auto")
"""


def test_final_model_of_a_sharded_model_is_a_whole_folder(tiny_model_dir, tmp_path):
    """The tiny Qwen2-VL sharded over two processes (decoder layers, vision blocks, root) is written by
    :func:`vlalign.recipes.common.save_final_model` as a Hugging Face folder that loads unsharded, with
    every weight equal to the source's (no training: the gather must be exact)."""
    from safetensors.torch import load_file

    from vlalign.models.load import load_model_and_processor

    source = tiny_model_dir("qwen2_vl")
    script = tmp_path / "final_model.py"
    script.write_text(FINAL_MODEL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    cmd = _torchrun()
    run_dir = tmp_path / "run"
    done = subprocess.run([*cmd, str(script), str(source), str(run_dir)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    model, _ = load_model_and_processor(run_dir / "model", device="cpu", dtype="float32")
    want = load_file(str(source / "model.safetensors"))
    got = load_file(str(run_dir / "model" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    reference, _ = load_model_and_processor(source, device="cpu", dtype="float32")
    loaded, expected = model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
