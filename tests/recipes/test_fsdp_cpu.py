"""FSDP2 recipes on CPU: two processes (gloo) whose trained modules are sharded with torch's
``fully_shard`` (``VLALIGN_FSDP2_CPU=1``, :func:`vlalign.training.distributed.shard_on_cpu`) give
the per-step losses, rewards and final weights of one unsharded process holding the same global
batch, and the final ``model/`` folder is a whole Hugging Face folder that ``from_pretrained`` loads.

Same samples at every step (:class:`vlalign.training.BatchPlan`): one process with 2 micro-batches
of 2, or two processes with 1 micro-batch of 2 each. Every per-example mean divides by the step's
global count (summed before any backward); FSDP2 reduce-scatters the gradients as an average over
the 2 processes, exactly what DDP's all-reduce gives, and AdamW then updates each process's shard
elementwise. Only the order of float32 additions differs between the runs (the gradient sums, the
clip's global norm computed from per-shard norms), so the tolerances are those of
``test_data_parallel.py``: rel 1e-5 on per-step metrics, atol 2e-5 on weights of size ~0.1 after 3
AdamW steps of lr 1e-3 (Adam's normalisation turns a rounding difference of a near-zero gradient
into at most a few lr-sized steps' worth only where gradients cancel; none here).

The sharded run picks cached reference log-probs (``reference.strategy=auto`` under sharding), the
one-process run a frozen copy: both score the starting weights, so the rewards agree to rounding.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from vlalign.config import load_config
from vlalign.data.annotations import load_vocabulary
from vlalign.data.io import load_samples, write_samples
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.models.load import load_model_and_processor
from vlalign.recipes import dpo, grpo, kto, ppo, reward_model, sft
from vlalign.training.distributed import FSDP2_CPU
from vlalign.training.metrics import read_metrics


@pytest.fixture(scope="module")
def pair_file(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    pairs, _ = inject_pairs(samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(tasks=("describe",)))
    out = tmp_path_factory.mktemp("fsdp-cpu-pairs") / "pairs.jsonl"
    write_samples(pairs, out)
    return out


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A reward that splits most groups (1 for completions whose characters sum to an odd number)."""
    path = tmp_path_factory.mktemp("fsdp-cpu-reward") / "parity_reward.py"
    path.write_text("def parity(completion, sample):\n    return float(sum(map(ord, completion)) % 2)\n")
    return f"{path}:parity"


def _recipe_args(recipe: str, world: Path, pairs: Path, reward: str) -> tuple[object, list[str]]:
    rl = [f"--rewards.weights={{{reward}: 1.0}}", "--rollout.max_new_tokens=6", "--eval_tasks=[]"]
    prompts = world / "train_prompts.jsonl"
    return {
        "sft": (sft, [f"--data.train={world / 'train.jsonl'}", "--data.limit=8"]),
        "dpo": (dpo, [f"--data.train={pairs}", "--data.limit=8"]),
        "kto": (kto, [f"--data.train={pairs}", "--data.limit=8", "--from_pairs=true"]),
        "grpo": (grpo, [f"--data.train={prompts}", "--grpo.tasks=[counting]", "--rollout.n=2", *rl]),
        "rm": (
            reward_model,
            [f"--data.train={pairs}", f"--data.eval={pairs}", "--data.limit=8", "--data.eval_limit=4"],
        ),
        "ppo": (ppo, [f"--data.train={prompts}", "--ppo.tasks=[counting]", "--update.minibatches=1", *rl]),
    }[recipe]


HEADS = {"rm": "reward_head.safetensors", "ppo": "value_head.safetensors"}
"""The head each recipe writes beside the model (compared like the model's weights)."""


