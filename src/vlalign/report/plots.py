"""Plots of ``vlalign report``: training curves and before/after bars, as PNG bytes (matplotlib, Agg).

Two kinds of figure, each described first as plain data and then drawn:

* **curves** of a run's ``metrics.jsonl``: :func:`metric_series` turns the logged records into
  ``key -> (steps, values)`` (finite numbers only, so a NaN or a missing key leaves a gap instead
  of a crash); :func:`curve_charts` sorts the keys into charts (loss; preference rewards, margin
  and accuracy; KL; reward per reward function; throughput; evaluation over steps; policy
  statistics; anything else), each made of panels of keys that share an axis;
* **bars** of evaluation metrics side by side (a baseline and a model, or the stages of the
  demo): :func:`bar_groups` sorts metric names into groups (CHAIR, POPE F1 and yes-ratio per
  negative-sampling mode, task accuracy, KL, wall time), whatever prefix they carry
  (``eval/``, ``suite/``) and with the compositional split apart.

Drawing functions return the PNG file's bytes; the report writes them to disk and embeds the
very same bytes in the HTML.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only (set before pyplot is imported)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 90
SKIPPED_KEYS = frozenset({"step", "time", "stage", "epoch"})
MAX_OTHER_PANELS = 16
POPE_MODE_ORDER = ("random", "popular", "adversarial")

Series = dict[str, tuple[list[float], list[float]]]
"""Metric key -> (steps, values), finite values only, in logged order."""


def as_float(value: Any) -> float | None:
    """A finite float, or None for anything else (None, NaN, inf, strings, booleans, lists)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_series(records: Iterable[Mapping[str, Any]]) -> Series:
    """``key -> (steps, values)`` from metrics.jsonl records; records without a numeric ``step``,
    and values that are not finite numbers, are left out."""
    out: Series = {}
    for record in records:
        step = as_float(record.get("step"))
        if step is None:
            continue
        for key, raw in record.items():
            value = as_float(raw)
            if key in SKIPPED_KEYS or value is None:
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(step)
            values.append(value)
    return out


# ----------------------------------------------------------------------------- sorting curves


@dataclass(frozen=True)
class Panel:
    """One axis: keys plotted together (they share a unit)."""

    title: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class CurveChart:
    """One figure of training curves: a grid of panels."""

    name: str
    """File stem (``loss``, ``rewards``, ...)."""
    title: str
    panels: tuple[Panel, ...]
    omitted: tuple[str, ...] = ()
    """Keys left out to keep the figure readable (listed under it)."""


