"""`vlalign eval --bench=pope|chair|amber`: files checked before any model is loaded, scores worked
by hand, records a user can re-score and compare, and each benchmark end to end on a tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from official_files import write_all, write_images

from vlalign.cli import main
from vlalign.eval.benchmarks import BenchmarkFileError
from vlalign.eval.official import (
    AmberBenchConfig,
    ChairBenchConfig,
    PopeBenchConfig,
    prepare_benchmark,
)
from vlalign.eval.paired import metrics_from_counts, record_counts


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    return write_all(tmp_path / "data")


def _prepare(bench: str, images: Path, **cfgs):
    defaults = {"pope": PopeBenchConfig(), "chair": ChairBenchConfig(), "amber": AmberBenchConfig()}
    return prepare_benchmark(bench, str(images), **(defaults | cfgs))


def _recount(records: list[dict]) -> dict[str, float]:
    summed: dict[str, float] = {}
    for r in records:
        for k, v in record_counts(r).items():
            summed[k] = summed.get(k, 0.0) + v
    return {k: float(v) for k, v in metrics_from_counts({k: np.array(v) for k, v in summed.items()}).items()}


def test_wrong_column_fails_before_the_model_and_keeps_the_output(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A POPE file with `answer` in place of `label` on line 3: one line naming file, line and column,
    exit 2, in well under five seconds; the model path does not exist, so reaching the model would
    have raised another error; the output folder keeps what it held."""
    bad = files["pope"] / "coco_pope_popular.json"
    rows = [json.loads(line) for line in bad.read_text().splitlines()]
    rows[2]["answer"] = rows[2].pop("label")
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"earlier": true}\n')
    start = time.perf_counter()
    code = main(
        [
            "eval",
            f"--model={tmp_path / 'no-such-model'}",
            "--bench=pope",
            f"--pope.dir={files['pope']}",
            f"--images={files['coco_images']}",
            f"--output_dir={out}",
            "--overwrite=true",  # the earlier eval.json may be replaced, but only by a run that succeeds
        ]
    )
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 5.0
    assert f"{bad}, line 3, column 'label': missing field" in err
    assert "no-such-model" not in err and err.count("\n") == 1
    assert (out / "eval.json").read_text() == '{"earlier": true}\n' and sorted(p.name for p in out.iterdir()) == [
        "eval.json"
    ]