def _compared(row: dict) -> list[str]:
    """Every logged number of a step but the wall clock (``time``, ``perf/*``), the step itself and
    GRPO's reward standard deviations (``*/std``: each process's std of its own groups, averaged over
    processes, which is not the std of the global batch; the same under DDP)."""
    skip = ("step", "time", "values/explained_variance")  # PPO's: a per-process ratio, averaged over processes
    return sorted(k for k in row if k not in skip and not k.startswith("perf/") and not k.endswith("/std"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sft", "dpo", "kto", "grpo", "rm", "ppo"])
def test_fsdp2_two_processes_match_one_process(
    recipe, tiny_model_dir, pair_file, recipe_world, parity, tmp_path, launch_two_processes, monkeypatch
):
    module, extra = _recipe_args(recipe, recipe_world, pair_file, parity)
    common = [
        f"--model.name_or_path={tiny_model_dir('qwen2_vl')}",
        "--model.device=cpu",
        "--model.dtype=float32",
        "--train.batch_size=2",
        "--train.max_steps=3",
        "--train.lr=1e-3",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.warmup_ratio=0",
        *extra,
    ]
    one = tmp_path / "one"
    module.run(load_config(module.Config, None, [*common, "--train.grad_accum=2", f"--train.output_dir={one}"]))

    two = tmp_path / "two"
    monkeypatch.setenv(FSDP2_CPU, "1")
    done = launch_two_processes(recipe, [*common, "--train.grad_accum=1", f"--train.output_dir={two}"])
    assert "3 steps of 4" in done.stdout  # two processes of one micro-batch of 2: a global batch of 4
    assert "sharded with fully_shard over 2 processes" in done.stdout  # FSDP2 ran, not DDP

    steps_a = [r for r in read_metrics(one) if "train/loss" in r]
    steps_b = [r for r in read_metrics(two) if "train/loss" in r]
    assert [r["step"] for r in steps_b] == [1, 2, 3]
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert _compared(rb) == _compared(ra), ra["step"]
        for key in _compared(ra):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    for name in ("model.safetensors", *([HEADS[recipe]] if recipe in HEADS else [])):
        wa, wb = load_file(str(one / "model" / name)), load_file(str(two / "model" / name))
        assert wa.keys() == wb.keys(), name
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=2e-5, msg=f"{name}: {key}")
    wb = load_file(str(two / "model" / "model.safetensors"))
    reloaded = AutoModelForImageTextToText.from_pretrained(two / "model")
    for name, param in reloaded.state_dict().items():
        if name in wb:
            torch.testing.assert_close(param, wb[name], rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp2_resume_continues_exactly(tiny_model_dir, pair_file, tmp_path, launch_two_processes, monkeypatch):
    """A sharded DPO run stopped after 2 steps and resumed with ``--resume`` to 3 ends like 3
    unsharded steps on the same global batch (same tolerances as above): each process restores its
    shard of AdamW's moments (``optimizer-<rank>.pt``) and takes its shard of the whole weights.
    A constant schedule: the 2-step run extended to 3 keeps the 3-step run's learning rates."""
    common = [
        f"--model.name_or_path={tiny_model_dir('qwen2_vl')}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={pair_file}",
        "--data.limit=8",
        "--train.batch_size=2",
        "--train.lr=1e-3",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.warmup_ratio=0",
        "--train.schedule=constant",
        "--train.save_every=2",
    ]
    one = tmp_path / "one"
    dpo.run(
        load_config(
            dpo.Config, None, [*common, "--train.max_steps=3", "--train.grad_accum=2", f"--train.output_dir={one}"]
        )
    )
    split = tmp_path / "split"
    monkeypatch.setenv(FSDP2_CPU, "1")
    sharded = [*common, "--train.grad_accum=1", f"--train.output_dir={split}"]
    launch_two_processes("dpo", [*sharded, "--train.max_steps=2"])
    done = launch_two_processes("dpo", [*sharded, "--train.max_steps=3", "--resume"])
    assert "resumed from" in done.stdout and "sharded with fully_shard over 2 processes" in done.stdout
    steps_a = [r for r in read_metrics(one) if "train/loss" in r]
    steps_b = [r for r in read_metrics(split) if "train/loss" in r]
    assert [r["step"] for r in steps_b] == [1, 2, 3]
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5, abs=1e-6), ra["step"]
    wa = load_file(str(one / "model" / "model.safetensors"))
    wb = load_file(str(split / "model" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=2e-5)


def _base_args(model_dir: Path) -> list[str]:
    """The options every run below shares (3 steps of a global batch of 4, lr 1e-3, float32)."""
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        "--train.batch_size=2",
        "--train.max_steps=3",
        "--train.lr=1e-3",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.warmup_ratio=0",
    ]


def _one_and_sharded(module, recipe: str, common: list[str], tmp_path: Path, launch, **launch_kw) -> tuple[Path, Path]:
    """One unsharded process with 2 micro-batches of 2, then two sharded processes with 1 each
    (``VLALIGN_FSDP2_CPU=1``, set by the caller); every logged number of every step equal (rel
    1e-5, as above). Returns the two run folders."""
    one, two = tmp_path / "one", tmp_path / "two"
    module.run(load_config(module.Config, None, [*common, "--train.grad_accum=2", f"--train.output_dir={one}"]))
    done = launch(recipe, [*common, "--train.grad_accum=1", f"--train.output_dir={two}"], **launch_kw)
    assert "sharded with fully_shard over 2 processes" in done.stdout  # FSDP2 ran, not DDP
    steps_a = [r for r in read_metrics(one) if "train/loss" in r]
    steps_b = [r for r in read_metrics(two) if "train/loss" in r]
    assert [r["step"] for r in steps_b] == [1, 2, 3]
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert _compared(rb) == _compared(ra), ra["step"]
        for key in _compared(ra):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    return one, two


def _same_tensors(a: Path, b: Path) -> dict[str, torch.Tensor]:
    """The safetensors files ``a`` and ``b`` hold the same keys and tensors (atol 2e-5, as above);
    returns ``b``'s."""
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys(), b.name
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=2e-5, msg=f"{b.name}: {key}")
    return wb