def _is_reward_function(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "rewards" and parts[2] in ("mean", "std")


def _loss_panel(key: str) -> str | None:
    if key in ("train/loss", "eval/loss"):
        return "loss"
    if key == "value/loss":
        return "value loss"
    if key.startswith("loss/"):
        return "loss terms"
    return None


def _reward_panel(key: str) -> str | None:
    body = key.removeprefix("eval/")
    if not body.startswith("rewards/") or body.count("/") != 1 or key == "rewards/group_std":
        return None
    return "preference accuracy" if "accuracy" in body else "implicit rewards and margin"


def _reward_fn_panel(key: str) -> str | None:
    if key == "rewards/group_std":
        return "std of rewards within a group"
    if _is_reward_function(key) and key.endswith("/mean"):
        return f"reward: {key.split('/')[1]}"
    return None


def _kl_panel(key: str) -> str | None:
    body = key.removeprefix("eval/")
    if key == "kl/coef":
        return "KL coefficient"
    if (body.startswith("kl/") or body == "kl" or key == "policy/approx_kl") and not body.endswith(("/n", "_n")):
        return "KL"
    return None


def _perf_panel(key: str) -> str | None:
    if not key.startswith("perf/"):
        return None
    body = key[len("perf/") :]
    if body.endswith("tokens_per_s"):
        return "tokens / s"
    if body.endswith("samples_per_s"):
        return "samples / s"
    if body.endswith("_s"):
        return "seconds"
    if "mem" in body:
        return "peak memory (MB)"
    return body


def _eval_panel(key: str) -> str | None:
    if not key.startswith("eval/") or key.endswith(("/n", "_n")):
        return None
    parts = key.split("/")[1:]
    if parts[0] == "pope" and len(parts) == 3:
        return f"POPE {parts[2]}"
    if len(parts) == 1:
        return "evaluation"
    return " ".join(parts[:-1])


def _policy_panel(key: str) -> str | None:
    return key if key.startswith("policy/") else None


CHART_RULES: tuple[tuple[str, str, Callable[[str], str | None]], ...] = (
    ("loss", "Loss", _loss_panel),
    ("rewards", "Implicit rewards, margin and accuracy", _reward_panel),
    ("kl", "KL divergence", _kl_panel),
    ("reward-functions", "Reward per reward function (mean, band: ± std)", _reward_fn_panel),
    ("throughput", "Throughput", _perf_panel),
    ("eval", "Evaluation over steps", _eval_panel),
    ("policy", "Policy statistics", _policy_panel),
)
"""(file stem, title, key -> panel title or None); a key goes to the first chart that takes it."""


def curve_charts(keys: Iterable[str]) -> list[CurveChart]:
    """Sort metric keys into charts (see :data:`CHART_RULES`); leftovers (except reward std's,
    drawn as bands) go to one "other" chart with a panel per key. Charts without keys are left out."""
    remaining = sorted(set(keys) - SKIPPED_KEYS)
    charts: list[CurveChart] = []
    for name, title, rule in CHART_RULES:
        panels: dict[str, list[str]] = {}
        for key in remaining:
            panel = rule(key)
            if panel is not None:
                panels.setdefault(panel, []).append(key)
        taken = {k for ks in panels.values() for k in ks}
        remaining = [k for k in remaining if k not in taken]
        if panels:
            charts.append(CurveChart(name, title, tuple(Panel(t, tuple(ks)) for t, ks in panels.items())))
    other = [k for k in remaining if not (_is_reward_function(k) and k.endswith("/std")) and not k.endswith("/n")]
    if other:
        shown, omitted = other[:MAX_OTHER_PANELS], other[MAX_OTHER_PANELS:]
        charts.append(CurveChart("other", "Other logged metrics", tuple(Panel(k, (k,)) for k in shown), tuple(omitted)))
    return charts


def drawn_and_single(series: Series) -> tuple[list[CurveChart], list[str]]:
    """The charts worth drawing and the keys better shown as numbers.

    A metric logged at one step only is no curve: it is drawn only in a panel beside a metric
    logged at several steps (the end-of-run ``eval/loss`` beside the training loss); otherwise
    it is returned in the second list (sorted), to be shown as a value. A chart left without
    panels is not drawn at all."""
    many = {k for k, (steps, _) in series.items() if len(steps) > 1}
    drawn: set[str] = set()
    for chart in curve_charts(series):
        for panel in chart.panels:
            if many & set(panel.keys):
                drawn |= set(panel.keys)
    drawn |= {k for k in many if _is_reward_function(k) and k.endswith("/std")}  # bands of drawn means
    single = sorted(k for k in series if k not in drawn and k not in SKIPPED_KEYS)
    single = [k for k in single if not (_is_reward_function(k) and k.endswith("/std") and k[:-4] + "/mean" in drawn)]
    return curve_charts(drawn), single


# ----------------------------------------------------------------------------- drawing


def _grid(n: int, *, width: float = 4.2, height: float = 2.9) -> tuple[Any, list[Any]]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.5), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def plot_curves(chart: CurveChart, series: Series, *, title: str | None = None) -> bytes:
    """The chart's panels as one PNG; a reward function's ``/std`` draws a band around its mean."""
    fig, axes = _grid(len(chart.panels))
    for ax, panel in zip(axes, chart.panels):
        for key in panel.keys:
            steps, values = series.get(key, ([], []))
            if not steps:
                continue
            marker = "o" if len(steps) <= 25 else None
            style = "--" if key.startswith("eval/") and chart.name != "eval" else "-"
            (line,) = ax.plot(steps, values, style, marker=marker, markersize=3, linewidth=1.4, label=key)
            std_key = key[: -len("/mean")] + "/std" if _is_reward_function(key) else None
            if std_key and std_key in series:
                _band(ax, series[key], series[std_key], line.get_color())
        steps_here = {s for key in panel.keys for s in series.get(key, ([], []))[0]}
        if len(steps_here) == 1:  # one point: whole steps around it
            (only,) = steps_here
            ax.set_xlim(only - 1, only + 1)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(panel.keys) > 1 or panel.title != panel.keys[0]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title or chart.title, fontsize=11)
    return _png(fig)


