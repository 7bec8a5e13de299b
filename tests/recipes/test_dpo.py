"""``vlalign dpo``: every loss term trains in the right direction, the reference strategies agree,
a killed run resumes to the same weights, bad inputs are named, and iterative DPO runs its rounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlalign.config import load_config
from vlalign.data.annotations import load_vocabulary
from vlalign.data.io import load_samples, write_jsonl, write_samples
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.data.schema import DataError, PreferenceSample
from vlalign.recipes import dpo
from vlalign.training import NonFiniteLossError
from vlalign.training.metrics import read_metrics


@pytest.fixture(scope="module")
def pair_file(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Injection pairs of the recipe world's descriptions, each with a second rejected response
    (``rejected_extra``, for POVID) and a severity column (for HSA-DPO)."""
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    pairs, _ = inject_pairs(
        samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(pairs_per_sample=2, tasks=("describe",))
    )
    by_source: dict[str, list[PreferenceSample]] = {}
    for p in pairs:
        by_source.setdefault(p.id.rsplit("/", 2)[0], []).append(p)
    rows = []
    for group in by_source.values():
        if len(group) == 2:
            first, second = group
            meta = {**first.meta, "severity": 1.0 + len(rows) % 3}
            rows.append(
                PreferenceSample(
                    first.id, first.images, first.prompt, first.chosen, first.rejected, meta, [second.rejected]
                )
            )
    out = tmp_path_factory.mktemp("dpo-pairs") / "pairs.jsonl"
    write_samples(rows, out)
    return out


def _args(model_dir: Path, train: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={train}",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--train.warmup_ratio=0",
        *extra,
    ]


def _records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "train/loss" in r]


# ----------------------------------------------------------------------------- every term


TERMS = {
    "sigmoid": ["--loss.weights={sigmoid: 1.0}"],
    "robust": ["--loss.weights={robust: 1.0}"],
    "hinge": ["--loss.weights={hinge: 1.0}"],
    "ipo": ["--loss.weights={ipo: 1.0}"],
    "bco_pair": ["--loss.weights={bco_pair: 1.0}"],
    "apo_zero": ["--loss.weights={apo_zero: 1.0}"],
    "apo_down": ["--loss.weights={apo_down: 1.0}"],
    "simpo": ["--loss.weights={simpo: 1.0}", "--loss.options={simpo: {beta: 2.5, gamma: 0.5}}"],
    "orpo": ["--loss.weights={orpo: 1.0}"],
    "nll": ["--loss.weights={nll: 1.0}"],
    "mdpo": ["--loss.weights={mdpo: 1.0}"],
    "hsa_dpo": ["--loss.weights={hsa_dpo: 1.0}"],
    "povid": ["--loss.weights={povid: 1.0}"],
    "mpo": ["--loss.preset=mpo"],
    "ddpo": ["--loss.weights={sigmoid: 1.0}", "--loss.ddpo_gamma=5"],
}


@pytest.mark.parametrize("term", list(TERMS))
def test_every_term_raises_the_margin_on_a_fixed_batch(term, tiny_model_dir, pair_file, tmp_path):
    """Four optimiser steps on one fixed batch of four pairs (full fine-tuning of the tiny Qwen2-VL):
    the logged chosen-minus-rejected reward margin (policy only for SimPO / ORPO, beta times the
    log-ratio to the reference otherwise) must grow, i.e. the gradient of each term points the
    right way through the whole loop. ``nll`` alone only raises the chosen log-prob, so for it the
    chosen log-prob must grow. The first step's rewards against the frozen copy are exactly 0."""
    out = tmp_path / "run"
    cfg = load_config(
        dpo.Config,
        None,
        _args(
            tiny_model_dir("qwen2_vl"),
            pair_file,
            out,
            *TERMS[term],
            "--data.limit=4",
            "--train.batch_size=4",
            "--train.max_steps=4",
            "--train.lr=2e-3",
            "--train.schedule=constant",
            "--train.save_every=0",
        ),
    )
    dpo.run(cfg)
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(math.isfinite(r["train/loss"]) for r in recs)
    assert all(r["train/pairs"] == 4 for r in recs)
    first, last = recs[0], recs[-1]
    if term == "nll":
        assert last["logps/chosen"] > first["logps/chosen"] + 1.0
        return
    if term not in ("simpo", "orpo"):
        assert first["rewards/margin"] == 0.0 and first["rewards/chosen"] == 0.0
    assert last["rewards/margin"] > first["rewards/margin"] + 1e-3, (first, last)
    if term == "mdpo":  # the image-conditioned term: chosen under the real image beats the corrupted one
        assert last["rewards/conditional_margin"] > first["rewards/conditional_margin"]
    if term == "povid":
        assert {"loss/negative_0", "loss/negative_1"} <= set(last)