@pytest.mark.slow
def test_fsdp2_dpo_with_lora_matches_one_process_and_saves_an_adapter(
    tiny_model_dir, pair_file, tmp_path, launch_two_processes, monkeypatch
):
    """DPO with LoRA (the adapter-disabled policy as reference) sharded over two processes: the
    frozen base weights are sharded like the adapters. LoRA dropout off (each process would draw its
    own masks: another valid run than one process's). The final ``model/`` is a PEFT adapter folder
    (no full weights) whose adapter loads on the base and holds the saved tensors."""
    start = tiny_model_dir("qwen2_vl")
    common = [*_base_args(start), "--model.use_lora=true", "--model.lora.dropout=0"]
    common += [f"--data.train={pair_file}", "--data.limit=8"]
    monkeypatch.setenv(FSDP2_CPU, "1")
    one, two = _one_and_sharded(dpo, "dpo", common, tmp_path, launch_two_processes)
    assert not (two / "model" / "model.safetensors").exists()
    saved = _same_tensors(one / "model" / "adapter_model.safetensors", two / "model" / "adapter_model.safetensors")
    assert saved and any("lora_B" in k and bool(v.any()) for k, v in saved.items())  # the adapter trained
    loaded, _ = load_model_and_processor(two / "model", device="cpu", dtype="float32")
    state = get_peft_model_state_dict(loaded)
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp2_ppo_with_a_separate_critic_matches_one_process(
    tiny_model_dir, recipe_world, pair_file, parity, tmp_path, launch_two_processes, monkeypatch
):
    """PPO with a separate critic (``critic.shared=false``: its own backbone, from the policy's
    starting weights, and value head): both models sharded, the critic's forward in every update
    micro-batch and in the rollouts' values. Every logged number as above (the explained variance
    aside: a per-process ratio averaged over processes); the policy, the critic's backbone
    (``critic/``) and its value head equal one process's; the critic folder reloads."""
    _, extra = _recipe_args("ppo", recipe_world, pair_file, parity)
    common = [*_base_args(tiny_model_dir("qwen2_vl")), *extra, "--critic.shared=false"]
    monkeypatch.setenv(FSDP2_CPU, "1")
    one, two = _one_and_sharded(ppo, "ppo", common, tmp_path, launch_two_processes)
    _same_tensors(one / "model" / "model.safetensors", two / "model" / "model.safetensors")
    backbone = _same_tensors(one / "critic" / "model.safetensors", two / "critic" / "model.safetensors")
    _same_tensors(one / "critic" / "value_head.safetensors", two / "critic" / "value_head.safetensors")
    assert not (two / "model" / "value_head.safetensors").exists()
    start = load_file(str(tiny_model_dir("qwen2_vl") / "model.safetensors"))
    assert any(not torch.equal(backbone[k], start[k]) for k in start)  # the critic's backbone trained
    reloaded = AutoModelForImageTextToText.from_pretrained(two / "critic")
    for name, param in reloaded.state_dict().items():
        if name in backbone:
            torch.testing.assert_close(param, backbone[name], rtol=0, atol=0)


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher ``proc`` and its workers at once, as a machine going down would (torch's
    elastic launcher starts each worker in a session of its own: killing the launcher's process
    group would leave them running)."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(workers, timeout=30)


@pytest.mark.slow
def test_fsdp2_killed_run_resumes_exactly(
    tiny_model_dir, pair_file, tmp_path, launch_two_processes, start_two_processes, monkeypatch
):
    """A sharded DPO run of 4 steps whose launcher and both processes are killed (SIGKILL to the
    process group) once the step-2 checkpoint is complete, then resumed with ``--resume``, logs the
    numbers and ends with the weights of one unsharded process running the 4 steps uninterrupted
    (same tolerances as above). The kill lands during step 3 or 4: no step-4 checkpoint, no
    ``model/``; the rows the killed run logged after step 2 are dropped on resume."""
    common = [*_base_args(tiny_model_dir("qwen2_vl")), f"--data.train={pair_file}", "--data.limit=8"]
    common = [a for a in common if a != "--train.max_steps=3"]
    common += ["--train.max_steps=4", "--train.schedule=constant", "--train.save_every=2"]
    one, split = tmp_path / "one", tmp_path / "split"
    dpo.run(load_config(dpo.Config, None, [*common, "--train.grad_accum=2", f"--train.output_dir={one}"]))
    monkeypatch.setenv(FSDP2_CPU, "1")
    sharded = [*common, "--train.grad_accum=1", f"--train.output_dir={split}"]
    proc = start_two_processes("dpo", sharded)
    marker = split / "checkpoints" / "step-0000002" / "state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed = proc.poll() is None
    _kill_all(proc)
    assert killed and marker.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert not (split / "checkpoints" / "step-0000004").exists() and not (split / "model").exists()
    done = launch_two_processes("dpo", [*sharded, "--resume"])
    assert "resumed from" in done.stdout and "step 2" in done.stdout
    steps_a = [r for r in read_metrics(one) if "train/loss" in r]
    steps_b = [r for r in read_metrics(split) if "train/loss" in r]
    assert [r["step"] for r in steps_b] == [1, 2, 3, 4]
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert _compared(rb) == _compared(ra), ra["step"]
        for key in _compared(ra):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    _same_tensors(one / "model" / "model.safetensors", split / "model" / "model.safetensors")
