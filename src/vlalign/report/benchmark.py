"""The report's view of a published benchmark's evaluation (``vlalign eval --bench=pope|chair|amber``).

An ``eval.json`` with a ``benchmark`` key (see :mod:`vlalign.commands.eval`) holds, beside the
metrics and records every evaluation has, what a reader citing the numbers needs:

* :func:`benchmark_about`: the benchmark's name, each input file with its sha256 (the first
  :data:`SHA_SHOWN` hex digits shown, the whole value in the ``title`` attribute) and the run's
  settings (answer rule, prompt, sample, generation);
* :func:`official_tables`: the ``official`` numbers as the benchmark's own script prints them,
  laid out as papers print them: POPE per mode and their average (with the number of answers the
  two answer rules read differently, when both were computed), CHAIR's CHAIR_s / CHAIR_i /
  Recall in its mode, AMBER's description metrics (CHAIR, Cover, Hal, Cog) and its yes/no
  metrics per group. Values are shown as :func:`~vlalign.report.tables.fmt` writes them, the
  exact value in each cell's ``data-value``;
* :func:`stored_intervals`: the paired intervals ``vlalign eval`` computed (``difference_interval``),
  which the headline table shows, so the report prints the numbers that the command printed.

The tables are :func:`~vlalign.report.tables.metrics_table`'s; this module only chooses rows and
columns.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from vlalign.eval.paired import Interval
from vlalign.report.plots import AMBER_GROUPS, as_float
from vlalign.report.tables import about_table, metrics_table

SHA_SHOWN = 12
"""Hex digits of a file's sha256 written in the page (the whole value is in the title attribute)."""

_POPE_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn")
_CHAIR_COLUMNS = {
    "chair_s": "CHAIR_s",
    "chair_i": "CHAIR_i",
    "recall": "Recall",
    "captions": "captions",
    "mentions": "object mentions",
    "hallucinated_mentions": "hallucinated mentions",
    "hallucinated_captions": "captions that hallucinate",
}
_AMBER_GENERATIVE = {
    "chair": "CHAIR",
    "cover": "Cover",
    "hal": "Hal",
    "cog": "Cog",
    "responses": "descriptions",
    "nouns": "nouns",
    "hallucinated_nouns": "hallucinated nouns",
}
_AMBER_DISCRIMINATIVE = {
    "accuracy": "Accuracy",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "questions": "questions",
    "correct": "correct",
}


def stored_intervals(raw: Mapping[str, Any] | None) -> dict[str, Interval]:
    """``difference_interval`` of an ``eval.json`` as :class:`~vlalign.eval.paired.Interval` objects
    (an entry missing a number is left out)."""
    names = [f.name for f in fields(Interval)]
    out: dict[str, Interval] = {}
    for key, value in (raw or {}).items():
        if isinstance(value, Mapping):
            numbers = [as_float(value.get(n)) for n in names]
            if all(v is not None for v in numbers):
                out[str(key)] = Interval(*numbers)  # type: ignore[arg-type]
    return out


def benchmark_about(bench: Mapping[str, Any]) -> str:
    """The benchmark's name, its input files with their sha256, and the settings of the run."""
    files = bench.get("files") if isinstance(bench.get("files"), Mapping) else {}
    rows = "".join(
        f'<tr><th class="about-key"><code>{html.escape(str(path))}</code></th>'
        f'<td><code class="sha256" title="{html.escape(str(digest))}">{html.escape(str(digest)[:SHA_SHOWN])}…</code>'
        "</td></tr>"
        for path, digest in files.items()
    )
    parts = [f'<p>benchmark <b class="benchmark-name">{html.escape(str(bench.get("name") or "?"))}</b></p>']
    if rows:
        parts.append(
            '<table class="about files"><thead><tr><th>input file</th><th>sha256 (hover for all of it)</th></tr>'
            f"</thead><tbody>{rows}</tbody></table>"
        )
    settings = bench.get("settings")
    if isinstance(settings, Mapping) and settings:
        parts.append(f"<h3>Settings</h3>{about_table(settings)}")
    return "".join(parts)


