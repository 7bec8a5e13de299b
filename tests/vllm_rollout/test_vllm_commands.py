"""``vlalign eval`` and ``vlalign pairs --method=rank`` with the vLLM engine (vLLM environment:
``make test-vllm``).

Greedy generation is deterministic in both engines and they agree token for token
(test_vllm_engine.py), so a greedy evaluation gives the same answers, hence the same metrics, with
``engine=vllm`` as with ``engine=hf``; only the timings (``perf/*``) differ. The model is evaluated
beside itself as the baseline (two engines, one after the other). The KL rollouts sample
(temperature 1), and the engines draw from different random streams: with the model as its own
reference every completion's KL is exactly 0 in both, whatever was sampled.

Sample-and-rank samples too, so its pairs differ between the engines; what must hold: the greedy
responses it ranks equal hf's, and the pairs a vLLM run makes are a function of the seed (a second
run, with a fresh engine, writes the same file). POVID answers greedily: the same rows either way.

Each vLLM engine start is counted in vLLM's log (:data:`STARTED`), which shows that the ``vllm``
runs generated with vLLM and the ``hf`` runs did not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm runs these tests in its own environment)")

from vlalign.commands import eval as eval_cmd  # noqa: E402
from vlalign.commands import pairs as pairs_cmd  # noqa: E402
from vlalign.config import load_config  # noqa: E402

pytestmark = pytest.mark.vllm

STARTED = "Initializing a V1 LLM engine"
"""What vLLM logs when an engine starts: counted to show which runs generated with vLLM."""

SUITE = [
    "--suite.pope_questions=4",
    "--suite.describe=2",
    "--suite.questions_per_task=1",
    "--suite.compositional_describe=1",
    "--suite.compositional_questions_per_task=1",
    "--suite.kl_prompts=3",
    "--suite.max_new_tokens=12",
]


def _eval(model: Path, world: Path, out: Path, engine: str) -> dict:
    args = [f"--model={model}", f"--baseline={model}", f"--suite.data={world}", f"--output_dir={out}"]
    args += ["--device=cpu", "--dtype=float32", "--progress=false", "--trackers=[]", f"--engine={engine}", *SUITE]
    args += ["--vllm_max_model_len=1024"]
    return eval_cmd.run(load_config(eval_cmd.Config, None, args))


def test_eval_with_vllm_gives_the_hf_answers_and_metrics(
    tiny_model_dir, world_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    model = tiny_model_dir("qwen2_vl")
    capfd.readouterr()
    hf = _eval(model, world_dir, tmp_path / "hf", "hf")
    assert STARTED not in "".join(capfd.readouterr())
    vllm = _eval(model, world_dir, tmp_path / "vllm", "vllm")
    log = "".join(capfd.readouterr())
    assert log.count(STARTED) == 2  # the baseline's engine, then the model's
    assert "max_seq_len=1024" in log and "max_seq_len=2048" not in log  # --vllm_max_model_len reached vLLM
    outputs = [r["output"] for r in hf["records"]["model"]]
    assert outputs == [r["output"] for r in vllm["records"]["model"]]
    assert len(set(outputs)) > 1 and any(len(t.split()) > 2 for t in outputs), outputs  # real, varied answers
    assert hf["records"] == vllm["records"]  # the model's and the baseline's

    def kept(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if not k.startswith("perf/")}

    assert kept(hf["metrics"]) == kept(vllm["metrics"]) and "win_rate" in hf["metrics"]
    assert kept(hf["baseline_metrics"]) == kept(vllm["baseline_metrics"])
    assert vllm["metrics"]["kl/seq"] == 0.0 and vllm["metrics"]["kl/n"] > 0


def _rank(model: Path, world: Path, out: Path, engine: str, temperature: float) -> pairs_cmd.Config:
    args = [f"--rank.model={model}", f"--rank.engine={engine}", f"--rank.temperature={temperature}"]
    args += [f"--data={world / 'train_prompts.jsonl'}", "--method=rank", "--tasks=[describe]", "--limit=4"]
    args += [f"--out={out}", "--progress=false", "--rank.device=cpu", "--rank.dtype=float32"]
    args += [
        "--rank.n=3",
        "--rank.max_new_tokens=8",
        f"--rank.scorer={out.parent / 'length_scorer.py'}:score",
        "--rank.threshold=1",
    ]
    return load_config(pairs_cmd.Config, None, args)


def test_rank_with_vllm_ranks_the_hf_greedy_responses_and_repeats_its_pairs(
    tiny_model_dir, world_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from vlalign.data.io import load_samples

    (tmp_path / "length_scorer.py").write_text(
        "def score(samples, completions):\n    return [float(len(c)) for c in completions]\n"
    )
    model = tiny_model_dir("qwen2_vl")
    prompts = load_samples(str(world_dir / "train_prompts.jsonl"), "prompt", limit=4)
    greedy = {}
    capfd.readouterr()
    for engine in ("hf", "vllm"):
        r = _rank(model, world_dir, tmp_path / f"greedy-{engine}.jsonl", engine, 0.0).rank
        greedy[engine] = pairs_cmd.policy_responses(
            pairs_cmd._load_policy(r), r, prompts, n=r.n, progress=False, desc="greedy"
        )
    assert greedy["hf"] == greedy["vllm"] and all(len(set(g)) == 1 for g in greedy["hf"]), greedy
    files = []
    for run in ("first", "second"):
        cfg = _rank(model, world_dir, tmp_path / f"{run}.jsonl", "vllm", 1.0)
        assert pairs_cmd.run(cfg) == 0
        files.append(Path(cfg.out).read_text())
    assert files[0] == files[1] and files[0].count("\n") >= 1, files
    assert "".join(capfd.readouterr()).count(STARTED) == 3  # greedy vllm, then a fresh engine per run


def test_povid_with_vllm_writes_the_hf_rows(
    tiny_model_dir, world_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """POVID's second negatives are greedy responses to the distorted images: the same rows either way."""
    model = tiny_model_dir("qwen2_vl")
    files = {}
    capfd.readouterr()
    for engine in ("hf", "vllm"):
        out = tmp_path / f"povid-{engine}.jsonl"
        args = ["--method=povid", f"--povid.model={model}", f"--povid.engine={engine}", "--povid.device=cpu"]
        args += ["--povid.dtype=float32", "--povid.max_new_tokens=8", f"--data={world_dir / 'train.jsonl'}"]
        args += [
            "--tasks=[describe]",
            "--limit=4",
            f"--out={out}",
            "--progress=false",
            "--povid.vllm_max_model_len=1024",
        ]
        assert pairs_cmd.run(load_config(pairs_cmd.Config, None, args)) == 0
        files[engine] = out.read_text()
    assert files["hf"] == files["vllm"] and "rejected_extra" in files["hf"], files
    log = "".join(capfd.readouterr())
    assert log.count(STARTED) == 1
    engine_log = log + caplog.text  # a later engine of the process logs through pytest's log capture
    assert "max_seq_len=1024" in engine_log and "max_seq_len=2048" not in engine_log  # the option reached vLLM