def _band(ax: Any, mean: tuple[list[float], list[float]], std: tuple[list[float], list[float]], colour: str) -> None:
    by_step = dict(zip(*std))
    pts = [(s, m, by_step[s]) for s, m in zip(*mean) if s in by_step]
    if pts:
        xs, ms, ss = zip(*pts)
        ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], color=colour, alpha=0.15)


# ----------------------------------------------------------------------------- bars


@dataclass(frozen=True)
class BarGroup:
    """Metrics drawn as one bar chart: a cluster per label, a bar per column (model, stage)."""

    name: str
    title: str
    labels: tuple[str, ...]
    keys: tuple[str, ...]
    """``keys[i]`` is the metric name shown as ``labels[i]``."""


_GROUP_TITLES = {
    "chair": "CHAIR (lower is better) and object recall",
    "pope-f1": "POPE F1 per negative sampling (higher is better)",
    "pope-yes": "POPE yes-ratio per negative sampling (0.5 is balanced)",
    "amber-generative": "AMBER descriptions: CHAIR and Hal (lower is better), Cover and Cog",
    "amber-f1": "AMBER yes/no questions: F1 per group, 'No' the positive class (higher is better)",
    "tasks": "Task accuracy (higher is better)",
    "kl": "KL from the reference",
    "win-rate": "Win rate over the baseline",
    "seconds": "Wall time (s)",
}
_TASKS = ("counting", "colour", "color", "existence")
_CHAIR_LABELS = {"chair_i": ("CHAIR_i", 0), "chair_s": ("CHAIR_s", 1), "recall": ("recall", 2)}
AMBER_GENERATIVE = ("chair", "cover", "hal", "cog")
"""AMBER's description metrics (``amber/generative/<name>``), in the order its script prints them."""
AMBER_GROUPS = ("discriminative", "existence", "attribute", "state", "number", "action", "relation")
"""AMBER's yes/no groups (``amber/<group>/<metric>``): all of them, then each dimension."""


def _amber_slot(parts: list[str]) -> tuple[str, str, int] | None:
    """AMBER's bars: its four description metrics, and the F1 of each yes/no group."""
    if len(parts) != 3:
        return None
    if parts[1] == "generative" and parts[2] in AMBER_GENERATIVE:
        return (
            "amber-generative",
            parts[2].capitalize() if parts[2] != "chair" else "CHAIR",
            AMBER_GENERATIVE.index(parts[2]),
        )
    if parts[1] in AMBER_GROUPS and parts[2] == "f1":
        return "amber-f1", "all" if parts[1] == "discriminative" else parts[1], AMBER_GROUPS.index(parts[1])
    return None


