"""Generation with an FSDP2-sharded policy, two CPU processes (gloo, ``torchrun``, torch's ``fully_shard``).

The processes decode different work: process 0 one prompt with an image for 3 tokens, process 1 two
text-only prompts for 5 tokens each. A sharded forward all-gathers each layer's weights from every
process, so without :func:`vlalign.training.distributed.whole_weights` the processes' gathers stop
matching (measured here: gloo aborts with "Received data size doesn't match expected size" after
about 30 s; NCCL would hang). Inside it the weights are gathered once and every forward is local: each
process must produce, token for token, the greedy completions of the unsharded model (the gathered
weights are exact copies, so the logits are the same floats).

Then each process scores shared-prefix rows (one packed row per prompt with its completions), a
different number per process (1 prompt x 2 completions against 2 prompts x 8), with images on
both, forward and backward under FSDP2: the log-probs equal the unsharded model's exactly (the
gathered weights are exact copies and the kernels see the same shapes; measured 0.0), and every trainable parameter gets its gradient (one forward and one backward per process whatever
its row count, so the gathers and reduce-scatters match).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

WORKER = r"""
import json, sys
from pathlib import Path
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.data.collate import encode_completions, encode_prompts, pad_token_id_of
from vlalign.models.generate import generate
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.load import load_model_and_processor
from vlalign.training.distributed import whole_weights

source, image, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo")
rank = dist.get_rank()
model, processor = load_model_and_processor(source, device="cpu", dtype="float32")
if rank == 0:
    samples = [PromptSample(id="a", images=[image], prompt=user_prompt("Describe the image.", 1))]
else:
    questions = ["Name a shape.", "Count to three."]
    samples = [PromptSample(id=f"t{i}", images=[], prompt=user_prompt(q, 0)) for i, q in enumerate(questions)]
kwargs = dict(max_new_tokens=3 if rank == 0 else 5, batch_size=1)
plain = generate(model, processor, samples, **kwargs).token_ids
# shared-prefix rows, a different number per process: rank 0 one prompt x 2 completions, rank 1 two x 8
scored_prompts = [PromptSample(id=f"s{i}", images=[image], prompt=user_prompt("Describe.", 1)) for i in range(rank + 1)]
texts = [["A red disc.", "No."]] if rank == 0 else [[f"Shape number {j}." for j in range(8)]] * 2
encoded, completions = encode_prompts(processor, scored_prompts), encode_completions(processor, texts)
pad = pad_token_id_of(processor)
plain_logps = completion_logprobs(model, encoded, completions, pad_token_id=pad, mode="shared").logps.detach()
for module in model.modules():
    if type(module).__name__ in ("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"):
        fully_shard(module)
fully_shard(model)
with whole_weights(model):
    sharded = generate(model, processor, samples, **kwargs).token_ids
model.train()
scored = completion_logprobs(model, encoded, completions, pad_token_id=pad, mode="shared")
scored.logps.sum().backward()  # one forward and one backward per process, whatever its row count
logps_diff = float((scored.logps.detach() - plain_logps).abs().max())
grads = all(p.grad is not None for p in model.parameters() if p.requires_grad)
resharded = any(type(p).__name__ == "DTensor" and p.to_local().numel() < p.numel() for p in model.parameters())
result = {"plain": plain, "sharded": sharded, "resharded": resharded, "logps_diff": logps_diff, "grads": grads}
(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
"""


def test_sharded_policy_decodes_different_work_per_process(tiny_model_dir, recipe_world, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    image = sorted((recipe_world / "images" / "train").glob("*.png"))[0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [str(tiny_model_dir("qwen2_vl")), str(image), str(tmp_path)]
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank, (prompts, tokens) in enumerate([(1, 3), (2, 5)]):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["sharded"] == result["plain"]
        assert len(result["plain"]) == prompts and all(len(ids[0]) == tokens for ids in result["plain"])
        assert result["resharded"]  # the weights are shards again after the block
        assert result["logps_diff"] == 0.0 and result["grads"]  # shared-prefix rows under FSDP2