def test_loss_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown term\(s\) \['sigmoidd'\]"):
        dpo.loss_weights(dpo.LossConfig(weights={"sigmoidd": 1.0}))
    with pytest.raises(ValueError, match="preset 'xpo' is unknown"):
        dpo.loss_weights(dpo.LossConfig(preset="xpo"))
    with pytest.raises(ValueError, match="povid .* combines only with nll"):
        dpo.loss_weights(dpo.LossConfig(weights={"povid": 1.0, "sigmoid": 1.0}))
    assert dpo.loss_weights(dpo.LossConfig(preset="ha_dpo")) == {"sigmoid": 1.0, "nll": 1.0}


# ----------------------------------------------------------------------------- the run's outputs


def test_lora_run_logs_metrics_evaluates_and_saves_a_loadable_model(tiny_model_dir, pair_file, tmp_path):
    """LoRA with the adapter-disabled reference, two micro-batches per step, a held-out split
    evaluated every 2 steps: every metric the issue names is logged, and the merged model loads
    with ``from_pretrained``."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    cfg = load_config(
        dpo.Config,
        None,
        _args(
            tiny_model_dir("qwen2_vl"),
            pair_file,
            out,
            f"--data.eval={pair_file}",
            "--data.eval_limit=6",
            "--model.use_lora=true",
            "--train.batch_size=2",
            "--train.grad_accum=2",
            "--train.max_steps=4",
            "--train.eval_every=2",
            "--train.lr=1e-3",
            "--save=merged",
        ),
    )
    final = dpo.run(cfg)
    records = read_metrics(out)
    step = _records(out)[0]
    for key in (
        "train/loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
        "perf/samples_per_s",
        "perf/tokens_per_s",
        "perf/peak_mem_mb",
        "train/lr",
        "train/grad_norm",
    ):
        assert key in step and math.isfinite(step[key]), key
    assert step["perf/samples_per_s"] > 0 and step["perf/tokens_per_s"] > step["perf/samples_per_s"]
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]
    assert final["eval/loss"] > 0 and 0 <= final["eval/rewards/accuracy"] <= 1
    assert final["data/train_pairs"] > 0
    model = AutoModelForImageTextToText.from_pretrained(out / "model")
    assert not hasattr(model, "peft_config") and (out / "model" / "processor_config.json").is_file()


def test_eval_suite_runs_on_the_trained_model_in_memory(tiny_model_dir, pair_file, recipe_world, tmp_path):
    """eval_suite=end: POPE, CHAIR, task accuracy and the KL from the frozen reference copy come
    back as suite/... metrics and land, with every answer, in suite_eval.json; the run's TensorBoard
    events hold those metrics and a table of the first held-out descriptions, at the last step (1)."""
    out = tmp_path / "run"
    final = dpo.run(
        load_config(
            dpo.Config,
            None,
            _args(
                tiny_model_dir("qwen2_vl"),
                pair_file,
                out,
                "--data.limit=4",
                "--train.batch_size=4",
                "--train.max_steps=1",
                "--eval_suite=end",
                f"--suite.data={recipe_world}",
                "--suite.pope_questions=4",
                "--suite.describe=3",
                "--suite.questions_per_task=2",
                "--suite.compositional_describe=2",
                "--suite.compositional_questions_per_task=1",
                "--suite.kl_prompts=2",
                "--suite.max_new_tokens=6",
                "--train.trackers=[tensorboard]",
            ),
        )
    )
    for key in ("suite/pope/adversarial/f1", "suite/chair/chair_i", "suite/task/counting", "suite/kl/seq"):
        assert key in final and math.isfinite(final[key]), key
    saved = json.loads((out / "suite_eval.json").read_text())
    assert saved["metrics"]["chair/chair_i"] == final["suite/chair/chair_i"] and saved["records"]
    events = tensorboard_events(out / "logs" / "dpo")
    chair = events.Scalars("suite/chair/chair_i")
    assert [(e.step, e.value) for e in chair] == [(1, pytest.approx(final["suite/chair/chair_i"]))]
    (text,) = events.Tensors("suite/samples/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    first = next(r for r in saved["records"] if r["task"] == "describe")
    assert text.step == 1 and table.startswith("| id | prompt | output | notes |") and f"| {first['id']} |" in table


def tensorboard_events(folder: Path):
    """The TensorBoard events under ``folder``, read with TensorBoard's own reader (every text kept)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    events.Reload()
    return events