def _runs(model: Mapping[str, Any] | None, baseline: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    runs = {"model": model} if model else {}
    return runs | ({"baseline": baseline} if baseline else {})


def _by_column(rows: Mapping[str, Mapping[str, Any]], columns: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``rows[row][key]`` regrouped as ``{column heading: {row: value}}`` (the shape of metrics_table's columns)."""
    return {head: {row: values.get(key) for row, values in rows.items()} for key, head in columns.items()}


def _pope(run: str, official: Mapping[str, Any]) -> str:
    per_mode = official.get("per_mode") if isinstance(official.get("per_mode"), Mapping) else {}
    rows: dict[str, Mapping[str, Any]] = {m: v for m, v in per_mode.items() if isinstance(v, Mapping)}
    if isinstance(official.get("average"), Mapping):
        rows["Average"] = official["average"]
    columns = {c: c for c in _POPE_COLUMNS}
    disagreements = official.get("disagreements")
    note = ""
    if isinstance(disagreements, Mapping):
        rows = {m: {**v, "disagreements": disagreements.get(m)} for m, v in rows.items()}
        columns["disagreements"] = "read differently by the other rule"
        total = sum(v for v in disagreements.values() if isinstance(v, (int, float)))
        rule = str(official.get("answer_rule"))
        other = {"official": "project", "project": "official"}.get(rule, "other")  # POPE's two answer rules
        note = (
            f'<p class="note disagreements">Answers the {html.escape(rule)} rule and the {other} rule read '
            f"differently: <b>{fmt_count(total)}</b> in all.</p>"
        )
    table = metrics_table(_by_column(rows, columns), keys=list(rows), ordered=True, corner="mode")
    rule = html.escape(str(official.get("answer_rule", "?")))
    return f"<h3>POPE, {html.escape(run)} (answer rule: {rule})</h3>{table}{note}"


def fmt_count(value: float) -> str:
    """A count as a whole number."""
    return f"{value:.0f}"


def _chair(runs: Mapping[str, Mapping[str, Any]]) -> str:
    mode = next((str(o.get("mode")) for o in runs.values() if o.get("mode")), "?")
    table = metrics_table(_by_column(runs, _CHAIR_COLUMNS), keys=list(runs), ordered=True, corner="run")
    return f"<h3>CHAIR on COCO ({html.escape(mode)} mode)</h3>{table}"


def _amber(runs: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    generative = {r: o["generative"] for r, o in runs.items() if isinstance(o.get("generative"), Mapping)}
    if generative:
        table = metrics_table(
            _by_column(generative, _AMBER_GENERATIVE), keys=list(generative), ordered=True, corner="run"
        )
        parts.append(f"<h3>AMBER descriptions (generative)</h3>{table}")
    for run, official in runs.items():
        groups = official.get("discriminative")
        if not isinstance(groups, Mapping):
            continue
        order = sorted(groups, key=lambda g: AMBER_GROUPS.index(g) if g in AMBER_GROUPS else len(AMBER_GROUPS))
        rows = {g: groups[g] for g in order if isinstance(groups[g], Mapping)}
        table = metrics_table(_by_column(rows, _AMBER_DISCRIMINATIVE), keys=list(rows), ordered=True, corner="group")
        rule = html.escape(str(official.get("answer_rule", "?")))
        parts.append(
            f"<h3>AMBER yes/no questions (discriminative), {html.escape(run)} (answer rule: {rule})</h3>{table}"
        )
    return "".join(parts)


def official_tables(name: str, model: Mapping[str, Any] | None, baseline: Mapping[str, Any] | None) -> str:
    """The ``official`` numbers of the model (and the baseline) as the benchmark prints them ('' if none)."""
    runs = _runs(model, baseline)
    if not runs:
        return ""
    intro = (
        "<p class=\"note\">As the benchmark's own script prints them (eval.json's <code>official</code>); "
        "the exact value of each cell is in its <code>data-value</code>.</p>"
    )
    if name.startswith("pope"):
        return intro + "".join(_pope(run, official) for run, official in runs.items())
    if name.startswith("chair"):
        return intro + _chair(runs)
    if name.startswith("amber"):
        return intro + _amber(runs)
    return intro + "".join(f"<h3>{html.escape(run)}</h3>{about_table(o)}" for run, o in runs.items())
