"""The tables of ``vlalign report``: the headline metrics, the rest (folded away), "About this run".

A run's evaluation writes some sixty numbers; a person reading the report wants the few that say
whether alignment worked, with their uncertainty:

* :func:`headline_keys` picks them: CHAIR_i, CHAIR_s and object recall, POPE F1 per negative
  sampling (and its mean over the modes), AMBER's CHAIR, Cover, Hal, Cog and F1 per yes/no
  group, the task accuracies, the KL from the reference and a win rate, whatever prefix they
  carry (``eval/``, ``suite/``); the compositional split, yes-ratios, precisions, counts and
  timings are not headline metrics;
* :func:`headline_table` shows each with a readable name, its direction (lower or higher is
  better), the stages or models side by side, the difference of the last from the first and its
  paired 95% interval; a KL row says which estimator it is (k1 can come out negative on a sample);
* :func:`metrics_table` shows any set of metrics (the report folds the rest of them away in a
  ``<details>``); counts and timings (:func:`is_count_or_timing`) get no difference column entry;
* :func:`about_table` lays out a run's other facts (wall times, the mode, the model) as rows,
  numbers to 4 significant digits and nested objects as indented sub-rows.

Every cell of a metric holds its exact value in ``data-value`` and :func:`fmt`'s text.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from vlalign.eval.paired import Interval
from vlalign.report.plots import as_float, bar_groups, bar_slot

HEADLINE_GROUPS = ("chair", "pope-f1", "amber-generative", "amber-f1", "tasks", "kl", "win-rate")
"""Bar groups (:func:`~vlalign.report.plots.bar_groups`) whose metrics head the report."""

KL_NOTES = {
    "kl/seq": "k1 = log π − log π_ref summed over each sampled completion, averaged: unbiased, "
    "but it can come out negative on a small sample (read a small negative value as about 0)",
    "kl/token_k3": "k3 = exp(−d) + d − 1 per token, averaged: never negative, slightly biased",
}
"""What each KL estimator of the evaluation suite is (see vlalign.eval.policy)."""

_DIRECTION = {
    "chair": "lower is better",
    "pope-f1": "higher is better",
    "amber-f1": "higher is better",
    "tasks": "higher is better",
    "win-rate": "higher is better",
    "kl": "smaller: closer to the reference",
}
_CHAIR_NAMES = {"CHAIR_i": "CHAIR_i (hallucinated object mentions)", "CHAIR_s": "CHAIR_s (captions that hallucinate)"}
_AMBER_NAMES = {
    "CHAIR": ("AMBER CHAIR (hallucinated nouns)", "lower is better"),
    "Cover": ("AMBER Cover (annotated objects mentioned)", "higher is better"),
    "Hal": ("AMBER Hal (descriptions that hallucinate)", "lower is better"),
    "Cog": ("AMBER Cog (mentions of the likely hallucinations)", "lower is better"),
}


def fmt(value: Any) -> str:
    """A table cell's text: numbers to 4 significant digits (integers above 1000 whole)."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None:
        return "–" if value is None else str(value)
    if number != number:
        return "nan"
    if abs(number) >= 1000 and abs(number) != float("inf"):
        return f"{number:.0f}"
    return f"{number:.4g}"


def is_count_or_timing(key: str) -> bool:
    """Sample counts (``.../n``, ``..._n``), wall times (``seconds...``, ``perf/...``) and throughputs."""
    parts = key.lower().split("/")
    return (
        parts[-1] == "n"
        or parts[-1].endswith("_n")
        or parts[0] in ("perf", "seconds")
        or "seconds" in parts[-1]
        or parts[-1].endswith("_per_s")
        or parts[-1] in ("wall_s", "time_s", "step_s", "wall_time")
    )


def headline_keys(keys: list[str]) -> list[str]:
    """The headline metrics among ``keys``, in the bars' order (CHAIR, POPE F1, tasks, KL, win rate)."""
    return [k for g in bar_groups(keys) if g.name in HEADLINE_GROUPS for k in g.keys]


def metric_order(keys: list[str]) -> list[str]:
    """The headline metrics first (those drawn as bars, in the bars' order), then the rest by name
    with the compositional split, then counts and timings, last."""
    headline = [k for g in bar_groups(keys) if not g.name.endswith("seconds") for k in g.keys]
    headline.sort(key=lambda k: "compositional/" in k)  # stable: the bars' order within each split
    rest = sorted(set(keys) - set(headline), key=lambda k: (is_count_or_timing(k), "compositional/" in k, k))
    return headline + rest


def _label(key: str) -> tuple[str, str]:
    """(readable name, which direction is better, in words) of a headline metric."""
    group, label, _ = bar_slot(key.lower()) or ("", key, 0)
    if group == "chair":
        name = _CHAIR_NAMES.get(label, f"object {label}" if label == "recall" else label)
        return name, _DIRECTION["tasks" if label == "recall" else "chair"]
    if group == "pope-f1":
        what = "the mean over the modes" if label == "average" else f"{label} negatives"
        return f"POPE F1, {what}", _DIRECTION[group]
    if group == "amber-generative":
        return _AMBER_NAMES.get(label, (label, ""))
    if group == "amber-f1":
        return f"AMBER F1, {'every yes/no question' if label == 'all' else label + ' questions'}", _DIRECTION[group]
    if group == "tasks":
        return f"{label} accuracy", _DIRECTION[group]
    if group == "kl":
        estimator = {"kl/seq": ", per completion (k1)", "kl/token_k3": ", per token (k3)"}.get(label, "")
        return f"KL from the reference{estimator}", _DIRECTION["kl"]
    return label, _DIRECTION.get(group, "")