def test_precomputed_reference_equals_the_frozen_copy_and_runs_no_reference_forward(
    tiny_model_dir, pair_file, tmp_path
):
    """The on-disk reference cache (with mDPO's corrupted prompts in it) gives the same losses as a
    frozen copy; after precomputing, training steps run no reference forward at all."""
    common = (
        "--loss.weights={mdpo: 1.0}",
        "--data.limit=8",
        "--train.batch_size=4",
        "--train.max_steps=3",
        "--train.lr=1e-3",
        "--train.save_every=0",
    )
    model_dir = tiny_model_dir("qwen2_vl")
    copy_args = _args(model_dir, pair_file, tmp_path / "copy", *common, "--reference.strategy=copy")
    dpo.run(load_config(dpo.Config, None, copy_args))  # 1.5 passes: auto would pick the cache
    dpo.run(
        load_config(
            dpo.Config,
            None,
            _args(model_dir, pair_file, tmp_path / "cache", *common, "--reference.strategy=precomputed"),
        )
    )
    copy, cached = _records(tmp_path / "copy"), _records(tmp_path / "cache")
    for a, b in zip(copy, cached, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-6)
        assert b["rewards/conditional_margin"] == pytest.approx(a["rewards/conditional_margin"], abs=1e-6)
    assert [r["reference/forwards"] for r in copy] == [1, 2, 3]
    assert len({r["reference/forwards"] for r in cached}) == 1  # all from the cache
    assert list((tmp_path / "cache" / "reference_cache").glob("*/shard-*.pt"))


def test_ref_model_is_the_reference(tiny_model_dir, pair_file, tmp_path):
    """``--ref-model PATH`` (the command-line spelling) replaces the starting policy as reference:
    the first step's rewards are no longer exactly zero."""
    from vlalign.models.tiny import build_tiny_model

    other = build_tiny_model("qwen2_vl", "tiny", tmp_path / "other", seed=1)
    args = _args(
        tiny_model_dir("qwen2_vl"),
        pair_file,
        tmp_path / "run",
        "--data.limit=4",
        "--train.batch_size=4",
        "--train.max_steps=1",
        "--ref-model",
        str(other),
    )
    cfg = load_config(dpo.Config, None, args)
    assert cfg.ref_model == str(other)
    dpo.run(cfg)
    assert abs(_records(tmp_path / "run")[0]["rewards/chosen"]) > 1e-4


# ----------------------------------------------------------------------------- the batch phase


