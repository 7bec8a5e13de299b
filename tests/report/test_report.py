"""``vlalign report`` on hand-written folders: a fake demo folder (three stages, a tiny world with
four images), an eval folder, a plain run folder and an empty one; the HTML is parsed back with
the standard library's ``html.parser`` and every embedded image decoded."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlalign.cli import main as cli_main
from vlalign.data.annotations import ObjectVocabulary
from vlalign.report.gallery import highlight
from vlalign.report.html import ReportError, fmt, write_report
from vlalign.report.plots import bar_groups, curve_charts, metric_series

VOCAB = {
    "red circle": ["red circles", "red disc", "red discs"],
    "blue square": ["blue squares", "blue box"],
    "green triangle": ["green triangles"],
}
IMAGE_COLOURS = {"s0": (255, 0, 0), "s1": (0, 0, 255), "s2": (0, 128, 0), "s3": (200, 200, 0)}
IMAGE_SIZE = (24, 20)  # (W, H): not square, so a swapped size would show

SUMMARY = [
    (
        "base",
        "sft",
        "eval-base",
        {
            "chair/chair_i": 0.42,
            "chair/chair_s": 0.75,
            "pope/adversarial/f1": 0.61,
            "pope/adversarial/yes_ratio": 0.7,
            "pope/random/f1": 0.8,
            "task/counting": 0.3,
            "task/colour": 0.92,
            "task/existence": 0.81,
        },
        61.5,
    ),
    (
        "dpo",
        "dpo",
        "eval-dpo",
        {
            "chair/chair_i": 0.2,
            "chair/chair_s": 0.375,
            "pope/adversarial/f1": 0.7,
            "pope/adversarial/yes_ratio": 0.55,
            "pope/random/f1": 0.85,
            "task/counting": 0.35,
            "task/colour": 0.92,
            "task/existence": 0.86,
            "kl/seq": 1.25,
        },
        93.0,
    ),
    (
        "grpo",
        "grpo",
        "eval-grpo",
        {
            "chair/chair_i": 0.125,
            "chair/chair_s": 0.25,
            "pope/adversarial/f1": 0.72,
            "pope/adversarial/yes_ratio": 0.5,
            "pope/random/f1": float("nan"),
            "task/counting": 0.6,
            "task/colour": 0.91,
            "task/existence": 0.88,
            "kl/seq": 2.5,
        },
        120.25,
    ),
]


# ----------------------------------------------------------------------------- parsing the HTML


class Page(HTMLParser):
    """Images, <mark> texts, table cells, section ids, anchors and all text of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.marks: list[str] = []
        self.cells: list[dict[str, str]] = []
        self.sections: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self._mark: list[str] | None = None
        self._cell: dict[str, str] | None = None
        self._th: str | None = None
        self._row = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "mark":
            self._mark = []
        elif tag == "th" and a.get("class") == "metric":
            self._th = ""
        elif tag == "td" and "data-column" in a:
            self._cell = dict(a, text="", row=self._row)
        elif tag == "section":
            self.sections.append(a["id"])
        elif tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])

    def handle_endtag(self, tag: str) -> None:
        if tag == "mark" and self._mark is not None:
            self.marks.append("".join(self._mark))
            self._mark = None
        elif tag == "th" and self._th is not None:
            self._row, self._th = self._th, None
        elif tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._mark is not None:
            self._mark.append(data)
        if self._cell is not None:
            self._cell["text"] += data
        if self._th is not None:
            self._th += data


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def decode_png(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
    return data


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


# ----------------------------------------------------------------------------- the fake folders


def write_world(folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    for name, colour in IMAGE_COLOURS.items():
        Image.new("RGB", IMAGE_SIZE, colour).save(folder / "images" / f"{name}.png")
    (folder / "manifest.json").write_text(json.dumps({"object_vocabulary": VOCAB}))


def describe(i: int, output: str, objects: list[str], hallucinated: list[str]) -> dict[str, Any]:
    recalled = sorted(set(objects) & {n for n in VOCAB if n.split()[1] in output.lower()})
    return {
        "part": "heldout",
        "id": f"s{i}-describe",
        "task": "describe",
        "question": "Describe the image.",
        "image": f"images/s{i}.png",
        "output": output,
        "objects": objects,
        "hallucinated": hallucinated,
        "recalled": recalled,
    }


BASE_RECORDS = [
    describe(0, "A red circle and a green triangle.", ["red circle"], ["green triangle"]),
    describe(1, "Two blue squares. <script>alert(1)</script>", ["blue square"], []),
    describe(2, "A red disc beside a Blue Box.", ["green triangle"], ["red circle", "blue square"]),
    describe(3, "Nothing & nobody.", ["red circle"], []),
    {
        "part": "pope/random",
        "id": "s0-pope",
        "task": "existence",
        "question": "Is there a red circle?",
        "image": "images/s0.png",
        "output": "Yes",
        "said_yes": True,
    },
]
LAST_RECORDS = [
    describe(0, "A red circle.", ["red circle"], []),
    describe(1, "Two blue squares.", ["blue square"], []),
    describe(2, "A green triangle and no red circle.", ["green triangle"], []),
    describe(3, "A red circle.", ["red circle"], []),
]


def eval_json(
    metrics: dict[str, float], records: list[dict], baseline: tuple[dict, list] | None = None, data: str = "../world"
) -> str:
    return json.dumps(
        {
            "model": "m",
            "metrics": metrics,
            "baseline_metrics": baseline[0] if baseline else None,
            "config": {"suite": {"data": data, "vocabulary": ""}},
            "records": {"model": records, "baseline": baseline[1] if baseline else None},
        }
    )


def write_jsonl(path: Path, rows: list[dict[str, Any]], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report") / "demo"
    write_world(root / "world")
    write_jsonl(
        root / "sft" / "metrics.jsonl",
        [{"step": s, "time": 1.0, "train/loss": 2.0 / s, "perf/samples_per_s": 10.0 + s} for s in range(1, 6)]
        + [{"step": 5, "eval/loss": 0.5}],
    )
    write_jsonl(
        root / "dpo" / "metrics.jsonl",
        [
            {
                "step": s,
                "train/loss": 0.69 - 0.05 * s,
                "rewards/chosen": 0.1 * s,
                "rewards/rejected": -0.1 * s,
                "rewards/margin": 0.2 * s,
                "rewards/accuracy": 0.5 + 0.1 * s,
                "kl/seq": 0.01 * s,
                "perf/tokens_per_s": float("nan") if s == 2 else 100.0,
            }
            for s in range(1, 5)
        ],
        tail='{"step": 5, "train/lo',
    )  # a run killed mid-write
    write_jsonl(
        root / "grpo" / "metrics.jsonl",
        [
            {
                "step": s,
                "train/loss": 0.1,
                "rewards/count_match/mean": 0.2 * s,
                "rewards/count_match/std": 0.1,
                "rewards/total/mean": 0.2 * s,
                "rewards/total/std": 0.1,
                "kl/ref": 0.001 * s,
                "policy/clip_frac": 0.05,
                "completions/mean_length": 12.0,
            }
            for s in range(1, 4)
        ],
    )
    for (_stage, _, folder, metrics, _), records in zip(SUMMARY, (BASE_RECORDS, LAST_RECORDS, LAST_RECORDS)):
        (root / folder).mkdir()
        # as a demo run elsewhere wrote them: the data folder relative to another working directory,
        # the images as absolute paths that no longer exist
        moved = [dict(r, image=f"/gone/runs/demo/world/{r['image']}") for r in records]
        (root / folder / "eval.json").write_text(eval_json(metrics, moved, data="runs/demo/world"))
    stages = [{"stage": s, "folder": f, "eval": e, "metrics": m, "seconds": t} for s, f, e, m, t in SUMMARY]
    video = {"model": "tiny:qwen2_vl:small", "stages": [{"stage": "video-sft", "metrics": {"eval/moved": 0.375}}]}
    summary = {"stages": stages, "total_seconds": 274.75, "video": video}
    (root / "demo_summary.json").write_text(json.dumps(summary))
    return root, write_report(root)


# ----------------------------------------------------------------------------- the demo report


def test_demo_report_images_are_the_png_files(demo: tuple[Path, Path]) -> None:
    """Every <img> is an embedded PNG; the plots are byte for byte the PNG files in report/ (one
    image per file, the sizes matplotlib wrote), the gallery images keep the world's 24 x 20."""
    root, out = demo
    assert out == root / "report.html"
    page = parse(out)
    embedded = [decode_png(src) for src in page.images]
    files = {p.name: p.read_bytes() for p in (root / "report").glob("*.png")}
    plots = [d for d in embedded if d in files.values()]
    assert sorted(plots) == sorted(files.values())  # every file embedded once, nothing else passed off as a plot
    for data in plots:
        assert png_size(data) == png_size(files[next(n for n, b in files.items() if b == data)])
    gallery = [d for d in embedded if d not in files.values()]
    assert len(gallery) == 4 and all(png_size(d) == IMAGE_SIZE for d in gallery)
    expected = {
        "summary-chair",
        "summary-pope-f1",
        "summary-pope-yes",
        "summary-tasks",
        "summary-kl",
        "summary-seconds",
        "base-loss",
        "base-throughput",
        "dpo-loss",
        "dpo-rewards",
        "dpo-kl",
        "dpo-throughput",
        "grpo-loss",
        "grpo-kl",
        "grpo-reward-functions",
        "grpo-policy",
        "grpo-other",
    }
    assert {n.removesuffix(".png") for n in files} == expected


def test_demo_report_sections_and_table(demo: tuple[Path, Path]) -> None:
    """Each section is there and linked; the table's cells hold demo_summary.json's numbers
    (exactly in data-value, formatted as fmt() writes them), NaN shown as nan."""
    root, out = demo
    page = parse(out)
    for section in ("about", "summary", "evaluation", "stage-base", "stage-dpo", "stage-grpo", "gallery", "notes"):
        assert section in page.sections and section in page.links
    assert "video" in page.sections  # the demo's video task: its own section, not a row of "about"
    html_text = out.read_text(encoding="utf-8")
    assert 'eval/moved</th><td class="num">0.375</td>' in html_text  # a sub-row under its stage
    assert html_text.count("tiny:qwen2_vl:small") == 1
    cells = {(c["data-column"], c["row"]): c for c in page.cells}
    for stage, _, _, metrics, seconds in SUMMARY:
        for key, value in {**metrics, "seconds": seconds}.items():
            cell = cells[stage, key]
            if math.isnan(value):
                assert cell["text"] == "nan" and "data-value" not in cell
            else:
                assert float(cell["data-value"]) == value and cell["text"] == fmt(value), (stage, key)
    assert cells["base", "kl/seq"]["text"] == "–"  # the base model has no KL
    assert len(cells) == 3 * 10
    text = "".join(page.text)
    # the summary's other fields, a row each in "About this run", 4 significant digits
    assert '<th class="about-key">total_seconds</th><td class="num">274.8</td>' in out.read_text(encoding="utf-8")
    assert "skipped 1 line(s)" in text  # the half-written line of dpo/metrics.jsonl


def test_demo_gallery_marks_hallucinations_and_escapes(demo: tuple[Path, Path]) -> None:
    """Base column: "green triangle" (absent) marked, "red circle" (present) not; the synonyms
    "red disc" and "Blue Box" marked; nothing marked in the last stage's column (no hallucinated
    objects); an output with <script> shows as text; per-image counts of the base column."""
    root, out = demo
    page = parse(out)
    assert sorted(page.marks) == ["Blue Box", "green triangle", "red disc"]
    raw = out.read_text(encoding="utf-8")
    assert "<script>" not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    text = "".join(page.text)
    assert "Two blue squares. <script>alert(1)</script>" in text and "Nothing & nobody." in text
    assert "hallucinated 1 of 2 object mentions (CHAIR_i 0.50)" in text
    assert "hallucinated 2 of 2 object mentions (CHAIR_i 1.00)" in text


# ----------------------------------------------------------------------------- other folders


def test_plain_run_folder(tmp_path: Path) -> None:
    """metrics.jsonl only: the loss plot, embedded and on disk; the last values table; --out elsewhere."""
    run = tmp_path / "run"
    write_jsonl(run / "metrics.jsonl", [{"step": s, "train/loss": 1.0 / s, "train/lr": 1e-4} for s in (1, 2, 3)])
    out = write_report(run, tmp_path / "elsewhere" / "r.html")
    page = parse(out)
    loss = (tmp_path / "elsewhere" / "r" / "loss.png").read_bytes()
    assert [decode_png(s) for s in page.images][0] == loss
    assert {"final", "curves"} <= set(page.sections)
    assert any(c["data-column"] == "last" and c.get("data-value") == repr(1.0 / 3) for c in page.cells)


def test_eval_folder_before_and_after(tmp_path: Path) -> None:
    """eval.json with a baseline: baseline and model columns, the difference, before/after bars."""
    write_world(tmp_path / "world")
    folder = tmp_path / "eval"
    folder.mkdir()
    base = {"chair/chair_i": 0.5, "pope/popular/f1": 0.6, "task/counting": 0.25}
    model = {"chair/chair_i": 0.25, "pope/popular/f1": 0.75, "task/counting": 0.5, "kl/seq": 0.5, "kl/n": 48}
    (folder / "eval.json").write_text(eval_json(model, LAST_RECORDS, (base, BASE_RECORDS)))
    page = parse(write_report(folder))
    assert {p.name for p in (folder / "report").glob("*.png")} == {
        "eval-chair.png",
        "eval-pope-f1.png",
        "eval-tasks.png",
        "eval-kl.png",
    }
    cells = {(c["data-column"], c["row"]): c["text"] for c in page.cells}
    assert cells["baseline", "chair/chair_i"] == "0.5" and cells["model", "chair/chair_i"] == "0.25"
    assert cells["baseline", "kl/seq"] == "–" and cells["model", "kl/n"] == "48"
    text = "".join(page.text)
    assert "model − baseline" in text and "chair/chair_i0.50.25-0.25" in text and "task/counting0.250.50.25" in text
    assert sorted(page.marks) == ["Blue Box", "green triangle", "red disc"]  # the baseline column


def test_named_data_source_is_found_through_data_folders(tmp_path: Path) -> None:
    """An evaluation of ``shapes:`` (a named source, not a path): the caller's ``data_folders``
    says where it lives, and the gallery finds its images and vocabulary there (the synonyms
    "red disc" and "Blue Box" are marked only with the world's vocabulary)."""
    write_world(tmp_path / "cache" / "world")
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "eval.json").write_text(eval_json({"chair/chair_i": 0.5}, BASE_RECORDS, data="shapes:"))
    page = parse(write_report(folder, data_folders={"shapes:": tmp_path / "cache" / "world"}))
    assert sorted(page.marks) == ["Blue Box", "green triangle", "red disc"]
    assert "image not found" not in "".join(page.text)


def test_eval_folder_intervals_of_the_differences(tmp_path: Path) -> None:
    """Both models answered the same questions: a 95% interval per difference. Every baseline
    description hallucinates and no model description does, so every draw of scenes gives CHAIR_s
    1 - 0 and the interval of model - baseline is [-1, -1]. Other questions: no column, a note."""
    write_world(tmp_path / "world")
    folder = tmp_path / "eval"
    folder.mkdir()
    clean = [dict(r, mentions=1) for r in LAST_RECORDS]
    dirty = [dict(r, hallucinated=["green triangle"], mentions=2) for r in clean]
    metrics = {"chair/chair_s": 0.0}
    (folder / "eval.json").write_text(eval_json(metrics, clean, ({"chair/chair_s": 1.0}, dirty)))
    page = parse(write_report(folder))
    text = "".join(page.text)
    assert "95% interval (paired, scenes drawn)" in text
    assert "chair/chair_s10-1[-1, -1]" in text and "chair/chair_i" not in text  # only metrics in both columns
    (folder / "eval.json").write_text(eval_json(metrics, clean, ({"chair/chair_s": 1.0}, dirty[:3])))
    text = "".join(parse(write_report(folder)).text)
    assert "95% interval" not in text and "no intervals of the differences: b evaluation 1 answered other" in text


def test_nothing_to_report(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("train: {}\n")
    with pytest.raises(ReportError, match=f"nothing to report in {tmp_path}"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="is not a folder"):
        write_report(tmp_path / "missing")
    assert not (tmp_path / "report.html").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", "--help"]) == 0
    assert "run_dir" in capsys.readouterr().out
    assert cli_main(["report", f"--run_dir={tmp_path}"]) == 2
    assert "nothing to report" in capsys.readouterr().err
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}])
    assert cli_main(["report", str(tmp_path)]) == 0  # the folder as a bare argument
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report" / "loss.png").is_file()