def test_every_file_and_image_is_checked(files: dict[str, Path]) -> None:
    """Missing and undecodable images, annotation files that do not parse, unknown query ids."""
    images = files["coco_images"]
    (images / "COCO_val2014_000000000102.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BenchmarkFileError, match=r"coco_pope_random.json, line 3, column 'image': .*cannot be decoded"):
        _prepare("pope", images, pope=PopeBenchConfig(dir=str(files["pope"])))
    with pytest.raises(BenchmarkFileError, match=r"instances_val2014.json, column 'images\[1\].file_name'"):
        _prepare(
            "chair",
            images,
            chair=ChairBenchConfig(instances=str(files["instances"]), captions=str(files["captions"]), n_images=0),
        )
    (images / "COCO_val2014_000000000102.jpg").unlink()
    with pytest.raises(BenchmarkFileError, match=r"line 3, column 'image': image 'COCO_val2014_000000000102.jpg'"):
        _prepare("pope", images, pope=PopeBenchConfig(dir=str(files["pope"])))
    files["captions"].write_text('{"annotations": [\n {"image_id": 1,, }\n]}')
    with pytest.raises(BenchmarkFileError, match=r"captions_val2014.json, line 2: invalid JSON"):
        _prepare(
            "chair", images, chair=ChairBenchConfig(instances=str(files["instances"]), captions=str(files["captions"]))
        )
    queries = json.loads(files["amber_queries"].read_text())
    queries[3]["id"] = 99
    files["amber_queries"].write_text(json.dumps(queries, indent=4))
    amber = AmberBenchConfig(annotations=str(files["amber_annotations"]), queries=str(files["amber_queries"]))
    with pytest.raises(BenchmarkFileError, match=r"query_all.json, line 17, column 'id': id 99 is not in"):
        _prepare("amber", files["amber_images"], amber=amber)
    with pytest.raises(BenchmarkFileError, match="the image folder does not exist"):
        _prepare("pope", files["coco_images"] / "nowhere", pope=PopeBenchConfig(dir=str(files["pope"])))


def test_pope_scored_by_both_rules_by_hand(files: dict[str, Path]) -> None:
    """Random mode, labels yes, no, yes, no; answers "Yes", "NO", "No!", "Not at all.".

    Official rule (no when a space-separated word before the first "." is exactly No, no or not):
    "NO", "No!" and "Not" are none of them, so all four read yes: TP 2, FP 2, TN 0, FN 0 ->
    accuracy 0.5, precision 0.5, recall 1, F1 2/3, yes-ratio 1. The project reader (lower case,
    punctuation stripped) reads the last three as no: TP 1, FP 0, TN 2, FN 1 -> accuracy 0.75,
    precision 1, recall 0.5, F1 2/3, yes-ratio 0.25. The two disagree on 3 answers.
    """
    bench = _prepare("pope", files["coco_images"], pope=PopeBenchConfig(dir=str(files["pope"]), modes=("random",)))
    assert bench.name == "pope/coco" and len(bench) == 4
    assert bench.files == {
        str(files["pope"] / "coco_pope_random.json"): bench.files[str(files["pope"] / "coco_pope_random.json")]
    }
    score = bench.scorer(["Yes", "NO", "No!", "Not at all."])
    m = score.metrics
    assert (m["pope/random/accuracy"], m["pope/random/precision"], m["pope/random/recall"]) == (0.5, 0.5, 1.0)
    assert m["pope/random/f1"] == pytest.approx(2 / 3) and m["pope/random/yes_ratio"] == 1.0
    assert m["pope/random/disagreements"] == 3.0
    first = score.records[0]
    assert {k: first[k] for k in ("question_id", "image", "question", "output", "parsed", "label")} == {
        "question_id": 1,
        "image": "COCO_val2014_000000000101.jpg",
        "question": "Is there a dog in the image?",
        "output": "Yes",
        "parsed": "yes",
        "label": "yes",
    }
    assert [r["parsed_project"] for r in score.records] == ["yes", "no", "no", "no"]
    assert "3 of 4" in score.table and "| random | 50.0 | 50.0 | 100.0 | 66.7 | 100.0 |" in score.table
    recount = _recount(score.records)
    assert all(recount[k] == pytest.approx(m[k]) for k in recount)
    project = _prepare(
        "pope",
        files["coco_images"],
        pope=PopeBenchConfig(dir=str(files["pope"]), modes=("random",), answer_rule="project"),
    ).scorer(["Yes", "NO", "No!", "Not at all."])
    assert (project.metrics["pope/random/accuracy"], project.metrics["pope/random/yes_ratio"]) == (0.75, 0.25)


def test_seem_built_files_as_one_json_array(tmp_path: Path) -> None:
    """GQA's POPE files as distributed (``gqa_pope_seem_<mode>.json``, one JSON array), by folder and by file."""
    images = write_images(tmp_path / "gqa_images", ["2405722.jpg"])
    rows = [
        {"question_id": 1, "image": "2405722.jpg", "text": "Is there a bird in the image?", "label": "yes"},
        {"question_id": 2, "image": "2405722.jpg", "text": "Is there a laptop in the image?", "label": "no"},
    ]
    path = tmp_path / "gqa_pope_seem_random.json"
    path.write_text(json.dumps(rows, indent=4))
    by_dir = _prepare("pope", images, pope=PopeBenchConfig(dir=str(tmp_path), dataset="gqa", modes=("random",)))
    by_file = _prepare("pope", images, pope=PopeBenchConfig(files=(str(path),), prompt_suffix="Answer briefly."))
    assert by_file.items[0].sample.prompt[0]["content"][1]["text"] == "Is there a bird in the image? Answer briefly."
    for bench in (by_dir, by_file):
        assert bench.name == "pope/gqa" and [i.part for i in bench.items] == ["pope/random"] * 2
    assert bench.scorer(["Yes", "No"]).answer_files["gqa_pope_random.jsonl"][1]["answer"] == "No"


def test_amber_fractions_from_records_match_the_script_counts(files: dict[str, Path]) -> None:
    """The yes/no answers "No, there is no dog." (truth no), "Yes." (yes), "no" (no), "Yes" (yes):
    read with POPE's rule -> No, Yes, No (the word "no"), Yes: all four right, so accuracy 1,
    precision = recall = 1 for the discriminative group; "exact" compares the raw text: only "Yes"
    (id 6) is right -> accuracy 1/4, no answer is exactly "No" -> precision 0."""
    cfg = AmberBenchConfig(annotations=str(files["amber_annotations"]), queries=str(files["amber_queries"]))
    bench = _prepare("amber", files["amber_images"], amber=cfg)
    texts = ["A man stands by the lake. A dog runs.", "A chair.", "No, there is no dog.", "Yes.", "no", "Yes"]
    score = bench.scorer(texts)
    m = score.metrics
    assert m["amber/discriminative/accuracy"] == 1.0 and m["amber/discriminative/f1"] == 1.0
    assert m["amber/existence/accuracy"] == 1.0 and m["amber/attribute/recall"] == 1.0
    disc = score.official["discriminative"]["discriminative"]
    assert (disc["questions"], disc["correct"]) == (4, 4)
    gen = score.official["generative"]
    assert m["amber/generative/chair"] == pytest.approx(gen["hallucinated_nouns"] / gen["nouns"])
    assert m["amber/generative/cover"] == pytest.approx(gen["covered_objects"] / gen["truth_objects"])
    assert m["amber/generative/hal"] == pytest.approx(1 - gen["responses_without_hallucination"] / gen["responses"])
    assert [a["response"] for a in score.answer_files["amber_responses.json"]][2:] == ["No", "Yes", "No", "Yes"]
    cfg.answer_rule = "exact"
    exact = _prepare("amber", files["amber_images"], amber=cfg).scorer(texts)
    assert (
        exact.metrics["amber/discriminative/accuracy"] == 0.25
        and exact.metrics["amber/discriminative/precision"] == 0.0
    )


def _run(args: list[str], model: Path, out: Path) -> dict:
    base = ["eval", f"--model={model}", f"--output_dir={out}", "--device=cpu", "--dtype=float32", "--progress=false"]
    assert main(base + args) == 0
    return json.loads((out / "eval.json").read_text())


def test_pope_end_to_end_with_baseline_and_compare(
    tiny_model_dir, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every question of the three modes answered; eval.json holds the records, the file hashes,
    the rule and the generation settings; the same model as baseline gives differences and paired
    intervals of zero, and `vlalign compare` pairs the records by image and refuses another benchmark."""
    model = tiny_model_dir("qwen2_vl")
    pope = [f"--pope.dir={files['pope']}", f"--images={files['coco_images']}", "--pope.max_new_tokens=4"]
    out = _run(["--bench=pope", f"--baseline={model}", *pope], model, tmp_path / "a")
    assert out["benchmark"]["name"] == "pope/coco" and len(out["benchmark"]["files"]) == 3
    assert out["benchmark"]["settings"]["answer_rule"] == "official"
    assert out["benchmark"]["settings"]["generation"]["max_new_tokens"] == 4
    assert len(out["records"]["model"]) == 12 and "pope/average/f1" in out["metrics"]
    assert all(v["difference"] == v["low"] == v["high"] == 0.0 for v in out["difference_interval"].values())
    assert "pope/adversarial/f1" in out["difference_interval"]
    answers = (tmp_path / "a" / "answers" / "coco_pope_random.jsonl").read_text().splitlines()
    assert [json.loads(a)["question_id"] for a in answers] == [1, 2, 3, 4]
    again = _run(["--bench=pope", *pope], model, tmp_path / "b")
    assert again["metrics"]["pope/random/f1"] == out["metrics"]["pope/random/f1"]
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    shown = capsys.readouterr().out
    assert "pope/coco" in shown and "pope/random/f1" in shown and "2 images" in shown
    other = json.loads((tmp_path / "b" / "eval.json").read_text())
    other["benchmark"]["name"] = "pope/gqa"
    (tmp_path / "b" / "eval.json").write_text(json.dumps(other))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "pope/coco" in capsys.readouterr().err


def test_chair_and_amber_end_to_end(tiny_model_dir, files: dict[str, Path], tmp_path: Path) -> None:
    """CHAIR on two of the three images (seeded draw), AMBER on all six queries, from the command line."""
    model = tiny_model_dir("qwen2_vl")
    chair = _run(
        [
            "--bench=chair",
            f"--chair.instances={files['instances']}",
            f"--chair.captions={files['captions']}",
            f"--images={files['coco_images']}",
            "--chair.n_images=2",
            "--chair.max_new_tokens=6",
        ],
        model,
        tmp_path / "chair",
    )
    assert chair["benchmark"]["settings"]["n_images"] == 2 and {"chair/chair_i", "chair/chair_s"} <= set(
        chair["metrics"]
    )
    assert chair["benchmark"]["settings"]["prompt"] == "Please describe this image in detail."
    rec = chair["records"]["model"][0]
    assert {"image_id", "image", "question", "output", "objects", "mentions", "hallucinated"} <= set(rec)
    captions = json.loads((tmp_path / "chair" / "answers" / "chair_captions.json").read_text())
    assert len(captions) == 2 and set(captions[0]) == {"image_id", "caption"}
    amber = _run(
        [
            "--bench=amber",
            f"--amber.annotations={files['amber_annotations']}",
            f"--amber.queries={files['amber_queries']}",
            f"--images={files['amber_images']}",
            "--amber.max_new_tokens=6",
            "--amber.answer_max_new_tokens=3",
        ],
        model,
        tmp_path / "amber",
    )
    assert {"amber/generative/chair", "amber/existence/accuracy", "amber/discriminative/f1"} <= set(amber["metrics"])
    assert set(amber["official"]["model"]) == {"answer_rule", "discriminative", "generative"}
    responses = json.loads((tmp_path / "amber" / "answers" / "amber_responses.json").read_text())
    assert [r["id"] for r in responses] == [1, 2, 3, 4, 5, 6]
    assert all(r["response"] in ("Yes", "No") for r in responses[2:])


def test_amber_takes_the_users_noun_and_similarity_functions(files: dict[str, Path], tmp_path: Path) -> None:
    """`--amber.nouns=file.py:nouns` where every response's only noun is "dog".

    Response 1 (truth person, lake, mountain; targets dog, sun): "dog" is a target -> one
    hallucinated noun, Cog covers dog. Response 2 (truth bench, chair; target cloud): "dog" is no
    truth word -> hallucinated. Nouns 2, hallucinated 2: CHAIR 1; Cover 0/5; Hal 1; Cog 1/3.
    """
    user = tmp_path / "my_amber.py"
    user.write_text("def nouns(text):\n    return ['dog']\n\n\ndef similar(a, b):\n    return False\n")
    cfg = AmberBenchConfig(
        annotations=str(files["amber_annotations"]),
        queries=str(files["amber_queries"]),
        nouns=f"{user}:nouns",
        similar=f"{user}:similar",
    )
    bench = _prepare("amber", files["amber_images"], amber=cfg)
    m = bench.scorer(["A lake.", "A bench.", "No", "Yes", "No", "Yes"]).metrics
    assert (m["amber/generative/chair"], m["amber/generative/cover"], m["amber/generative/hal"]) == (1.0, 0.0, 1.0)
    assert m["amber/generative/cog"] == pytest.approx(1 / 3)
    assert bench.settings["nouns"] == f"{user}:nouns"
