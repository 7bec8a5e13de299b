"""``vlalign report``: a self-contained HTML report (plots and gallery embedded) of a run folder.

:func:`write_report` reads files only (no model, no torch) and handles three kinds of folder:

* **the demo folder** (``demo_summary.json``, written by ``vlalign demo``): the stages' summary
  metrics side by side (table with the last stage's difference from the first and its paired 95%
  interval, grouped bars), each stage's training curves, and a gallery of
  held-out images described by the first and the last evaluated stage;
* **an evaluation folder** (``eval.json`` from ``vlalign eval``): the model beside its baseline
  (table with differences and their intervals, before/after bars, gallery); for a published
  benchmark (``vlalign eval --bench``, :mod:`vlalign.report.benchmark`) also the benchmark's name,
  input files with their sha256 and settings, its own numbers as its script prints them, and a
  gallery of wrong answers;
* **a training run folder** (``metrics.jsonl`` from any recipe, ``config.yaml``, and the
  end-of-run suite's ``suite_eval.json`` when the recipe ran it): training curves (loss; rewards,
  margin and accuracy; KL; reward per function; throughput; evaluation over steps), the last
  logged values, the held-out evaluation, the config.

Everything found is reported and anything missing is skipped (a stage without an evaluation, a
metric logged as NaN, a half-written last line of ``metrics.jsonl``); what was skipped is listed
under *Notes*. A folder with nothing to report raises :class:`ReportError`. The files are read
by :mod:`vlalign.report.read`; this module lays the page out.

The HTML is written to ``RUN_DIR/report.html`` (or ``out``) and every plot also as a PNG file in
the folder beside it named after it (``RUN_DIR/report/``); the page embeds the same bytes as
``data:image/png;base64`` URIs and uses no external CSS or script, so it opens from disk.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from vlalign.errors import UserError
from vlalign.eval.paired import Interval, paired_bootstrap
from vlalign.report.benchmark import benchmark_about, official_tables, stored_intervals
from vlalign.report.gallery import GalleryColumn, changes_html, description_records, wrong_answers_html
from vlalign.report.plots import bar_groups, drawn_and_single, metric_series, plot_bars, plot_curves
from vlalign.report.read import (
    CONFIG_FILE,
    EVAL_FILE,
    METRICS_FILE,
    SUITE_FILE,
    SUMMARY_FILE,
    Evaluation,
    read_demo,
    read_evaluation,
    read_json,
    read_jsonl,
)
from vlalign.report.tables import KL_NOTES, about_table, fmt, headline_keys, headline_table, metrics_table

__all__ = ["ReportError", "fmt", "metrics_table", "write_report"]


class ReportError(UserError):
    """Nothing to report in a folder (the message names the folder and what was looked for)."""


# ----------------------------------------------------------------------------- HTML pieces


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def paired_intervals(a: list[dict[str, Any]], b: list[dict[str, Any]] | None, notes: list[str]) -> dict[str, Interval]:
    """The intervals of ``metric(a) - metric(b)`` from two evaluations' answers ({} and a note when
    they did not answer the same questions; {} when either has no answers)."""
    if not a or not b:
        return {}
    try:
        return paired_bootstrap([a], [b])
    except ValueError as exc:
        notes.append(f"no intervals of the differences: {exc}")
        return {}


def _last_values(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged value of every metric (and the step it was logged at)."""
    out: dict[str, Any] = {}
    for record in records:
        out.update({k: v for k, v in record.items() if k not in ("time", "stage")})
    return out


