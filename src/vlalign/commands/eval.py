"""``vlalign eval``: run the evaluation suite on a model (and a baseline, side by side).

Prints one table (the model, the baseline and their difference) and writes ``eval.json`` in
``output_dir``: both models' metrics, the differences, the suite's settings and every answer given
(``records``, for reports and galleries). With a baseline, the model's KL from the baseline and
its win rate over the baseline's descriptions (under ``scorer``) are measured too, and each
difference gets a 95% paired-bootstrap interval over the scenes (``difference_interval``; see
:mod:`vlalign.eval.paired`; ``vlalign compare`` does the same for evaluations already written);
with a ``reference`` instead, only the KL from it (the reference itself is not evaluated).

Examples::

    vlalign eval --model=runs/dpo/model --baseline=runs/sft/model
    vlalign eval --model=runs/sft/model --suite.data=data/shapes --suite.pope_questions=0   # every POPE question
    vlalign eval --model=my-model --suite.data=my_eval.jsonl --suite.vocabulary=objects.json \\
                 --suite.pope='{random: pope_random.jsonl, adversarial: pope_adv.jsonl}'
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import vlalign.shapes  # noqa: F401  (plugs the embedded default in: the shapes: data and the tiny models' corpus)
from vlalign.config import to_dict
from vlalign.eval.paired import Interval, paired_bootstrap
from vlalign.eval.scorers import build_scorer
from vlalign.eval.suite import EvalResult, SuiteConfig, build_suite, compare, evaluate
from vlalign.models.load import load_model_and_processor, same_tokenizer
from vlalign.models.tiny import resolve_model


@dataclass
class Config:
    """Evaluate a model, optionally beside a baseline."""

    model: str = ""
    """The model to evaluate: a folder, a hub name or tiny:<arch>:<size> (required)."""
    baseline: str = ""
    """A second model shown beside it ('' for none); also the reference of the KL and the win rate."""
    reference: str = ""
    """A model for the KL only, not evaluated itself ('' for none; the baseline, when given, is the reference)."""
    output_dir: str = "runs/eval"
    """Where eval.json is written."""
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    """Which prompts, and how many."""
    scorer: str = "claims"
    """Scorer of the win rate over the baseline: claims, ground_truth, a reward model folder (vlalign rm's
    <run>/model), or file.py:name / module:name of a scorer."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda ..."""
    dtype: str = "auto"
    """Weights dtype (auto: bf16 on capable GPUs, else float32)."""
    progress: bool = True
    """Show progress bars."""


def _load(name: str, cfg: Config) -> tuple[Any, Any]:
    return load_model_and_processor(resolve_model(name), dtype=cfg.dtype, device=cfg.device)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.0f}" if abs(value) >= 1000 or float(value).is_integer() and abs(value) >= 10 else f"{value:.3f}"


def format_table(
    columns: dict[str, dict[str, float]],
    *,
    difference: bool = True,
    intervals: dict[str, Interval] | None = None,
    level: float = 0.95,
) -> str:
    """A text table: one row per metric, one column per model (and ``A - B`` for two models).

    ``intervals`` (from :func:`~vlalign.eval.paired.paired_bootstrap`) add a column with each
    difference's ``level`` interval, marked ``*`` where it excludes zero.
    """
    names = list(columns)
    keys: list[str] = []
    for metrics in columns.values():
        keys += [k for k in metrics if k not in keys]
    keys = sorted(keys, key=lambda k: (k.startswith("perf/"), k.startswith("compositional/"), k))
    two = difference and len(names) == 2
    header = (
        ["metric", *names] + (["difference"] if two else []) + ([f"{level:.0%} interval"] if two and intervals else [])
    )
    rows = [header]
    for key in keys:
        values = [columns[n].get(key) for n in names]
        row = [key, *(_fmt(v) for v in values)]
        if two:
            a, b = values
            row.append(_fmt(a - b) if a is not None and b is not None else "-")
        if two and intervals:
            iv = intervals.get(key)
            row.append(f"{iv.text(with_difference=False)}{'*' if iv.excludes_zero else ' '}" if iv is not None else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(cfg: Config) -> dict[str, Any]:
    """Evaluate, print the table, write eval.json; returns what eval.json holds."""
    if not cfg.model:
        raise SystemExit("vlalign eval: --model is required (a model folder, hub name or tiny:<arch>:<size>)")
    if cfg.reference and cfg.baseline:
        raise SystemExit(
            "vlalign eval: give --baseline (evaluated, and the KL reference) or --reference (KL only), not both"
        )
    suite = build_suite(cfg.suite)
    print(f"suite {suite.name}: {len(suite)} questions")
    model, processor = _load(cfg.model, cfg)
    base: EvalResult | None = None
    base_model = None
    scorer = None
    if cfg.baseline:
        scorer = build_scorer(cfg.scorer, suite.vocabulary)
        base_model, base_processor = _load(cfg.baseline, cfg)
        base = evaluate(base_model, base_processor, suite, progress=cfg.progress)
    if cfg.reference:
        base_model, base_processor = _load(cfg.reference, cfg)
    reference = base_model if base_model is not None and same_tokenizer(processor, base_processor) else None
    if base_model is not None and reference is None:
        print(f"the {'baseline' if cfg.baseline else 'reference'} has another tokenizer: no KL from it")
    result = evaluate(model, processor, suite, reference=reference, baseline=base, scorer=scorer, progress=cfg.progress)
    columns = {"model": result.metrics} | ({"baseline": base.metrics} if base is not None else {})
    intervals = paired_bootstrap([result.records], [base.records]) if base is not None else None
    print(format_table(columns, intervals=intervals))
    out = {
        "model": cfg.model,
        "baseline": cfg.baseline or None,
        "reference": cfg.reference or cfg.baseline or None,
        "metrics": result.metrics,
        "baseline_metrics": base.metrics if base is not None else None,
        "difference": compare(result.metrics, base.metrics) if base is not None else None,
        "difference_interval": {k: asdict(v) for k, v in intervals.items()} if intervals is not None else None,
        "config": to_dict(cfg),
        "records": {"model": result.records, "baseline": base.records if base is not None else None},
    }
    path = Path(cfg.output_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out
