"""Server mode end to end: ``vlalign rollout-server`` in a subprocess, the trainer's ServerEngine here.

Run in the vLLM environment (``make test-vllm``). One server (tiny Qwen2-VL, fp32) for the module,
on a free port; every test pushes the weights it needs first. fp32 throughout, so greedy completions
through the server must equal vlalign's own decode loop token for token.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm runs these tests in its own environment)")

from test_vllm_recipes import _args, _online_args, parity  # noqa: E402, F401 (arguments and reward of the in-process tests)

from vlalign.config import load_config  # noqa: E402
from vlalign.models.generate import generate  # noqa: E402
from vlalign.models.vllm_client import ServerEngine  # noqa: E402
from vlalign.recipes import grpo  # noqa: E402
from vlalign.training.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(url, model folder)`` of a rollout server started once for the module (closed by POST /close)."""
    folder = tiny_model_dir("qwen2_vl")
    url = f"http://127.0.0.1:{_free_port()}"
    log = tmp_path_factory.mktemp("rollout-server") / "server.log"
    args = ["rollout-server", f"--model={folder}", f"--port={url.rsplit(':', 1)[1]}", "--dtype=float32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlalign.cli", *args, "--max_model_len=512"], env=env, stdout=out, stderr=out
        )
    deadline = time.monotonic() + 400
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the rollout server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, folder
    try:
        urllib.request.urlopen(urllib.request.Request(f"{url}/close", data=b""), timeout=10).read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_server_greedy_equals_hf_engine(server: Any, tiny_model: Any, vllm_prompts: list) -> None:
    """Greedy through the server: token ids, stop flags, texts and prompt ids equal vlalign's decode loop."""
    url, folder = server
    model, processor = tiny_model("qwen2_vl")
    client = ServerEngine(url, folder, processor)
    vl = client.generate(model, vllm_prompts, n=2, max_new_tokens=MAX_NEW)
    hf = generate(model, processor, vllm_prompts, n=2, max_new_tokens=MAX_NEW, keep_prompts=True)
    assert vl.token_ids == hf.token_ids
    assert vl.stopped == hf.stopped
    assert vl.texts == hf.texts
    assert [e.input_ids for e in vl.encoded] == [e.input_ids for e in hf.encoded]


def test_server_follows_pushed_weights(server: Any, tiny_model: Any, vllm_prompts: list) -> None:
    """After the policy changes, the next generate pushes its weights (in parts of at most 256 KiB: many
    parts, each loaded as it arrives) and the server's greedy completions are the changed policy's
    (and differ from before the change: the test can fail)."""
    url, folder = server
    model, processor = tiny_model("qwen2_vl")
    client = ServerEngine(url, folder, processor, chunk_bytes=256 << 10)
    before = client.generate(model, vllm_prompts, max_new_tokens=MAX_NEW).token_ids
    _perturb(model)
    vl = client.generate(model, vllm_prompts, max_new_tokens=MAX_NEW)
    hf = generate(model, processor, vllm_prompts, max_new_tokens=MAX_NEW, keep_prompts=True)
    assert client.version == 2
    with urllib.request.urlopen(f"{url}/health") as r:
        assert json.loads(r.read())["weights_version"] == 2
    assert vl.token_ids == hf.token_ids
    assert [g[0] for g in vl.token_ids] != [g[0] for g in before]


def test_grpo_with_rollout_server(server: Any, world_dir: Path, parity: str, tmp_path: Path) -> None:  # noqa: F811
    """Two GRPO steps generating on the server: the engine's log-probs of the sampled tokens agree with
    the trainer's at both steps (as in-process: test_vllm_recipes.test_grpo_with_vllm), so the server
    sampled from the updated policy at step 2."""
    url, folder = server
    out = tmp_path / "run"
    extra = ["--grpo.tasks=[describe]", "--update.rollout_is_cap=2.0", f"--rollout.vllm_server={url}"]
    grpo.run(load_config(grpo.Config, None, _args(folder, world_dir, out, parity) + extra))
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows), rows
    for r in rows:
        assert r["rollout_is/log_ratio_abs"] < 5e-3, r
        assert r["rollout_is/capped_frac"] == 0.0, r


def test_iterative_dpo_samples_on_the_server(server: Any, world_dir: Path, tmp_path: Path) -> None:
    """Two rounds of iterative DPO sampling on the server: each round pushes its saved policy to the
    server (which keeps serving the starting folder) and ranks what it samples."""
    from vlalign.data.io import load_samples
    from vlalign.recipes import dpo

    url, folder = server
    extra = ("--online.generation.temperature=1.0", f"--online.generation.vllm_server={url}")
    args, out = _online_args(folder, world_dir, tmp_path, *extra)
    final = dpo.run(load_config(dpo.Config, None, args))
    assert final["online/rounds"] == 2
    for r in (1, 2):
        assert len(load_samples(out / f"round-{r}" / "pairs.jsonl", "preference")) >= 2
    with urllib.request.urlopen(f"{url}/health") as answer:
        assert json.loads(answer.read())["weights_version"] == 1  # each round's client pushed its policy once
