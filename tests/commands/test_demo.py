"""``vlalign demo --quick`` end to end: every stage, the summary, reuse, reruns and resume."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlalign.cli import main
from vlalign.commands import demo
from vlalign.config import load_config

pytestmark = pytest.mark.slow

STAGES = ["world", "sft", "eval-base", "pairs", "dpo", "eval-dpo", "grpo", "eval-grpo", *demo.VIDEO_STAGES]
VIDEO_MODEL = "--video_model=tiny:qwen2_vl:tiny"


def _demo(out: Path, *extra: str) -> dict:
    args = ["--quick", "--model=tiny:gemma3:tiny", VIDEO_MODEL, f"--output_dir={out}", *extra]
    return demo.run(load_config(demo.Config, None, args))


def _fingerprints(out: Path) -> dict[str, str]:
    return {s: json.loads((out / s / "stage.json").read_text())["fingerprint"] for s in STAGES}


def _mtimes(out: Path) -> dict[str, float]:
    return {s: (out / s / "stage.json").stat().st_mtime_ns for s in STAGES}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    _demo(out)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    mp.setenv("VLALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield mp
    mp.undo()


def test_every_stage_runs_and_the_summary_holds_the_table(quick_demo: Path) -> None:
    summary = json.loads((quick_demo / demo.SUMMARY_FILE).read_text())
    assert [s["stage"] for s in summary["stages"]] == ["base", "dpo", "grpo"]
    for stage in summary["stages"]:
        eval_json = json.loads((quick_demo / stage["eval"] / "eval.json").read_text())
        for key, _ in demo.TABLE_METRICS:
            if key.startswith("kl/") and stage["stage"] == "base":
                assert key not in stage["metrics"]  # the base model is the reference: no KL from itself
                continue
            assert stage["metrics"][key] == eval_json["metrics"][key], key
        assert stage["metrics"]["seconds/train"] > 0
        assert (quick_demo / stage["folder"] / "model" / "config.json").exists()
    assert set(summary["stage_seconds"]) == set(STAGES)
    # last stage - first, with its paired interval, for every suite metric the answers recompute
    first, last = summary["stages"][0]["metrics"], summary["stages"][-1]["metrics"]
    intervals = summary["intervals"]
    assert {"chair/chair_i", "pope/adversarial/f1", "task/counting", "compositional/chair/chair_i"} <= set(intervals)
    for key, iv in intervals.items():
        assert iv["difference"] == last[key] - first[key], key
        assert iv["low"] <= iv["high"], key
    assert "grpo - base [95%]" in demo.format_summary(summary)
    for stage in summary["stages"]:
        for key, value in stage["metrics"].items():
            assert math.isfinite(value), (stage["stage"], key)
    # the report: one section per stage's curves, the summary table, bars and the gallery
    page = (quick_demo / "report.html").read_text()
    for section in ("summary", "evaluation", "stage-base", "stage-dpo", "stage-grpo", "gallery"):
        assert f'<section id="{section}"' in page, section
    assert page.count("data:image/png;base64,") >= 10
    assert "gallery" in page.lower()
    # the pairs of both sources reach DPO, in one file
    sources = {json.loads(line)["source"] for line in (quick_demo / "pairs" / "train.jsonl").read_text().splitlines()}
    assert len(sources) >= 2, sources
    # every stage trained from the one before it
    dpo_cfg = (quick_demo / "dpo" / "config.yaml").read_text()
    assert str(quick_demo / "sft" / "model") in dpo_cfg
    assert str(quick_demo / "dpo" / "model") in (quick_demo / "grpo" / "config.yaml").read_text()


def test_the_video_task_is_trained_and_evaluated(quick_demo: Path) -> None:
    """The world holds the clips (its other files as without them); the video model learns the moved
    task by SFT on the clips' answers, then GRPO from it on their prompts; both are evaluated on the
    held-out clips, the GRPO model with its KL from the video SFT model, in a table of their own."""
    world = quick_demo / "world"
    assert json.loads((world / "manifest.json").read_text())["config"]["video_clips"] == 40
    rows = [json.loads(line) for line in (world / "train_video.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(r["task"] == "moved" for r in rows)
    assert "train_video.jsonl" in (quick_demo / "video-sft" / "config.yaml").read_text()
    assert "tiny:qwen2_vl:tiny" in (quick_demo / "video-sft" / "config.yaml").read_text()
    grpo_cfg = (quick_demo / "video-grpo" / "config.yaml").read_text()
    assert "train_video_prompts.jsonl" in grpo_cfg and str(quick_demo / "video-sft" / "model") in grpo_cfg
    summary = json.loads((quick_demo / demo.SUMMARY_FILE).read_text())
    video = summary["video"]
    assert video["model"] == "tiny:qwen2_vl:tiny" and [s["stage"] for s in video["stages"]] == ["sft", "grpo"]
    for stage in video["stages"]:
        metrics = json.loads((quick_demo / stage["eval"] / "eval.json").read_text())["metrics"]
        assert stage["metrics"]["task/moved"] == metrics["task/moved"] and 0 <= metrics["task/moved"] <= 1
        assert metrics["task/moved_n"] == 20  # the quick demo's video_suite.questions_per_task
    assert "kl/seq" in video["stages"][1]["metrics"] and "kl/seq" not in video["stages"][0]["metrics"]
    table = demo.format_summary(summary)
    assert "Which shape moved?" in table and "moved accuracy" in table
    assert [s["stage"] for s in summary["stages"]] == ["base", "dpo", "grpo"]  # the image table as before


def test_demo_check_prints_each_target_with_its_paired_interval(quick_demo: Path) -> None:
    """benchmarks/demo_check.py: one row per target, its verdict and the interval of aligned - base
    from the two stages' answers (exit 0 only if every target is met: the quick demo need not)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "demo_check.py"
    done = subprocess.run([sys.executable, str(script), str(quick_demo)], capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    rows = {line.split("(")[-1].split(")")[0]: line for line in done.stdout.splitlines() if "(" in line and "[" in line}
    assert set(rows) == {"chair/chair_i", "pope/adversarial/f1", "task/counting", "task/colour"}, done.stdout
    summary = json.loads((quick_demo / demo.SUMMARY_FILE).read_text())
    base, final = summary["stages"][0]["metrics"], summary["stages"][-1]["metrics"]
    for key, line in rows.items():
        assert f"{final[key] - base[key]:+.3f} [" in line, line
    assert (done.returncode == 0) == all(" yes " in line for line in rows.values())


def test_a_second_run_reuses_everything_and_a_change_reruns_only_what_follows(quick_demo: Path, capsys) -> None:
    before, prints = _mtimes(quick_demo), _fingerprints(quick_demo)
    _demo(quick_demo)
    assert _mtimes(quick_demo) == before
    assert capsys.readouterr().out.count("reused") == len(STAGES)

    _demo(quick_demo, "--grpo={train.lr: 0.0001}")
    after = _mtimes(quick_demo)
    changed = [s for s in STAGES if after[s] != before[s]]
    assert changed == ["grpo", "eval-grpo"]
    assert _fingerprints(quick_demo)["eval-grpo"] != prints["eval-grpo"]  # downstream fingerprints follow


def test_an_interrupted_stage_resumes_from_its_checkpoint(quick_demo: Path, capsys) -> None:
    """A stage without its stage.json (killed before the end) resumes from its last checkpoint."""
    grpo = quick_demo / "grpo"
    steps_before = [json.loads(line)["step"] for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    (grpo / "stage.json").unlink()
    shutil.rmtree(grpo / "model")
    _demo(quick_demo, "--grpo={train.lr: 0.0001}")
    out = capsys.readouterr().out
    assert "[demo] grpo: resuming" in out
    assert "[demo] sft: up to date" in out
    steps = [json.loads(line)["step"] for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert steps == steps_before  # the resumed run logged no step twice
    assert (grpo / "model" / "config.json").exists()


def test_a_killed_demo_resumes_from_the_sft_checkpoint(tmp_path: Path, capsys, vlalign_process, kill_after) -> None:
    """SIGKILL during the SFT stage (after its step-30 checkpoint), then the demo again: the world
    is reused, SFT resumes from its checkpoint (no step logged twice) and every stage finishes."""
    out = tmp_path / "demo"
    args = ["--quick", "--model=tiny:gemma3:tiny", VIDEO_MODEL, f"--output_dir={out}", "--report=false"]
    proc = vlalign_process(["demo", *args], tmp_path / "cache", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after(proc, out / "sft" / "checkpoints" / "step-0000030" / "state.json")
    assert not (out / "sft" / demo.STAGE_FILE).exists()  # killed inside the stage
    world_done = (out / "world" / demo.STAGE_FILE).stat().st_mtime_ns

    _demo(out)
    printed = capsys.readouterr().out
    assert "[demo] world: up to date" in printed and "[demo] sft: resuming" in printed
    assert (out / "world" / demo.STAGE_FILE).stat().st_mtime_ns == world_done
    rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 60  # none twice, through the end
    assert all((out / s / demo.STAGE_FILE).exists() for s in STAGES)


def test_the_quick_demo_says_it_is_a_smoke_test(quick_demo: Path) -> None:
    """demo_summary.json says "quick": true; the printed table starts with the smoke-test line; the
    report's header says it too."""
    summary = json.loads((quick_demo / demo.SUMMARY_FILE).read_text())
    assert summary["quick"] is True
    assert demo.format_summary(summary).startswith(demo.SMOKE_TEST + "\n")
    assert demo.format_summary({**summary, "quick": False}).startswith("metric")
    assert 'id="smoke-test"' in (quick_demo / "report.html").read_text()


def test_the_quick_demo_has_its_own_folder() -> None:
    """No --output_dir: the quick demo goes to runs/demo-quick, the full one to runs/demo (the
    full demo's folder, hence its stages' fingerprints, as before); an explicit one wins."""
    assert demo.demo_dir(load_config(demo.Config, None, ["--quick"])) == Path("runs/demo-quick")
    assert demo.demo_dir(load_config(demo.Config, None, [])) == Path("runs/demo")
    assert demo.demo_dir(load_config(demo.Config, None, ["--quick", "--output_dir=x"])) == Path("x")
    stages = demo.build_stages(load_config(demo.Config, None, []))
    assert stages[2].settings["data"] == "runs/demo/world"


def test_cli_help_and_unknown_stage(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown stage"):
        _demo(tmp_path / "d", "--rerun=[dop]")


def test_the_demo_runs_with_a_fixed_thread_count(quick_demo: Path) -> None:
    """The numbers depend on the intra-op thread count, so the demo fixes it (2, as the README's
    table was measured) instead of taking the machine's core count: the summary records the count
    its stages ran with, and the caller's count (1 in this test session) is restored after."""
    assert demo.Config().threads == 2
    assert json.loads((quick_demo / demo.SUMMARY_FILE).read_text())["threads"] == 2
    assert torch.get_num_threads() == 1
