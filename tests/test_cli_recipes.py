"""The recipes from a new user's side: the Python API's result object, per-step time in every
recipe, ``train.threads``, a broken reward stopping the run before the model loads, GRPO's
held-out evaluation and reference only when asked, and the launch warning."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlalign.cli import main
from vlalign.config import load_config
from vlalign.recipes import dpo, grpo, sft
from vlalign.recipes.result import RunResult, run_result
from vlalign.recipes.rl_defaults import heldout_suite_config, reference_choice
from vlalign.training.launch import launch_warning, requested_processes
from vlalign.training.metrics import read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Four rows per kind on two 16 px images: prompts (with answer and task), SFT rows, preference pairs."""
    folder = tmp_path_factory.mktemp("first-hour-data")
    Image.new("RGB", (16, 16), "red").save(folder / "red.png")
    Image.new("RGB", (16, 16), "blue").save(folder / "blue.png")
    rows = [("red.png", "red"), ("blue.png", "blue")] * 2
    with open(folder / "prompts.jsonl", "w") as fh, open(folder / "sft.jsonl", "w") as sft_fh:
        with open(folder / "pairs.jsonl", "w") as pairs_fh:
            for i, (image, colour) in enumerate(rows):
                base = {"id": f"r{i}", "images": [image], "prompt": "What colour is the square?"}
                fh.write(json.dumps({**base, "answer": colour, "task": "colour"}) + "\n")
                sft_fh.write(json.dumps({**base, "completion": colour}) + "\n")
                other = "blue" if colour == "red" else "red"
                pairs_fh.write(json.dumps({**base, "chosen": colour, "rejected": other}) + "\n")
    (folder / "rewards.py").write_text(
        "def says_red(prompts, completions, answer, **kwargs):\n"
        "    return [float('red' in c[0]['content']) for c in completions]\n\n"
        "def broken(completion, sample):\n"
        "    return sample.meta['solution']\n"
    )
    return folder


def _common(model: Path, out: Path) -> list[str]:
    return [
        f"--model.name_or_path={model}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--train.output_dir={out}",
        "--train.batch_size=2",
        "--train.max_steps=1",
        "--train.log_every=1",
        "--train.trackers=[]",
        "--train.progress=false",
    ]


def test_python_api_returns_a_result_with_the_model_metrics_and_evaluation(tiny_model_dir, data_dir, tmp_path):
    """sft.run: the result names the run folder and the saved model, holds the last metrics row (with
    the step's time) and the held-out loss; indexing reads the final numbers as before. train.threads
    sets torch's thread count for the run."""
    before = torch.get_num_threads()
    cfg = load_config(
        sft.Config,
        None,
        [
            *_common(tiny_model_dir("qwen2_vl"), tmp_path / "sft"),
            f"--data.train={data_dir / 'sft.jsonl'}",
            f"--data.eval={data_dir / 'sft.jsonl'}",
            "--train.threads=2",
        ],
    )
    try:
        result = sft.run(cfg)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert isinstance(result, RunResult)
    assert result.output_dir == tmp_path / "sft" and (result.model_path / "config.json").is_file()
    assert result.metrics == read_metrics(tmp_path / "sft")[-1]
    assert result.evaluation == {"eval/loss": result["eval/loss"]} and result["eval/loss"] > 0
    steps = [r for r in read_metrics(tmp_path / "sft") if "train/loss" in r]
    assert steps and steps[0]["perf/step_s"] > 0


def test_dpo_logs_the_time_of_each_step(tiny_model_dir, data_dir, tmp_path):
    """DPO logged samples/s and tokens/s but no step time; now perf/step_s, as GRPO and PPO."""
    cfg = load_config(
        dpo.Config,
        None,
        [*_common(tiny_model_dir("qwen2_vl"), tmp_path / "dpo"), f"--data.train={data_dir / 'pairs.jsonl'}"],
    )
    result = dpo.run(cfg)
    step = [r for r in read_metrics(tmp_path / "dpo") if "train/loss" in r][0]
    assert step["perf/step_s"] > 0 and result.model_path == tmp_path / "dpo" / "model"
    assert result["data/train_pairs"] == 4.0 and result.evaluation == {}


def test_grpo_on_own_data_has_no_shapes_evaluation_and_no_reference(tiny_model_dir, data_dir, tmp_path):
    """One GRPO step on one's own prompts with a TRL-style reward file (read next to the YAML), no KL:
    no held-out evaluation of the shapes world, no reference model, so no kl/ref; the reward is logged."""
    config = data_dir / "grpo.yaml"
    config.write_text("rewards:\n  weights: {rewards.py:says_red: 1.0}\n")
    args = [
        *_common(tiny_model_dir("qwen2_vl"), tmp_path / "grpo"),
        f"--data.train={data_dir / 'prompts.jsonl'}",
        "--rollout.n=2",
        "--rollout.max_new_tokens=3",
    ]
    result = grpo.run(load_config(grpo.Config, config, args))
    step = read_metrics(tmp_path / "grpo")[0]
    assert "rewards/says_red/mean" in step and "kl/ref" not in step and "perf/step_s" in step
    assert result.evaluation == {} and not any(
        k.startswith("eval/") for r in read_metrics(tmp_path / "grpo") for k in r
    )