def test_mdpo_batch_encodes_corrupted_prompts_in_the_same_processor_call(tiny_model, pair_file):
    """One processor call holds the prompts and their corrupted copies; the corrupted image is a
    pure function of (seed, sample id), and a row's ``rejected_images`` replace it."""
    model, processor = tiny_model("qwen2_vl")

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    counting = Counting(processor)
    samples = load_samples(pair_file, "preference", limit=3)
    encoder = dpo.PairEncoder(counting, max_length=None, corruption=dpo.CorruptConfig(method="mask", level=0.5))
    pb = encoder(samples)
    assert counting.calls == 1
    assert pb.batch.has_corrupted and len(pb.batch.prompts) == 6
    again = encoder(samples)
    assert torch.equal(pb.batch.prompts.vision["pixel_values"], again.batch.prompts.vision["pixel_values"])
    n = pb.batch.prompts.vision_rows["pixel_values"][0]
    c = pb.batch.prompts.vision_rows["pixel_values"][3]
    assert not torch.equal(pb.batch.prompts.vision["pixel_values"][n], pb.batch.prompts.vision["pixel_values"][c])
    same = PreferenceSample(
        samples[0].id,
        samples[0].images,
        samples[0].prompt,
        samples[0].chosen,
        samples[0].rejected,
        {"rejected_images": list(samples[0].images)},
    )
    given = encoder([same])
    rows = given.batch.prompts.vision_rows["pixel_values"]
    assert torch.equal(
        given.batch.prompts.vision["pixel_values"][rows[0]], given.batch.prompts.vision["pixel_values"][rows[1]]
    )
    with torch.no_grad():
        lp = dpo.policy_logprobs(model, pb, mode="shared", pad_token_id=encoder.pad_token_id)
    assert (lp.corrupted_chosen_logps - lp.chosen_logps).abs().max() > 1e-5


# ----------------------------------------------------------------------------- bad inputs


def _write(rows: list[dict], path: Path) -> Path:
    write_jsonl(rows, path)
    return path


def _row(
    i: int, image: str, chosen: str = "The image shows a red circle.", rejected: str = "The image shows a blue square."
) -> dict:
    return {"id": f"r{i}", "images": [image], "prompt": "Describe the image.", "chosen": chosen, "rejected": rejected}


def test_bad_rows_are_named_or_counted(tiny_model_dir, recipe_world, tmp_path):
    """chosen == rejected, an empty response, a missing and a corrupt image: each is a DataError
    naming the row, or (skip_bad_rows) a skip counted in the final metrics."""
    image = str(sorted((recipe_world / "images").rglob("*.png"))[0])
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    good = [_row(i, image) for i in range(4)]
    cases = {
        "same": (_row(9, image, rejected="The image shows a red circle."), "'rejected' is the same text as 'chosen'"),
        "empty": (_row(9, image, rejected="  "), "'rejected' is empty"),
        "missing": (_row(9, str(tmp_path / "nope.png")), "does not exist"),
        "corrupt": (_row(9, str(tmp_path / "corrupt.png")), "unreadable or corrupt"),
    }
    model_dir = tiny_model_dir("qwen2_vl")
    for name, (bad, message) in cases.items():
        data = _write([*good, bad], tmp_path / f"{name}.jsonl")
        with pytest.raises(DataError, match=message) as err:
            dpo.run(
                load_config(dpo.Config, None, _args(model_dir, data, tmp_path / f"run-{name}", "--train.max_steps=1"))
            )
        assert "r9" in str(err.value) or "line 5" in str(err.value)
    data = _write([*good, *(bad for bad, _ in cases.values())], tmp_path / "skip.jsonl")
    final = dpo.run(
        load_config(
            dpo.Config,
            None,
            _args(
                model_dir,
                data,
                tmp_path / "run-skip",
                "--train.max_steps=1",
                "--train.batch_size=4",
                "--data.skip_bad_rows=true",
            ),
        )
    )
    assert final["data/skipped_pairs"] == 4 and final["data/train_pairs"] == 4