def bar_slot(key: str) -> tuple[str, str, int] | None:
    """(group, label, order) of a lower-cased metric name, or None if it is not drawn as a bar."""
    k = key.lower()
    for prefix in ("eval/", "suite/", "metrics/"):
        k = k.removeprefix(prefix)
    parts = k.split("/")
    last = parts[-1]
    if last == "n" or last.endswith("_n"):  # sample counts
        return None
    if parts[0] == "seconds" or k in ("seconds", "wall_s", "wall_time", "time_s"):
        return "seconds", parts[-1] if len(parts) > 1 else "wall time", 0
    if parts[0] == "amber":
        return _amber_slot(parts)
    if last in ("chair_i", "chair_s") or (parts[0] == "chair" and last == "recall"):
        label, order = _CHAIR_LABELS[last]
        return "chair", label, order
    modes = (*POPE_MODE_ORDER, "average")  # average: the mean over the modes (a published benchmark's)
    mode = next((m for m in modes if m in parts or f"pope_{m}" in parts), None)
    if "pope" in k and mode is not None and last in ("f1", "yes_ratio"):
        return ("pope-f1" if last == "f1" else "pope-yes"), mode, modes.index(mode)
    task = next((t for t in _TASKS if t in parts or last.startswith(t)), None)
    if task is not None and (parts[0] == "task" or "acc" in last):
        return "tasks", task, _TASKS.index(task)
    if parts[0] == "task" and len(parts) == 2:
        return "tasks", last, len(_TASKS)
    if (parts[0] == "kl" and len(parts) > 1) or k in ("kl", "kl_from_base"):
        return "kl", k, 0
    if k == "win_rate":
        return "win-rate", "win rate", 0
    return None


def bar_groups(keys: Iterable[str]) -> list[BarGroup]:
    """Sort metric names into bar groups (see the module doc); the compositional split's metrics
    form groups of their own. Groups come in a fixed order; labels in a natural one."""
    slots: dict[str, list[tuple[int, str, str]]] = {}
    for key in dict.fromkeys(keys):
        comp = "compositional/" in key.lower()
        slot = bar_slot(key.lower().replace("compositional/", ""))
        if slot is None:
            continue
        group, label, order = slot
        slots.setdefault(("compositional-" if comp else "") + group, []).append((order, label, key))
    out = []
    for base in _GROUP_TITLES:
        for comp in (False, True):
            name = ("compositional-" if comp else "") + base
            if name not in slots:
                continue
            rows = sorted(slots[name], key=lambda r: (r[0], r[1]))
            seen: dict[str, str] = {}
            for _, label, key in rows:
                seen.setdefault(label, key)  # first name wins if two spellings give one label
            title = ("Compositional split: " if comp else "") + _GROUP_TITLES[base]
            out.append(BarGroup(name, title, tuple(seen), tuple(seen.values())))
    return out


def bar_heights(values: list[float | None], *, nonnegative: bool = False) -> list[float]:
    """The bars' heights: 0 for a missing value, and with ``nonnegative`` for a negative one."""
    return [0.0 if v is None or (nonnegative and v < 0) else v for v in values]


def plot_bars(
    group: BarGroup, columns: Mapping[str, Mapping[str, Any]], *, title: str | None = None, nonnegative: bool = False
) -> bytes:
    """One cluster per label, one bar per column (``columns[name][key]``), values written on the
    bars; a missing or non-finite value leaves its bar out and writes ``n/a``. ``nonnegative``
    (a quantity that cannot be below 0, such as a KL divergence, whose sampled estimate can):
    a negative value draws no bar, only its number at 0, marked ``(< 0: noise)``."""
    names = list(columns)
    n = max(len(names), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(group.labels) * (1 + 0.35 * n)), 3.4))
    top = 0.0
    for j, name in enumerate(names):
        values = [as_float(columns[name].get(key)) for key in group.keys]
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(group.keys))]
        heights = bar_heights(values, nonnegative=nonnegative)
        bars = ax.bar(xs, heights, width * 0.95, label=name)
        for bar, value in zip(bars, values):
            text = "n/a" if value is None else f"{value:.3g}"
            text += " (< 0: noise)" if nonnegative and value is not None and value < 0 else ""
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
        top = max([top, *(v for v in values if v is not None)])
    ax.set_xticks(range(len(group.labels)), group.labels, fontsize=9)
    ax.set_ylim(0.0 if nonnegative else min(0.0, ax.get_ylim()[0]), top * 1.18 if top > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or group.title, fontsize=10)
    return _png(fig)