class _Page:
    """Collects sections and figures; writes each figure as a PNG and embeds the same bytes."""

    def __init__(self, png_dir: Path, html_dir: Path) -> None:
        self.png_dir = png_dir
        self.html_dir = html_dir
        self.sections: list[tuple[str, str, str]] = []  # (anchor, title, body)
        self.figures: list[Path] = []

    def figure(self, name: str, png: bytes, caption: str) -> str:
        path = self.png_dir / f"{_slug(name)}.png"
        n = 2
        while path in self.figures:
            path, n = self.png_dir / f"{_slug(name)}-{n}.png", n + 1
        self.png_dir.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        self.figures.append(path)
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        rel = path.relative_to(self.html_dir).as_posix() if path.is_relative_to(self.html_dir) else str(path)
        link = html.escape(rel)
        return (
            f'<figure><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)} '
            f'(<a href="{link}">PNG</a>)</figcaption></figure>'
        )

    def section(self, anchor: str, title: str, body: str) -> None:
        if body:
            self.sections.append((anchor, title, body))

    def curves(self, prefix: str, records: list[dict[str, Any]], label: str) -> str:
        """The training curves of ``records``; a metric logged at one step only is a number in a
        folded table, not a one-point curve."""
        series = metric_series(records)
        charts, single = drawn_and_single(series)
        parts = []
        for chart in charts:
            png = plot_curves(chart, series, title=f"{label}: {chart.title}")
            parts.append(self.figure(f"{prefix}{chart.name}", png, f"{label}: {chart.title}"))
            if chart.omitted:
                parts.append(f'<p class="note">not drawn: {html.escape(", ".join(chart.omitted))}</p>')
        if single:
            rows = "".join(
                f'<tr><th class="about-key">{html.escape(k)}</th><td class="num">{fmt(series[k][0][0])}</td>'
                f'<td class="num">{fmt(series[k][1][0])}</td></tr>'
                for k in single
            )
            parts.append(
                f"<details><summary>{len(single)} metric(s) logged at one step only (numbers, not curves)"
                f'</summary><table class="about"><thead><tr><th>metric</th><th>step</th><th>value</th></tr></thead>'
                f"<tbody>{rows}</tbody></table></details>"
            )
        return "".join(parts)

    def bars(self, prefix: str, columns: dict[str, dict[str, Any]]) -> str:
        """Bars of the evaluation metrics; a KL below 0 (k1's sampling noise) is written, not drawn."""
        keys = [k for metrics in columns.values() for k in metrics]
        parts = []
        for g in bar_groups(keys):
            kl = g.name.endswith("kl")
            caption = g.title
            if kl:
                notes = [f"{k}: {KL_NOTES[k]}" for k in g.keys if k in KL_NOTES]
                caption += " (" + "; ".join(notes or ["sampled estimates"]) + ")"
            parts.append(self.figure(f"{prefix}{g.name}", plot_bars(g, columns, nonnegative=kl), caption))
        return "".join(parts)


# ----------------------------------------------------------------------------- the three reports


def _metric_tables(
    columns: dict[str, dict[str, Any]], delta: tuple[str, str] | None, intervals: dict[str, Interval]
) -> str:
    """The headline table, then every other metric folded away."""
    keys: list[str] = []
    for metrics in columns.values():
        keys += [k for k in metrics if k not in keys]
    rest = [k for k in keys if k not in set(headline_keys(keys))]
    parts = [headline_table(columns, delta=delta, intervals=intervals)]
    if rest:
        parts.append(
            f"<details><summary>{len(rest)} other metric(s): yes-ratios, precisions, the compositional split, "
            f"counts and timings</summary>{metrics_table(columns, delta=delta, intervals=intervals, keys=rest)}"
            "</details>"
        )
    return "".join(parts)