# ----------------------------------------------------------------------------- pure pieces


def test_highlight_hand_worked() -> None:
    """Hallucinated: blue square, red circle. "no red circle" is negated (not marked); "Blue
    Squares" and "red disc" are their phrases (marked, as written); "green triangle" is not
    hallucinated. Without a vocabulary only the names themselves (plural allowed) are found."""
    vocab = ObjectVocabulary(VOCAB)
    text = "No red circle here, but two Blue Squares & a red disc <b>."
    assert highlight(text, ["blue square", "red circle"], vocab) == (
        "No red circle here, but two <mark>Blue Squares</mark> &amp; a <mark>red disc</mark> &lt;b&gt;."
    )
    assert highlight(text, ["blue square", "red circle"], None) == (
        "No <mark>red circle</mark> here, but two <mark>Blue Squares</mark> &amp; a red disc &lt;b&gt;."
    )
    assert highlight("A green triangle.", [], vocab) == "A green triangle."


def test_metric_series_and_charts() -> None:
    """NaN, None, strings and records without a step are dropped; keys go to their charts."""
    records = [
        {"step": 1, "train/loss": 1.0, "kl/seq": float("nan"), "note": "x", "time": 5.0},
        {"train/loss": 3.0},
        {"step": 2, "train/loss": None, "kl/seq": 0.5, "ok": True},
    ]
    assert metric_series(records) == {"train/loss": ([1.0], [1.0]), "kl/seq": ([2.0], [0.5])}
    keys = [
        "train/loss",
        "eval/loss",
        "rewards/margin",
        "rewards/accuracy",
        "eval/rewards/accuracy",
        "kl/ref",
        "rewards/fmt/mean",
        "rewards/fmt/std",
        "rewards/group_std",
        "perf/tokens_per_s",
        "perf/step_s",
        "eval/pope/random/f1",
        "eval/task/counting",
        "eval/kl/n",
        "policy/entropy",
        "train/lr",
    ]
    charts = {c.name: {p.title: p.keys for p in c.panels} for c in curve_charts(keys)}
    assert charts == {
        "loss": {"loss": ("eval/loss", "train/loss")},
        "rewards": {
            "preference accuracy": ("eval/rewards/accuracy", "rewards/accuracy"),
            "implicit rewards and margin": ("rewards/margin",),
        },
        "kl": {"KL": ("kl/ref",)},
        "reward-functions": {
            "reward: fmt": ("rewards/fmt/mean",),
            "std of rewards within a group": ("rewards/group_std",),
        },
        "throughput": {"seconds": ("perf/step_s",), "tokens / s": ("perf/tokens_per_s",)},
        "eval": {"POPE f1": ("eval/pope/random/f1",), "task": ("eval/task/counting",)},
        "policy": {"policy/entropy": ("policy/entropy",)},
        "other": {"train/lr": ("train/lr",)},
    }


def test_bar_groups() -> None:
    keys = [
        "task/existence",
        "pope/adversarial/f1",
        "chair/chair_s",
        "eval/chair/chair_i",
        "pope/random/f1",
        "pope/random/yes_ratio",
        "task/counting",
        "compositional/chair/chair_i",
        "kl/seq",
        "kl/n",
        "perf/seconds",
        "seconds",
        "pope/random/precision",
    ]
    groups = [(g.name, g.labels, g.keys) for g in bar_groups(keys)]
    assert groups == [
        ("chair", ("CHAIR_i", "CHAIR_s"), ("eval/chair/chair_i", "chair/chair_s")),
        ("compositional-chair", ("CHAIR_i",), ("compositional/chair/chair_i",)),
        ("pope-f1", ("random", "adversarial"), ("pope/random/f1", "pope/adversarial/f1")),
        ("pope-yes", ("random",), ("pope/random/yes_ratio",)),
        ("tasks", ("counting", "existence"), ("task/counting", "task/existence")),
        ("kl", ("kl/seq",), ("kl/seq",)),
        ("seconds", ("wall time",), ("seconds",)),
    ]
