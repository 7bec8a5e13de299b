"""Fixtures of the recipe tests: a small shapes world, a reward model folder, a two-process launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vlalign.shapes.tasks import write_world
from vlalign.shapes.world import WorldConfig


@pytest.fixture(scope="session")
def recipe_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes world (48 px images) with every split, written once per session."""
    out = tmp_path_factory.mktemp("recipe-world")
    write_world(WorldConfig(n_train=60, n_validation=10, n_test=20, n_compositional=10, image_size=48, seed=3), out)
    return out


@pytest.fixture(scope="session")
def reward_model_dir(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) reward model folder on the tiny Qwen2-VL: a fixed, deterministic scorer."""
    from vlalign.models.heads import RewardModel, RewardModelInfo, new_head, save_reward_model
    from vlalign.models.load import load_model_and_processor

    model, processor = load_model_and_processor(tiny_model_dir("qwen2_vl"), device="cpu", dtype="float32")
    rm = RewardModel(model, new_head(model, seed=11))
    info = RewardModelInfo(hidden_size=rm.head.hidden_size, scale=0.1)
    return save_reward_model(rm, processor, tmp_path_factory.mktemp("rl-rm") / "rm", info)


DDP_CPU = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "ddp_cpu.yaml"


def _two_process_command(command: str, args: list[str], cache: Path) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command line and environment of ``vlalign <command> <args>`` as two
    CPU processes (gloo, ``examples/accelerate/ddp_cpu.yaml``) on a free port, one thread each."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["VLALIGN_CACHE"] = str(cache)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", str(DDP_CPU), "--main_process_port", str(port)]
    return [*cmd, "-m", "vlalign.cli", command, *args], env


@pytest.fixture
def launch_two_processes(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """``launch(command, args, timeout=300)``: ``vlalign <command> <args>`` as two CPU processes
    (gloo) through ``accelerate launch`` with ``examples/accelerate/ddp_cpu.yaml``, on a free port,
    one intra-op thread each; fails the test with the end of stderr if the launch fails."""

    def launch(command: str, args: list[str], *, timeout: int = 300) -> subprocess.CompletedProcess:
        cmd, env = _two_process_command(command, args, tmp_path / "cache")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return launch


@pytest.fixture
def start_two_processes(tmp_path: Path) -> Callable[..., subprocess.Popen]:
    """``start(command, args)``: what ``launch_two_processes`` runs, started in the background (to be
    killed by the test); its output goes to ``tmp_path / "killed.log"``."""

    def start(command: str, args: list[str]) -> subprocess.Popen:
        cmd, env = _two_process_command(command, args, tmp_path / "cache")
        out = open(tmp_path / "killed.log", "w")  # noqa: SIM115  (the child holds it; closed when the test ends)
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    return start
