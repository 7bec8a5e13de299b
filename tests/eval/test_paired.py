"""The paired bootstrap of two evaluations (vlalign.eval.paired) and `vlalign compare`: counts and
metrics by hand, the interval against the analytic standard error, scene clustering exactly, and
the command's table, JSON and errors."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlalign.cli import main
from vlalign.eval.paired import metrics_from_counts, paired_bootstrap, record_counts


def pope(scene: int, k: int, said: bool, answer: str, mode: str = "adversarial") -> dict[str, Any]:
    return {
        "part": f"pope/{mode}",
        "id": f"s{scene}/pope-{mode}/{k}",
        "image": f"img/s{scene}.png",
        "said_yes": said,
        "answer": answer,
    }


def question(scene: int, k: int, correct: bool, task: str = "counting") -> dict[str, Any]:
    return {
        "part": "heldout",
        "id": f"s{scene}/{task}/{k}",
        "image": f"img/s{scene}.png",
        "task": task,
        "correct": correct,
    }


def test_record_counts_and_metrics_by_hand() -> None:
    """POPE with TP 3, FP 1, TN 4, FN 2: precision 3/4, recall 3/5, F1 2/3, accuracy 7/10, yes ratio
    4/10; CHAIR over two descriptions (1 of 4 mentions hallucinated); a task's accuracy 1/2."""
    cells = [(True, "Yes")] * 3 + [(True, "No")] + [(False, "No")] * 4 + [(False, "Yes")] * 2
    records = [pope(i, 0, s, a) for i, (s, a) in enumerate(cells)]
    records += [
        {
            "part": "heldout",
            "id": "d0",
            "task": "describe",
            "objects": ["red circle", "blue square"],
            "mentions": 3,
            "hallucinated": ["green cross"],
            "recalled": ["red circle", "blue square"],
        },
        {
            "part": "compositional",
            "id": "d1",
            "task": "describe",
            "objects": ["red circle"],
            "mentions": 1,
            "hallucinated": [],
            "recalled": ["red circle"],
        },
        {
            "part": "heldout",
            "id": "d2",
            "task": "describe",
            "objects": ["red circle", "blue square"],
            "mentions": 1,
            "hallucinated": [],
            "recalled": ["red circle"],
        },
        question(0, 0, True),
        question(1, 0, False),
    ]
    assert record_counts(records[0]) == {"pope/adversarial:tp": 1.0}
    assert record_counts(records[3]) == {"pope/adversarial:fp": 1.0}
    assert record_counts(records[-1]) == {"task/counting:asked": 1.0, "task/counting:right": 0.0}
    assert record_counts({"part": "heldout", "id": "x", "output": "hi"}) == {}
    summed: dict[str, float] = {}
    for r in records:
        for k, v in record_counts(r).items():
            summed[k] = summed.get(k, 0.0) + v
    m = {k: float(v[0]) for k, v in metrics_from_counts({k: np.array([v]) for k, v in summed.items()}).items()}
    assert m["pope/adversarial/precision"] == 0.75 and m["pope/adversarial/recall"] == 0.6
    assert m["pope/adversarial/f1"] == pytest.approx(2 / 3, abs=1e-15)
    assert m["pope/adversarial/accuracy"] == 0.7 and m["pope/adversarial/yes_ratio"] == 0.4
    assert m["chair/chair_i"] == 0.25 and m["chair/chair_s"] == 0.5 and m["chair/recall"] == 0.75
    assert m["compositional/chair/chair_i"] == 0.0 and m["compositional/chair/recall"] == 1.0
    assert m["task/counting"] == 0.5


def test_chair_i_needs_the_mention_count() -> None:
    """Records written before the mention count was kept give CHAIR_s and recall, not CHAIR_i."""
    old = {
        "part": "heldout",
        "id": "d0",
        "task": "describe",
        "objects": ["red circle"],
        "hallucinated": ["blue square"],
        "recalled": ["red circle"],
    }
    m = metrics_from_counts({k: np.array([v]) for k, v in record_counts(old).items()})
    assert "chair/chair_i" not in m and float(m["chair/chair_s"][0]) == 1.0


def test_a_metric_one_side_cannot_compute_is_left_out() -> None:
    """New records (with the mention count) against old ones (without): CHAIR_i is not compared
    (rather than read as 0 on the old side); CHAIR_s is."""
    new = [
        {
            "part": "heldout",
            "id": f"d{i}",
            "image": f"s{i}.png",
            "objects": ["red circle"],
            "mentions": 2,
            "hallucinated": ["blue square"] if i % 2 else [],
            "recalled": ["red circle"],
        }
        for i in range(6)
    ]
    old = [{k: v for k, v in r.items() if k != "mentions"} for r in new]
    res = paired_bootstrap([new], [old], samples=50)
    assert "chair/chair_i" not in res and res["chair/chair_s"].difference == 0.0
    assert paired_bootstrap([new], [new], samples=50)["chair/chair_i"].a == 3 / 12