def _kl_note(key: str, values: list[float | None]) -> str:
    body = key
    for prefix in ("eval/", "suite/", "metrics/"):
        body = body.removeprefix(prefix)
    note = KL_NOTES.get(body, "an estimate from sampled completions")
    if any(v is not None and v < 0 for v in values):
        note += "; a negative value here is that sampling noise, not a negative divergence"
    return note


def _value_cells(key: str, columns: Mapping[str, Mapping[str, Any]]) -> list[str]:
    cells = []
    for name, metrics in columns.items():
        value = metrics.get(key)
        attr = f' data-value="{html.escape(repr(float(value)))}"' if as_float(value) is not None else ""
        cells.append(f'<td class="num" data-column="{html.escape(name)}"{attr}>{html.escape(fmt(value))}</td>')
    return cells


def _delta_cells(
    key: str,
    columns: Mapping[str, Mapping[str, Any]],
    delta: tuple[str, str] | None,
    intervals: Mapping[str, Interval] | None,
) -> list[str]:
    cells = []
    if delta:
        a, b = as_float(columns[delta[0]].get(key)), as_float(columns[delta[1]].get(key))
        shown = a is not None and b is not None and not is_count_or_timing(key)
        cells.append(f'<td class="num delta">{fmt(a - b) if shown else "–"}</td>')  # type: ignore[operator]
    if delta and intervals:
        iv = intervals.get(key)
        span = f"[{fmt(iv.low)}, {fmt(iv.high)}]" if iv is not None else "–"
        cells.append(f'<td class="num interval">{span}</td>')
    return cells


def _head(columns: Mapping[str, Any], delta: tuple[str, str] | None, intervals: Mapping[str, Interval] | None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    if delta:
        head += f"<th>{html.escape(delta[0])} − {html.escape(delta[1])}</th>"
    if delta and intervals:
        head += "<th>95% interval (paired, scenes drawn)</th>"
    return head


def metrics_table(
    columns: dict[str, dict[str, Any]],
    *,
    delta: tuple[str, str] | None = None,
    intervals: dict[str, Interval] | None = None,
    keys: list[str] | None = None,
    ordered: bool = False,
    corner: str = "metric",
) -> str:
    """Rows = metric names (``keys``, default every one of the columns'), columns = models or stages;
    each cell's exact value is in ``data-value``. The rows come in :func:`metric_order`, or as
    ``keys`` gives them with ``ordered``; ``corner`` heads the row names' column. ``delta=(a, b)``
    adds a column ``a - b`` (left empty for counts and timings); ``intervals`` (of that difference,
    from :func:`~vlalign.eval.paired.paired_bootstrap`) a column with each one's 95% interval."""
    if keys is None:
        keys = []
        for metrics in columns.values():
            keys += [k for k in metrics if k not in keys]
    rows = []
    for key in keys if ordered else metric_order(keys):
        cells = _value_cells(key, columns) + _delta_cells(key, columns, delta, intervals)
        rows.append(f'<tr><th class="metric">{html.escape(key)}</th>{"".join(cells)}</tr>')
    return (
        f'<table class="metrics"><thead><tr><th>{html.escape(corner)}</th>{_head(columns, delta, intervals)}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def headline_table(
    columns: dict[str, dict[str, Any]],
    *,
    delta: tuple[str, str] | None = None,
    intervals: dict[str, Interval] | None = None,
) -> str:
    """The headline metrics (:func:`headline_keys`) of ``columns``: a readable name and the direction
    that is better, the metric's key, its values, the difference and its interval ('' if none)."""
    keys: list[str] = []
    for metrics in columns.values():
        keys += [k for k in metrics if k not in keys]
    rows = []
    for key in headline_keys(keys):
        name, better = _label(key)
        note = ""
        if (bar_slot(key.lower()) or ("",))[0] == "kl":
            values = [as_float(m.get(key)) for m in columns.values()]
            note = f'<div class="note">{html.escape(_kl_note(key, values))}</div>'
        cells = _value_cells(key, columns) + _delta_cells(key, columns, delta, intervals)
        rows.append(
            f'<tr><td class="label">{html.escape(name)} <span class="better">{html.escape(better)}</span>{note}'
            f'</td><th class="metric">{html.escape(key)}</th>{"".join(cells)}</tr>'
        )
    if not rows:
        return ""
    return (
        f'<table class="metrics headline"><thead><tr><th>what</th><th>metric</th>{_head(columns, delta, intervals)}'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _about_rows(key: str, value: Any, depth: int) -> list[str]:
    pad = f' style="padding-left:{0.6 + 1.4 * depth:.1f}em"' if depth else ""
    name = f'<th class="about-key"{pad}>{html.escape(str(key))}</th>'
    if isinstance(value, Mapping):
        rows = [f'<tr class="group">{name}<td></td></tr>']
        for k, v in value.items():
            rows += _about_rows(k, v, depth + 1)
        return rows
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(fmt(v) for v in value)
    else:
        text = fmt(value)
    return [f'<tr>{name}<td class="num">{html.escape(text)}</td></tr>']


def about_table(items: Mapping[str, Any]) -> str:
    """``items`` as a two-column table: numbers to 4 significant digits, booleans as yes / no,
    nested objects as indented sub-rows ('' when there are none)."""
    rows = [row for key, value in items.items() for row in _about_rows(key, value, 0)]
    return f'<table class="about"><tbody>{"".join(rows)}</tbody></table>' if rows else ""