def test_a_broken_reward_stops_the_run_before_the_model_loads(data_dir, tmp_path, capsys):
    """The model path does not exist: the run stops on the reward (which reads a column the data does not
    have) in the dry run, named, in one line, before any model is looked up or the run folder made."""
    config = data_dir / "broken.yaml"
    config.write_text("rewards:\n  weights: {rewards.py:broken: 1.0}\n")
    out = tmp_path / "never"
    start = time.perf_counter()
    code = main(
        [
            "grpo",
            f"--config={config}",
            "--model.name_or_path=/no/such/model",
            f"--data.train={data_dir / 'prompts.jsonl'}",
            f"--train.output_dir={out}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < 10
    assert "dry run before training" in err and "'broken'" in err and "solution" in err
    assert "Traceback" not in err and not out.exists()


def test_grpo_evaluates_the_shapes_world_only_for_shapes_data():
    """data.eval auto: the eval suite for shapes: prompts, none for one's own file; '' turns it off;
    a file evaluates on that file."""
    shapes = load_config(grpo.Config, None, [])
    assert heldout_suite_config(shapes.data, shapes.eval) == shapes.eval
    off = load_config(grpo.Config, None, ["--data.eval="])
    assert heldout_suite_config(off.data, off.eval) is None
    own = load_config(grpo.Config, None, ["--data.train=/data/mine.parquet"])
    assert heldout_suite_config(own.data, own.eval) is None
    mine = load_config(grpo.Config, None, ["--data.train=/data/mine.parquet", "--data.eval=/data/held.jsonl"])
    assert heldout_suite_config(mine.data, mine.eval).data == "/data/held.jsonl"


def test_a_reference_is_kept_only_when_a_kl_is_used_or_logged():
    """No KL weight: a reference only when the evaluation measures the KL with a frozen copy (then
    log_kl=auto also logs it every step, log_kl=false does not); kl_coef > 0 or log_kl=true always
    keep one; reference=none never."""
    update = load_config(grpo.Config, None, []).update
    assert reference_choice(update, eval_measures_kl=False, lora=False) == "none"
    assert reference_choice(update, eval_measures_kl=True, lora=False) == "auto"
    assert reference_choice(update, eval_measures_kl=True, lora=True) == "none"  # the adapter gives no eval KL
    kl = load_config(grpo.Config, None, ["--update.kl_coef=0.05"]).update
    assert reference_choice(kl, eval_measures_kl=False, lora=True) == "auto"
    logged = load_config(grpo.Config, None, ["--update.log_kl=true"]).update
    assert reference_choice(logged, eval_measures_kl=False, lora=False) == "auto"
    never = load_config(grpo.Config, None, ["--update.log_kl=false"]).update
    assert reference_choice(never, eval_measures_kl=False, lora=False) == "none"
    # the evaluation's KL keeps the frozen copy; log_kl=false only drops the per-step forward
    assert reference_choice(never, eval_measures_kl=True, lora=False) == "auto" and not never.needs_reference
    assert update.needs_reference and logged.needs_reference


def test_launch_warning_when_fewer_processes_run_than_were_asked_for():
    """``accelerate launch --num_processes 2`` on this CPU machine (no --cpu) runs ONE process with this
    environment (recorded from accelerate 1.x's simple launcher): MASTER_ADDR set, no WORLD_SIZE."""
    simple = {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert requested_processes(simple) is None and requested_processes({}) == 1
    assert "asked for several processes but this run has 1" in launch_warning(simple, 1)
    assert "asked for 4 processes but this run has 2" in launch_warning({"WORLD_SIZE": "4"}, 2)
    assert launch_warning({"WORLD_SIZE": "2", **simple}, 2) is None  # a real two-process launch
    assert launch_warning({"ACCELERATE_USE_CPU": "True"}, 1) is None  # accelerate launch of one process


def test_run_result_reads_the_last_metrics_row(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n')
    result = run_result(tmp_path, {"eval/acc": 0.5, "data/rows": 3.0})
    assert result.metrics == {"step": 2, "train/loss": 1.5} and result.model_path is None
    assert result.evaluation == {"eval/acc": 0.5} and dict(result) == {"eval/acc": 0.5, "data/rows": 3.0}


def test_run_result_is_still_the_dict_of_final_numbers(tmp_path):
    """The demo writes what run returns as JSON and reads result["metrics"]-style keys: the result is a dict."""
    result = run_result(tmp_path, {"eval/acc": 0.5})
    assert isinstance(result, dict) and json.loads(json.dumps(result)) == {"eval/acc": 0.5}
    assert result.final == {"eval/acc": 0.5} and "RunResult(output_dir=" in repr(result)