def _accuracy_runs(n: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    a = [question(i, 0, rng.random() < 0.8) for i in range(n)]
    b = [question(i, 0, rng.random() < 0.7) for i in range(n)]
    return a, b


def test_identical_sides_give_an_interval_of_zero() -> None:
    a, _ = _accuracy_runs(50, 0)
    iv = paired_bootstrap([a], [list(a)], samples=200)["task/counting"]
    assert (iv.difference, iv.low, iv.high, iv.se) == (0.0, 0.0, 0.0, 0.0) and not iv.excludes_zero


def test_standard_error_matches_the_analytic_one() -> None:
    """One question per scene: the difference of accuracies is a mean of per-scene differences d_i,
    whose standard error is std(d) / sqrt(n); 4000 draws estimate it to about 1/sqrt(2 * 4000) = 1.1%
    relative, so 5% is a real bound. The interval is about +-1.96 se around the point."""
    a, b = _accuracy_runs(400, 1)
    d = np.array([float(x["correct"]) - float(y["correct"]) for x, y in zip(a, b)])
    iv = paired_bootstrap([a], [b], samples=4000, seed=3)["task/counting"]
    assert iv.difference == pytest.approx(d.mean(), abs=1e-15)
    analytic = d.std() / math.sqrt(len(d))
    assert iv.se == pytest.approx(analytic, rel=0.05)
    assert iv.low == pytest.approx(iv.difference - 1.96 * analytic, abs=0.25 * analytic)
    assert iv.high == pytest.approx(iv.difference + 1.96 * analytic, abs=0.25 * analytic)
    assert iv.excludes_zero  # 0.1 apart with a standard error near 0.03
    again = paired_bootstrap([a], [b], samples=4000, seed=3)["task/counting"]
    assert again == iv


def test_scenes_are_drawn_whole_and_runs_pool() -> None:
    """Four identical questions per scene carry the information of one: the draws (same seed, same
    scene count) give exactly the one-question interval, not one half as wide. Two copies of a run on
    one side pool to the same metrics."""
    a, b = _accuracy_runs(120, 2)
    once = paired_bootstrap([a], [b], samples=500)["task/counting"]
    four = lambda rs: [dict(r, id=f"{r['id']}-{k}") for r in rs for k in range(4)]  # noqa: E731
    repeated = paired_bootstrap([four(a)], [four(b)], samples=500)["task/counting"]
    assert (repeated.low, repeated.high, repeated.se) == pytest.approx((once.low, once.high, once.se), abs=1e-15)
    pooled = paired_bootstrap([a, a], [b, b], samples=500)["task/counting"]
    assert (pooled.difference, pooled.low, pooled.high) == pytest.approx(
        (once.difference, once.low, once.high), abs=1e-15
    )


def test_evaluations_of_other_questions_are_refused() -> None:
    a, b = _accuracy_runs(10, 0)
    with pytest.raises(
        ValueError, match=r"b evaluation 1 answered other questions.*'s9/counting/0' \(heldout\) is missing"
    ):
        paired_bootstrap([a], [b[:-1]])
    with pytest.raises(ValueError, match="a evaluation 2"):
        paired_bootstrap([a, a[1:]], [b])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([a], [b], level=1.0)


def _eval_file(folder: Path, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({"metrics": {}, "records": {"model": records, "baseline": None}}))
    return folder


def test_vlalign_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vlalign compare A B`: the table with a - b and its interval, the JSON file; bad inputs exit 2
    naming the file."""
    records_a = [pope(i, k, said=k == 0, answer="Yes" if k == 0 else "No") for i in range(40) for k in range(2)]
    records_b = [pope(i, k, said=True, answer="Yes" if k == 0 else "No") for i in range(40) for k in range(2)]
    a, b = _eval_file(tmp_path / "a", records_a), _eval_file(tmp_path / "b", records_b)
    out = tmp_path / "cmp.json"
    shown = "--metrics=pope/adversarial/f1,pope/adversarial/yes"
    assert main(["compare", str(a), str(b / "eval.json"), shown, f"--out={out}"]) == 0
    text = capsys.readouterr().out
    # a answers all 80 right (F1 1); b says yes to all (precision 1/2, recall 1, F1 2/3); every draw keeps that.
    assert "pope/adversarial/f1" in text and "[+0.333, +0.333]*" in text and "accuracy" not in text
    saved = json.loads(out.read_text())["intervals"]
    assert saved["pope/adversarial/f1"]["difference"] == pytest.approx(1 / 3, abs=1e-15)
    assert saved["pope/adversarial/yes_ratio"]["difference"] == -0.5
    assert "each run against its counterpart" not in text  # one run a side: nothing per run
    # two runs a side: pooled, and each pair alone (the second pair: a's answers on both sides, 0)
    # the file is kept unless asked: refused before anything is read, then replaced with --overwrite
    assert main(["compare", f"--a={a},{a}", f"--b={b},{a}", shown, f"--out={out}"]) == 2
    assert f"{out} already exists; pass --overwrite=true" in capsys.readouterr().err
    assert main(["compare", f"--a={a},{a}", f"--b={b},{a}", shown, f"--out={out}", "--overwrite=true"]) == 0
    text = capsys.readouterr().out
    assert "each run against its counterpart" in text and re.search(
        r"pope/adversarial/f1 +\+0\.333\* / \+0\.000\n", text
    )
    per_run = json.loads(out.read_text())["per_run"]
    assert [r["pope/adversarial/f1"]["difference"] for r in per_run] == pytest.approx([1 / 3, 0.0], abs=1e-15)
    assert main(["compare", str(a), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no eval.json there" in capsys.readouterr().err
    assert main(["compare", str(a), str(_eval_file(tmp_path / "c", records_b[:-2]))]) == 2
    assert "b evaluation 1 answered other questions" in capsys.readouterr().err
    assert main(["compare", str(a)]) == 2
    assert main(["compare", str(a), str(b), "--metrics=chair"]) == 2
    assert "no metric starts with chair" in capsys.readouterr().err


def test_benchmark_records_by_hand() -> None:
    """Records of published benchmarks (vlalign.eval.official).

    POPE with ``label`` in place of ``answer``: said yes to a yes (TP) and to a no (FP): precision 1/2.
    CHAIR on COCO (part ``chair``, no prefix): one caption, 2 of 3 mentions hallucinated: CHAIR_i 2/3.
    AMBER yes/no: existence (truth no, answered No: right), state (truth yes, answered No: wrong),
    number (truth no, answered Yes: wrong). Existence: accuracy 1, precision 1, recall 1. Attribute
    (state + number): accuracy 0, answered No 1 (0 right) -> precision 0, truth no 1 -> recall 0.
    Discriminative (all three): accuracy 1/3, precision 1/2, recall 1/2, F1 1/2.
    AMBER descriptions: nouns 4 + 2, hallucinated 1 + 0 -> chair 1/6; truth 3 + 2, covered 2 + 1 ->
    cover 3/5; one of two responses hallucinates -> hal 1/2; targets 2 + 1, covered 1 + 0 -> cog 1/3.
    """
    records = [
        {"part": "pope/random", "id": "1", "image": "a.jpg", "said_yes": True, "label": "yes"},
        {"part": "pope/random", "id": "2", "image": "a.jpg", "said_yes": True, "label": "no"},
        {"part": "chair", "id": "7", "objects": ["dog"], "mentions": 3, "hallucinated": [["cat", "cat"]] * 2},
        {"part": "amber/existence", "id": "3", "label": "no", "response": "No"},
        {"part": "amber/state", "id": "4", "label": "yes", "response": "No"},
        {"part": "amber/number", "id": "5", "label": "no", "response": "Yes"},
    ]
    counts = ("nouns", "hallucinated_nouns", "truth_objects", "covered_objects", "targets", "covered_targets")
    for ident, values in (("1", (4, 1, 3, 2, 2, 1)), ("2", (2, 0, 2, 1, 1, 0))):
        records.append({"part": "amber/generative", "id": ident, **dict(zip(counts, values))})
    summed: dict[str, float] = {}
    for r in records:
        for k, v in record_counts(r).items():
            summed[k] = summed.get(k, 0.0) + v
    m = {k: float(v[0]) for k, v in metrics_from_counts({k: np.array([v]) for k, v in summed.items()}).items()}
    assert m["pope/random/precision"] == 0.5 and m["chair/chair_i"] == pytest.approx(2 / 3)
    assert (m["amber/existence/accuracy"], m["amber/existence/precision"], m["amber/existence/recall"]) == (1, 1, 1)
    assert (m["amber/attribute/accuracy"], m["amber/attribute/precision"], m["amber/attribute/recall"]) == (0, 0, 0)
    assert m["amber/discriminative/accuracy"] == pytest.approx(1 / 3)
    assert (
        m["amber/discriminative/precision"] == m["amber/discriminative/recall"] == m["amber/discriminative/f1"] == 0.5
    )
    assert m["amber/generative/chair"] == pytest.approx(1 / 6) and m["amber/generative/cover"] == pytest.approx(3 / 5)
    assert m["amber/generative/hal"] == 0.5 and m["amber/generative/cog"] == pytest.approx(1 / 3)