def _demo_about(root: Path, summary: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The demo's facts: its mode and model (demo_config.json), wall times; not the intervals
    (they are in the tables) nor the stages."""
    config = read_json(root / "demo_config.json", notes) or {}
    about: dict[str, Any] = {k: config[k] for k in ("model", "quick", "seed", "device") if k in config}
    skip = ("stages", "intervals", "video")  # the video task has its own section
    about.update({k: v for k, v in summary.items() if k not in skip and isinstance(v, (str, int, float, bool, dict))})
    return about


def _demo_sections(
    page: _Page, root: Path, summary: dict[str, Any], notes: list[str], data_folders: Mapping[str, Path]
) -> None:
    stages = read_demo(root, summary, notes, data_folders)
    page.section("about", "About this run", about_table(_demo_about(root, summary, notes)))
    video = summary.get("video") or {}
    if video.get("stages"):  # the demo's video stages: another model, its own SFT and GRPO
        by_stage = {"model": video.get("model", "")} | {s["stage"]: s["metrics"] for s in video["stages"]}
        page.section("video", "Video task", about_table(by_stage))
    columns = {s.name: s.summary for s in stages if s.summary}
    names = list(columns)
    delta = (names[-1], names[0]) if len(names) >= 2 else None
    shown = [s for s in stages if s.summary]
    first, last = (shown[0].evaluation, shown[-1].evaluation) if delta else (None, None)
    intervals = paired_intervals(last.records, first.records, notes) if first and last else {}
    page.section(
        "summary", "Summary: the stages side by side", _metric_tables(columns, delta, intervals) if columns else ""
    )
    page.section("evaluation", "Evaluation across stages", page.bars("summary-", columns) if columns else "")
    for stage in stages:
        body = page.curves(f"{_slug(stage.name)}-", stage.records, f"stage {stage.name}")
        if not stage.records:
            notes.append(f"stage {stage.name}: no {METRICS_FILE} in {stage.run_dir or '(no training folder)'}")
        page.section(f"stage-{_slug(stage.name)}", f"Training curves: stage {stage.name}", body)
    evaluated = [s for s in stages if s.evaluation is not None and description_records(s.evaluation.records)]
    picked = [evaluated[0], evaluated[-1]] if len(evaluated) >= 2 else evaluated
    columns_g = [
        GalleryColumn(s.name, s.evaluation.records, s.evaluation.vocabulary, s.evaluation.image_roots)
        for s in picked
        if s.evaluation is not None
    ]
    title = "Gallery: the descriptions that changed, first and last stage" if len(columns_g) > 1 else "Gallery"
    page.section("gallery", title, changes_html(columns_g))


def _eval_sections(page: _Page, evaluation: Evaluation, label: str, notes: list[str]) -> None:
    columns: dict[str, dict[str, Any]] = {}
    if evaluation.baseline_metrics is not None:
        columns["baseline"] = evaluation.baseline_metrics
    columns[label] = evaluation.metrics
    delta = (label, "baseline") if "baseline" in columns else None
    intervals = paired_intervals(evaluation.records, evaluation.baseline_records, notes) if delta else {}
    page.section("summary", f"Evaluation metrics ({evaluation.path.name})", _metric_tables(columns, delta, intervals))
    page.section("evaluation", "Evaluation: before and after" if delta else "Evaluation", page.bars("eval-", columns))
    gallery = []
    if evaluation.baseline_records:
        gallery.append(
            GalleryColumn("baseline", evaluation.baseline_records, evaluation.vocabulary, evaluation.image_roots)
        )
    gallery.append(GalleryColumn(label, evaluation.records, evaluation.vocabulary, evaluation.image_roots))
    title = "Gallery: the descriptions that changed" if len(gallery) > 1 else "Gallery: held-out descriptions"
    page.section("gallery", title, changes_html(gallery))


def _bench_sections(page: _Page, evaluation: Evaluation, notes: list[str]) -> None:
    """A published benchmark's evaluation: what was run on which files, the headline metrics with the
    differences and the intervals ``vlalign eval`` computed, the benchmark's own numbers, bars, the
    wrong answers."""
    bench = evaluation.benchmark or {}
    name = str(bench.get("name") or "benchmark")
    columns: dict[str, dict[str, Any]] = {}
    if evaluation.baseline_metrics is not None:
        columns["baseline"] = evaluation.baseline_metrics
    columns["model"] = evaluation.metrics
    delta = ("model", "baseline") if "baseline" in columns else None
    intervals = stored_intervals(evaluation.difference_interval) if delta else {}
    if delta and not intervals:
        intervals = paired_intervals(evaluation.records, evaluation.baseline_records, notes)
    page.section("benchmark", f"Benchmark: {name}", benchmark_about(bench))
    page.section("summary", f"Evaluation metrics ({evaluation.path.name})", _metric_tables(columns, delta, intervals))
    official = official_tables(name, evaluation.official, evaluation.baseline_official)
    page.section("official", f"{name}: the benchmark's own numbers", official)
    page.section("evaluation", "Evaluation: before and after" if delta else "Evaluation", page.bars("eval-", columns))
    gallery = wrong_answers_html(evaluation.records, evaluation.image_roots, baseline=evaluation.baseline_records)
    page.section("gallery", "Gallery: wrong answers", gallery)


def _run_sections(page: _Page, root: Path, notes: list[str], data_folders: Mapping[str, Path]) -> None:
    """Sections of a plain folder (none if it holds no metrics and no evaluation)."""
    records = read_jsonl(root / METRICS_FILE, notes)
    evaluation = read_evaluation(root / EVAL_FILE, [], notes, data_folders)
    label = "model"
    if evaluation is None:
        evaluation, label = read_evaluation(root / SUITE_FILE, [], notes, data_folders), "end of run"
    if not records and evaluation is None:
        return
    if evaluation is not None and evaluation.benchmark is not None:
        _bench_sections(page, evaluation, notes)
    elif evaluation is not None:
        _eval_sections(page, evaluation, label, notes)
    if records:
        last = _last_values(records)
        page.section("final", "Last logged values", metrics_table({"last": last}))
        page.section("curves", "Training curves", page.curves("", records, root.name))
    config = root / CONFIG_FILE
    if config.is_file():
        page.section(
            "config",
            "Config",
            f"<details><summary>{CONFIG_FILE}</summary><pre>"
            f"{html.escape(config.read_text(errors='replace'))}</pre></details>",
        )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1300px;
padding:0 1em;color:#222}
h1{margin-bottom:.2em} .meta{color:#666;margin-top:0} nav ul{columns:2;padding-left:1.2em}
section{margin-top:2.5em;border-top:1px solid #ddd} figure{margin:1em 0} figure img{max-width:100%}
figcaption{font-size:.85em;color:#555} table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;vertical-align:top} td.num{text-align:right;
font-variant-numeric:tabular-nums} th.metric{text-align:left;font-weight:normal;font-family:monospace;color:#555}
table.headline{font-size:1em} table.headline td.label{max-width:26em} .better{color:#777;font-size:.8em}
table.headline td.label .note{font-size:.75em;color:#777} th.about-key{text-align:left;font-weight:normal}
tr.group th{font-weight:bold} details{margin:1em 0} summary{cursor:pointer;color:#245}
td.delta{color:#555} .gallery td.desc{max-width:420px} .gallery img{width:160px;image-rendering:pixelated}
.gallery .counts,.gallery .objects,.gallery .id{font-size:.8em;color:#555} mark,.marked{background:#ffb3b3;padding:0 .1em}
.note{color:#666;font-size:.85em} .missing{color:#a00} pre{background:#f6f6f6;padding:1em;overflow:auto}
.smoke{background:#fff3cd;border:1px solid #e0c36a;padding:.7em 1em;font-weight:bold}
"""

SMOKE_TEST_NOTE = (
    "Quick demo: a smoke test of the pipeline (a small world, a few training steps per stage). "
    "Its numbers say nothing about alignment; the full demo (vlalign demo) measures that."
)
"""The banner of a quick demo's report (``"quick": true`` in demo_summary.json)."""


def _html(title: str, root: Path, page: _Page, notes: list[str], *, quick: bool = False) -> str:
    banner = f'<p class="smoke" id="smoke-test">{html.escape(SMOKE_TEST_NOTE)}</p>' if quick else ""
    sections = list(page.sections)
    if notes:
        sections.append(("notes", "Notes", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"))
    nav = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{html.escape(t)}</h2>{b}</section>' for a, t, b in sections)
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="meta">folder <code>{html.escape(root.name)}</code> ({html.escape(str(root.resolve()))}) · '
        f"written {when} by vlalign report</p>{banner}<nav><ul>{nav}</ul></nav>{body}</body></html>\n"
    )


def write_report(run_dir: Path, out: Path | None = None, *, data_folders: Mapping[str, Path] | None = None) -> Path:
    """Write the HTML report of ``run_dir`` (a demo, evaluation or training run folder) to ``out``
    (default ``run_dir/report.html``) and its plots as PNG files in the folder named after it;
    returns the HTML file's path. Raises :class:`ReportError` if there is nothing to report.

    ``data_folders`` maps the named data sources an evaluation may name instead of a path to their
    folders (``{"shapes:": <the embedded world's folder>}``), where the gallery finds the images
    and the object vocabulary; report/ reads files and knows no data source itself."""
    data_folders = data_folders or {}
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(
            f"vlalign report: {root} is not a folder; give a run folder, an eval folder or the demo folder"
        )
    out = Path(out) if out is not None else root / "report.html"
    page = _Page(out.parent / out.stem, out.parent)
    notes: list[str] = []
    summary = read_json(root / SUMMARY_FILE, notes)
    quick = False
    if summary is not None:
        _demo_sections(page, root, summary, notes, data_folders)
        quick = bool(summary.get("quick") or (read_json(root / "demo_config.json", []) or {}).get("quick"))
        title = f"vlalign {'quick ' if quick else ''}demo report: {root.name}"
    else:
        _run_sections(page, root, notes, data_folders)
        title = f"vlalign report: {root.name}"
    if not page.sections:
        found = "; ".join(notes) if notes else "none of these files is there"
        raise ReportError(
            f"vlalign report: nothing to report in {root}: looked for {SUMMARY_FILE} (the demo folder), "
            f"{EVAL_FILE} (vlalign eval), {METRICS_FILE} or {SUITE_FILE} (a training run) ({found}); "
            "point it at a folder that one of vlalign's commands wrote"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_html(title, root, page, notes, quick=quick), encoding="utf-8")
    return out