def test_a_nan_severity_is_named_at_load_or_skipped(tiny_model_dir, recipe_world, tmp_path):
    """hsa_dpo reads loss.severity_column: a NaN there (line 3 of 5) stops the run as the data loads,
    naming the file, the line and the column, before any step; with data.skip_bad_rows the row is
    skipped and counted, and the 4 others train. Without hsa_dpo the column is not read: no error."""
    image = str(sorted((recipe_world / "images").rglob("*.png"))[0])
    rows = [{**_row(i, image), "severity": float(i + 1)} for i in range(5)]
    rows[2]["severity"] = math.nan
    data = _write(rows, tmp_path / "severity.jsonl")
    model_dir = tiny_model_dir("qwen2_vl")
    common = ["--loss.weights={hsa_dpo: 1.0}", "--train.max_steps=1", "--train.batch_size=4"]
    with pytest.raises(DataError, match=r"severity\.jsonl line 3: column 'severity' is nan, not a finite number"):
        dpo.run(load_config(dpo.Config, None, _args(model_dir, data, tmp_path / "stop", *common)))
    assert not _records(tmp_path / "stop")
    skip = _args(model_dir, data, tmp_path / "skip", *common, "--data.skip_bad_rows=true")
    final = dpo.run(load_config(dpo.Config, None, skip))
    assert final["data/skipped_pairs"] == 1 and final["data/train_pairs"] == 4
    plain = _args(model_dir, data, tmp_path / "plain", "--train.max_steps=1", "--train.batch_size=4")
    assert dpo.run(load_config(dpo.Config, None, plain))["data/train_pairs"] == 5


def test_overlong_pairs_are_dropped_and_counted_or_refused(tiny_model_dir, tiny_processor, pair_file, tmp_path):
    """A max_length one token short of the longest pair: the longest pairs are dropped and counted
    (never truncated), or, with on_overlong=raise, refused with the sample named."""
    samples = load_samples(pair_file, "preference", limit=8)
    pb = dpo.PairEncoder(tiny_processor("qwen2_vl"), max_length=None)(samples)
    lengths = [len(p) + max(len(c) for c in g) for p, g in zip(pb.batch.prompts.input_ids, pb.batch.completions)]
    limit = max(lengths) - 1
    args = _args(
        tiny_model_dir("qwen2_vl"),
        pair_file,
        tmp_path / "drop",
        "--data.limit=8",
        "--train.batch_size=8",
        "--train.max_steps=1",
        f"--data.max_length={limit}",
    )
    dpo.run(load_config(dpo.Config, None, args))
    rec = _records(tmp_path / "drop")[0]
    assert 0 < rec["data/dropped_overlong"] == sum(n > limit for n in lengths) < 8
    assert rec["train/pairs"] == 8 - rec["data/dropped_overlong"]
    with pytest.raises(DataError, match=f"exceed max_length {limit}"):
        dpo.run(
            load_config(
                dpo.Config, None, [*args, "--data.on_overlong=raise", f"--train.output_dir={tmp_path / 'raise'}"]
            )
        )


