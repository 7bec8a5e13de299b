"""``vlalign report`` of a published benchmark's evaluation (``vlalign eval --bench=pope|chair|amber``).

The eval folders are real: the benchmark files are tests/eval/official_files.py's fixtures, and
``vlalign eval`` runs the tiny model on them from the command line. For CHAIR and AMBER the tiny
model's answers (a few random tokens) hallucinate nothing, so the test scores chosen answers with
the prepared benchmark's own scorer and puts its records, metrics and official numbers in place
of the model's (the ``benchmark`` and ``config`` keys stay those the command wrote). The HTML is
parsed back with the standard library's ``html.parser``.
"""

from __future__ import annotations

import importlib.util
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from vlalign.cli import main
from vlalign.eval.official import AmberBenchConfig, ChairBenchConfig, PopeBenchConfig, prepare_benchmark

_SPEC = importlib.util.spec_from_file_location(
    "official_files", Path(__file__).parents[1] / "eval" / "official_files.py"
)
assert _SPEC is not None and _SPEC.loader is not None
official_files = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(official_files)


class _Tables(HTMLParser):
    """Every table of a page: rows of cells, each ``(text, attributes)``; and every ``<img>`` src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, dict[str, str]]]]] = []
        self.images: list[str] = []
        self._open: list[list[list[tuple[str, dict[str, str]]]]] = []
        self._cell: tuple[list[str], dict[str, str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._open.append([])
        elif tag == "tr" and self._open:
            self._open[-1].append([])
        elif tag in ("td", "th") and self._open:
            self._cell = ([], {k: v or "" for k, v in attrs})
        elif tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._open:
            self._open[-1][-1].append(("".join(self._cell[0]).strip(), self._cell[1]))
            self._cell = None
        elif tag == "table" and self._open:
            self.tables.append(self._open.pop())

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[0].append(data)


def _parse(path: Path) -> tuple[str, _Tables]:
    text = path.read_text()
    parser = _Tables()
    parser.feed(text)
    return text, parser


def _table(parser: _Tables, corner: str, index: int = 0) -> dict[str, dict[str, tuple[str, dict[str, str]]]]:
    """The ``index``-th table whose first heading is ``corner``, as {row name: {column heading: cell}}."""
    found = [t for t in parser.tables if t and t[0] and t[0][0][0] == corner]
    head, *rows = found[index]
    return {row[0][0]: {h[0]: cell for h, cell in zip(head[1:], row[1:])} for row in rows}


def _value(cell: tuple[str, dict[str, str]]) -> float:
    return float(cell[1]["data-value"])


def _eval(args: list[str], model: Path, out: Path) -> dict[str, Any]:
    base = ["eval", f"--model={model}", f"--output_dir={out}", "--device=cpu", "--dtype=float32", "--progress=false"]
    assert main(base + args) == 0
    return json.loads((out / "eval.json").read_text())


def _prepare(bench: str, images: Path, **cfgs: Any) -> Any:
    defaults = {"pope": PopeBenchConfig(), "chair": ChairBenchConfig(), "amber": AmberBenchConfig()}
    return prepare_benchmark(bench, str(images), **(defaults | cfgs))


def _report(folder: Path) -> Path:
    assert main(["report", str(folder)]) == 0
    return folder / "report.html"


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    return official_files.write_all(tmp_path / "data")


def test_pope_report_shows_files_official_tables_intervals_and_wrong_answers(
    tiny_model_dir, files: dict[str, Path], tmp_path: Path
) -> None:
    """POPE (three modes, four questions each: labels yes, no, yes, no) with the same tiny model as
    baseline. The page shows the name; each file with the first 12 hex digits of its sha256 and
    the whole value in the title; the settings; per mode (and Average) accuracy ... fn and the
    answers the two rules read differently, each cell's data-value the eval.json number; the
    headline's interval for pope/random/f1 is eval.json's ``difference_interval`` (replaced here by
    [-0.125, 0.25] to tell it from a recomputed one, which is [0, 0] for a model against itself);
    and the wrong answers: a question is wrong when ``said_yes`` differs from the label, counted
    from the records by hand below, at most 12 shown, each with its image."""
    model = tiny_model_dir("qwen2_vl")
    out = tmp_path / "pope-eval"
    args = ["--bench=pope", f"--pope.dir={files['pope']}", f"--images={files['coco_images']}"]
    data = _eval([*args, "--pope.max_new_tokens=4", f"--baseline={model}"], model, out)
    data["difference_interval"]["pope/random/f1"].update(low=-0.125, high=0.25)
    (out / "eval.json").write_text(json.dumps(data))
    text, page = _parse(_report(out))

    assert '<b class="benchmark-name">pope/coco</b>' in text
    for path, digest in data["benchmark"]["files"].items():
        assert len(digest) == 64 and f'title="{digest}">{digest[:12]}…</code>' in text and path in text
    settings = _table(page, "answer_rule")  # the settings table's first row is its heading row here
    assert settings["compare_rules"]["official"][0] == "yes" and "max_new_tokens" in settings

    official = data["official"]["model"]
    for index, run in enumerate(("model", "baseline")):
        table = _table(page, "mode", index)
        assert list(table) == ["random", "popular", "adversarial", "Average"]
        for mode, numbers in official["per_mode"].items():
            for key in ("accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn"):
                assert _value(table[mode][key]) == numbers[key]
            assert _value(table[mode]["read differently by the other rule"]) == official["disagreements"][mode]
        assert _value(table["Average"]["f1"]) == data["official"][run]["average"]["f1"]
    total = sum(official["disagreements"].values())
    assert f"Answers the official rule and the project rule read differently: <b>{total}</b> in all." in text

    headline = {row[1][0]: row for row in next(t for t in page.tables if t[0][0][0] == "what")[1:]}
    assert list(headline) == ["pope/random/f1", "pope/popular/f1", "pope/adversarial/f1", "pope/average/f1"]
    assert headline["pope/random/f1"][0][0].startswith("POPE F1, random negatives")
    assert [c[0] for c in headline["pope/random/f1"][2:]] == ["0.6667", "0.6667", "0", "[-0.125, 0.25]"]
    assert _value(headline["pope/random/f1"][3]) == data["metrics"]["pope/random/f1"]

    records = data["records"]["model"]
    wrong = [r for r in records if r["said_yes"] != (r["label"] == "yes")]
    assert f"<b>{len(wrong)} of {len(records)}</b> answers wrong" in text
    gallery = next(t for t in page.tables if [c[0] for c in t[0]] == ["image", "question", "model", "baseline"])
    assert len(gallery) - 1 == min(12, len(wrong)) > 0
    assert wrong[0]["question"] in gallery[1][1][0] and "the label is no" in gallery[1][2][0]
    assert sum(src.startswith("data:image/png;base64,") for src in page.images) >= len(gallery) - 1


def test_chair_and_amber_reports_show_their_official_numbers_and_hallucinations(
    tiny_model_dir, files: dict[str, Path], tmp_path: Path
) -> None:
    """CHAIR on all three COCO images, every description "A dog and a surfboard on the grass.":
    101 (person, dog) hallucinates the surfboard, 102 (cat, couch) and 103 (nothing) both: 5 of 6
    mentions hallucinated (CHAIR_i 5/6), 3 of 3 captions (CHAIR_s 1), the dog recalled of 4 objects
    (recall 1/4); the words are marked in the gallery.

    AMBER: description 1 "A dog on a lake." (truth person, lake, mountain; hallucination targets
    dog, sun): the dog is hallucinated, one noun of its two; description 2 "A bench and a chair."
    (truth bench, chair) none of its two: 1 of 4 nouns. Yes/no answers Yes, Yes, No, No to truths
    no, yes, no, yes: questions 3 and 6 wrong (existence 1 of 2 right, relation 0 of 1). Wrong
    answers: 1 description + 2 questions = 3 of 6.
    """
    model = tiny_model_dir("qwen2_vl")
    chair_args = [
        f"--chair.instances={files['instances']}",
        f"--chair.captions={files['captions']}",
        f"--images={files['coco_images']}",
        "--chair.n_images=3",
    ]
    chair_out = tmp_path / "chair-eval"
    data = _eval(["--bench=chair", *chair_args, "--chair.max_new_tokens=4"], model, chair_out)
    cfg = ChairBenchConfig(instances=str(files["instances"]), captions=str(files["captions"]), n_images=3)
    bench = _prepare("chair", files["coco_images"], chair=cfg)
    score = bench.scorer(["A dog and a surfboard on the grass."] * len(bench))
    data |= {"metrics": score.metrics, "official": {"model": score.official, "baseline": None}}
    data["records"]["model"] = score.records
    (chair_out / "eval.json").write_text(json.dumps(data))
    text, page = _parse(_report(chair_out))
    row = _table(page, "run")["model"]
    assert (_value(row["CHAIR_s"]), _value(row["CHAIR_i"]), _value(row["Recall"])) == (1.0, 5 / 6, 0.25)
    assert "CHAIR on COCO (official mode)" in text and "<mark>surfboard</mark>" in text
    assert "<b>3 of 3</b> answers wrong" in text and "not in the image: dog, surfboard" in text
    headline = {row[1][0]: row for row in next(t for t in page.tables if t[0][0][0] == "what")[1:]}
    assert _value(headline["chair/chair_i"][2]) == 5 / 6

    amber_out = tmp_path / "amber-eval"
    amber_args = [
        f"--amber.annotations={files['amber_annotations']}",
        f"--amber.queries={files['amber_queries']}",
        f"--images={files['amber_images']}",
    ]
    data = _eval(["--bench=amber", *amber_args, "--amber.max_new_tokens=4"], model, amber_out)
    cfg_a = AmberBenchConfig(annotations=str(files["amber_annotations"]), queries=str(files["amber_queries"]))
    bench = _prepare("amber", files["amber_images"], amber=cfg_a)
    score = bench.scorer(["A dog on a lake.", "A bench and a chair.", "Yes", "Yes", "No", "No"])
    data |= {"metrics": score.metrics, "official": {"model": score.official, "baseline": None}}
    data["records"]["model"] = score.records
    (amber_out / "eval.json").write_text(json.dumps(data))
    text, page = _parse(_report(amber_out))
    generative = _table(page, "run")["model"]
    for key, head in (("chair", "CHAIR"), ("cover", "Cover"), ("hal", "Hal"), ("cog", "Cog")):
        assert _value(generative[head]) == score.official["generative"][key]
    assert (_value(generative["nouns"]), _value(generative["hallucinated nouns"])) == (4, 1)
    groups = _table(page, "group")
    assert list(groups) == ["discriminative", "existence", "attribute", "state", "relation"]
    assert (
        _value(groups["discriminative"]["Accuracy"]) == score.official["discriminative"]["discriminative"]["accuracy"]
    )
    assert (_value(groups["existence"]["correct"]), _value(groups["relation"]["correct"])) == (1, 0)
    assert "<b>3 of 6</b> answers wrong" in text and "1 of 2 nouns hallucinated" in text
    assert "response &#x27;No&#x27;; the truth is yes" in text