def test_non_finite_loss_names_step_samples_and_checkpoint(tiny_model_dir, pair_file, tmp_path):
    """An absurd learning rate blows the weights up after step 1 (checkpointed); the step-2 loss is
    not finite and the run stops naming step 2, the batch's samples and the step-1 checkpoint."""
    args = _args(
        tiny_model_dir("qwen2_vl"),
        pair_file,
        tmp_path / "run",
        "--data.limit=4",
        "--train.batch_size=4",
        "--train.max_steps=3",
        "--train.save_every=1",
        "--train.lr=1e30",
        "--train.max_grad_norm=0",
        "--train.schedule=constant",
    )
    with pytest.raises(NonFiniteLossError) as err:
        dpo.run(load_config(dpo.Config, None, args))
    message = str(err.value)
    assert "at step 2" in message and "step-0000001" in message
    ids = [s.id for s in load_samples(pair_file, "preference", limit=4)]
    assert all(i in message for i in ids)


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, pair_file, tmp_path, vlalign_process, kill_after):
    """mDPO (corrupted images made on the fly), killed with SIGKILL after its step-4 checkpoint and
    resumed, logs the losses of an uninterrupted run and ends with the same weights (bit for bit:
    the subprocesses run on one thread, like this one, so every sum is taken in the same order)."""
    model_dir = tiny_model_dir("qwen2_vl")
    common = [
        "--loss.weights={mdpo: 1.0}",
        "--data.limit=16",
        "--train.batch_size=4",
        "--train.max_steps=8",
        "--train.save_every=2",
        "--train.keep_checkpoints=1",
        "--train.lr=1e-3",
    ]
    whole = tmp_path / "whole"
    dpo.run(load_config(dpo.Config, None, _args(model_dir, pair_file, whole, *common)))

    broken = tmp_path / "broken"
    proc = vlalign_process(["dpo", *_args(model_dir, pair_file, broken, *common)], tmp_path / "cache")
    kill_after(proc, broken / "checkpoints" / "step-0000004" / "state.json")
    assert not (broken / "model").exists()

    resumed = vlalign_process(["dpo", *_args(model_dir, pair_file, broken, *common), "--resume"], tmp_path / "cache")
    assert resumed.wait(timeout=300) == 0
    assert [(r["step"], r["train/loss"]) for r in _records(broken)] == [
        (r["step"], r["train/loss"]) for r in _records(whole)
    ]
    a, b = load_file(str(whole / "model" / "model.safetensors")), load_file(str(broken / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- iterative DPO


def test_iterative_dpo_runs_rounds_and_resumes(tiny_model_dir, recipe_world, tmp_path):
    """Two rounds of sample -> rank -> DPO from one config; a second invocation finds every round
    done and trains nothing. The scorer is a user function (longer answers score higher), so every
    prompt's sampled answers give a pair whatever the tiny model says."""
    scorer = tmp_path / "length_scorer.py"
    scorer.write_text("def score(samples, completions):\n    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "online"
    args = _args(
        tiny_model_dir("qwen2_vl"),
        "",
        out,
        "--online.rounds=2",
        f"--online.prompts={recipe_world / 'train_prompts.jsonl'}",
        "--online.prompts_per_round=6",
        "--online.generation.n=3",
        "--online.generation.max_new_tokens=6",
        f"--online.scorer={scorer}:score",
        "--online.threshold=1",
        "--train.batch_size=2",
        "--train.max_steps=2",
        "--train.lr=1e-3",
    )
    final = dpo.run(load_config(dpo.Config, None, args))
    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and all(r["pairs"] >= 2 for r in rounds)
    for r in (1, 2):
        assert len(load_samples(out / f"round-{r}" / "pairs.jsonl", "preference")) == rounds[r - 1]["pairs"]
        assert [x["step"] for x in _records(out / f"round-{r}")] == [1, 2]
    assert (out / "model" / "config.json").is_file() and final["online/rounds"] == 2
    round2 = load_config(dpo.Config, None, args)
    assert round2.online.rounds == 2
    stamp = (out / "round-2" / "metrics.jsonl").stat().st_mtime
    dpo.run(round2)
    assert (out / "round-2" / "metrics.jsonl").stat().st_mtime == stamp


def test_packed_rows_give_the_same_losses_and_log_their_useful_token_fraction(tiny_model_dir, pair_file, tmp_path):
    """``--logprob_pack_length`` large enough for a whole micro-batch puts its four prompts (each with
    its pair) in one row: the same losses as one prompt per row (float rounding), and every slot
    used (``perf/useful_token_fraction`` = 1; below 1 with one prompt per row). Two steps of four
    pairs over eight pairs is one pass: ``reference.strategy=auto`` keeps the frozen copy, and
    ``run.json`` says so."""
    common = ("--data.limit=8", "--train.batch_size=4", "--train.max_steps=2", "--train.save_every=0")
    model_dir = tiny_model_dir("qwen2_vl")
    dpo.run(load_config(dpo.Config, None, _args(model_dir, pair_file, tmp_path / "rows", *common)))
    packed_args = _args(model_dir, pair_file, tmp_path / "packed", *common, "--logprob_pack_length=100000")
    dpo.run(load_config(dpo.Config, None, packed_args))
    rows, packed = _records(tmp_path / "rows"), _records(tmp_path / "packed")
    for a, b in zip(rows, packed, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)
        assert b["perf/useful_token_fraction"] == 1.0 and 0.5 < a["perf/useful_token_fraction"] < 1.0
    record = json.loads((tmp_path / "rows" / "run.json").read_text())
    assert record["reference"] == {"strategy": "copy", "reason": "auto: 1.00 planned passes over the data"}
