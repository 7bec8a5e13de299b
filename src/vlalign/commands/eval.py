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

Published benchmarks, read from their own files (``--bench``; every file and image is checked
before the model is loaded; see docs/benchmarks-official.md)::

    vlalign eval --model=M --bench=pope --pope.dir=POPE/output/coco --images=val2014/
    vlalign eval --model=M --bench=chair --chair.instances=annotations/instances_val2014.json \\
                 --chair.captions=annotations/captions_val2014.json --images=val2014/
    vlalign eval --model=M --bench=amber --amber.annotations=AMBER/data/annotations.json \\
                 --amber.queries=AMBER/data/query/query_all.json --images=AMBER/image/

With ``--bench``, ``eval.json`` also holds ``benchmark`` (name, sha256 of each input file,
settings: answer rule, prompt, generation) and ``official`` (the numbers as the benchmark's own
script prints them), and ``answers/`` the answers in the benchmark's own format.

``--engine=vllm`` generates the answers (and the KL's samples) with vLLM instead of vlalign's decode loop
(same greedy answers; docs/vllm.md).

The metrics (``eval/...``; the baseline's as ``baseline/...``) and the first few held-out
descriptions with their images also go to the experiment trackers of ``trackers`` (default:
TensorBoard, under ``<output_dir>/logs/eval``; see :mod:`vlalign.training.trackers`), at step 0.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import vlalign.shapes  # noqa: F401  (plugs the embedded default in: the shapes: data and the tiny models' corpus)
from vlalign.config import ConfigError, StrictFields, to_dict
from vlalign.eval.official import (
    AmberBenchConfig,
    BenchResult,
    ChairBenchConfig,
    PopeBenchConfig,
    prepare_benchmark,
    run_benchmark,
)
from vlalign.eval.paired import Interval, paired_bootstrap
from vlalign.eval.policy import generation_engine
from vlalign.eval.scorers import build_scorer
from vlalign.eval.suite import EvalResult, SuiteConfig, build_suite, compare, evaluate
from vlalign.models.load import load_model_and_processor, same_tokenizer
from vlalign.models.tiny import resolve_model
from vlalign.models.vllm_engine import VLLMOptions, check_vllm
from vlalign.training.trackers import finish_trackers, log_evaluation, start_trackers


@dataclass
class Config(StrictFields):
    """Evaluate a model, optionally beside a baseline."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model",)
    """Options that have no default: the command stops without them."""

    model: str = ""
    """The model to evaluate: a folder, a hub name or tiny:<arch>:<size> (required)."""
    baseline: str = ""
    """A second model shown beside it ('' for none); also the reference of the KL and the win rate."""
    reference: str = ""
    """A model for the KL only, not evaluated itself ('' for none; the baseline, when given, is the reference)."""
    output_dir: str = "runs/eval"
    """Where eval.json is written."""
    overwrite: bool = False
    """Replace an eval.json already in output_dir (else the command refuses, before loading anything)."""
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
    bench: Literal["", "pope", "chair", "amber"] = ""
    """A published benchmark read from its own files, in place of the suite: pope, chair (on COCO), amber ('': the suite)."""
    images: str = ""
    """--bench: the image folder (COCO val2014 for POPE's coco and aokvqa files and for chair; GQA's; AMBER's)."""
    pope: PopeBenchConfig = field(default_factory=PopeBenchConfig)
    """--bench=pope: which question files, the answer rule, the generation settings."""
    chair: ChairBenchConfig = field(default_factory=ChairBenchConfig)
    """--bench=chair: the COCO annotation files, the sample, the prompt, the generation settings."""
    amber: AmberBenchConfig = field(default_factory=AmberBenchConfig)
    """--bench=amber: the annotation and query files, the answer rule, the generation settings."""
    engine: Literal["hf", "vllm"] = "hf"
    """What generates the answers (and the KL's samples): hf (vlalign's decode loop) or vllm (a vLLM engine
    on each evaluated model's folder; greedy answers equal hf's; docs/vllm.md)."""
    vllm_gpu_memory_utilization: float = 0.3
    """engine = vllm: share of the GPU's memory vLLM may take (weights + KV cache); the loaded model needs the rest."""
    vllm_max_model_len: int = 2048
    """engine = vllm: longest prompt + answer, in tokens (sizes vLLM's KV cache)."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that receive the metrics and a few descriptions: tensorboard (default, under
    <output_dir>/logs/eval), wandb, mlflow, trackio ...; [] for none. One not installed is skipped."""


def trackers_in_use(names: list[str]) -> list[str]:
    """The trackers of ``names`` that are installed (a note for each that is not); an unknown name is a
    :class:`~vlalign.config.ConfigError` naming the option, raised before any model loads."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    unknown = [n for n in names if n not in LOGGER_TYPE_TO_CLASS]
    if unknown:
        raise ConfigError(f"trackers: unknown {unknown} (choose from {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    for name in missing:
        print(f"vlalign: tracker {name!r} is not installed; skipping it (pip install {name})")
    return [n for n in names if n not in missing]


def send_to_trackers(cfg: Config, names: Sequence[str], model: Any, base: Any | None) -> None:
    """The evaluation (``model``: metrics and records; ``base``: the baseline's, or None) to the trackers
    ``names``, at step 0: metrics as ``eval/...`` and ``baseline/...`` and a few descriptions of each."""
    if not names:
        return
    settings = {"model": cfg.model, "baseline": cfg.baseline, "reference": cfg.reference, "bench": cfg.bench}
    trackers = start_trackers(names, Path(cfg.output_dir) / "logs", "eval", config=settings)
    try:
        log_evaluation(trackers, 0, model.metrics, model.records, prefix="eval/")
        if base is not None:
            log_evaluation(trackers, 0, base.metrics, base.records, prefix="baseline/")
    finally:
        finish_trackers(trackers)


def _load(name: str, cfg: Config) -> tuple[Any, Any]:
    return load_model_and_processor(resolve_model(name), dtype=cfg.dtype, device=cfg.device)


def check_engine(cfg: Config) -> None:
    """``engine=vllm``: fail before any model loads, in one line, when vLLM is missing or cannot load the
    model or the baseline (:class:`~vlalign.models.vllm_engine.VLLMError`)."""
    if cfg.engine == "vllm":
        for name in (cfg.model, cfg.baseline):
            if name:
                check_vllm(resolve_model(name), option="engine")


def _engine(cfg: Config, name: str, loaded: tuple[Any, Any]) -> Any:
    """The context in which ``name`` (loaded: model, processor) generates with ``cfg.engine``."""
    options = VLLMOptions(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, max_model_len=cfg.vllm_max_model_len)
    return generation_engine(cfg.engine, resolve_model(name), *loaded, options=options)


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
        raise ConfigError("model: required (a model folder, hub name or tiny:<arch>:<size>)")
    if cfg.reference and cfg.baseline:
        raise ConfigError("give --baseline (evaluated, and the KL reference) or --reference (KL only), not both")
    written = Path(cfg.output_dir) / "eval.json"
    if written.exists() and not cfg.overwrite:
        raise ConfigError(
            f"{written} already exists; pass --overwrite=true to replace it, or choose another --output_dir"
        )
    trackers = trackers_in_use(cfg.trackers)
    check_engine(cfg)
    if cfg.bench:
        return run_bench(cfg, trackers)
    suite = build_suite(cfg.suite)
    print(f"suite {suite.name}: {len(suite)} questions")
    model, processor = _load(cfg.model, cfg)
    base: EvalResult | None = None
    base_model = None
    scorer = None
    if cfg.baseline:
        scorer = build_scorer(cfg.scorer, suite.vocabulary)
        base_model, base_processor = _load(cfg.baseline, cfg)
        with _engine(cfg, cfg.baseline, (base_model, base_processor)):
            base = evaluate(base_model, base_processor, suite, progress=cfg.progress)
    if cfg.reference:
        base_model, base_processor = _load(cfg.reference, cfg)
    reference = base_model if base_model is not None and same_tokenizer(processor, base_processor) else None
    if base_model is not None and reference is None:
        print(f"the {'baseline' if cfg.baseline else 'reference'} has another tokenizer: no KL from it")
    with _engine(cfg, cfg.model, (model, processor)):
        result = evaluate(
            model, processor, suite, reference=reference, baseline=base, scorer=scorer, progress=cfg.progress
        )
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
    send_to_trackers(cfg, trackers, result, base)
    return out


def run_bench(cfg: Config, trackers: Sequence[str] = ()) -> dict[str, Any]:
    """``--bench``: check every file, then answer, score, print and write (see the module doc)."""
    if cfg.reference:
        raise ConfigError("--reference: the KL is not measured on a benchmark (give --baseline to compare two models)")
    bench = prepare_benchmark(cfg.bench, cfg.images, pope=cfg.pope, chair=cfg.chair, amber=cfg.amber)
    print(f"benchmark {bench.name}: {len(bench)} questions; every file and image checked")
    model, processor = _load(cfg.model, cfg)
    with _engine(cfg, cfg.model, (model, processor)):
        result = run_benchmark(model, processor, bench, progress=cfg.progress)
    del model
    base: BenchResult | None = None
    if cfg.baseline:
        base_model, base_processor = _load(cfg.baseline, cfg)
        with _engine(cfg, cfg.baseline, (base_model, base_processor)):
            base = run_benchmark(base_model, base_processor, bench, progress=cfg.progress)
        del base_model
    print(f"\n{bench.name}, model:\n{result.table}")
    if base is not None:
        print(f"\n{bench.name}, baseline:\n{base.table}")
    columns = {"model": result.metrics} | ({"baseline": base.metrics} if base is not None else {})
    intervals = paired_bootstrap([result.records], [base.records]) if base is not None else None
    print("\n" + format_table(columns, intervals=intervals))
    out = {
        "model": cfg.model,
        "baseline": cfg.baseline or None,
        "reference": cfg.baseline or None,
        "benchmark": {"name": bench.name, "files": bench.files, "settings": bench.settings},
        "metrics": result.metrics,
        "baseline_metrics": base.metrics if base is not None else None,
        "difference": compare(result.metrics, base.metrics) if base is not None else None,
        "difference_interval": {k: asdict(v) for k, v in intervals.items()} if intervals is not None else None,
        "official": {"model": result.official, "baseline": base.official if base is not None else None},
        "config": to_dict(cfg),
        "records": {"model": result.records, "baseline": base.records if base is not None else None},
    }
    folder = Path(cfg.output_dir)
    _write_answers(folder / "answers", result)
    if base is not None:
        _write_answers(folder / "answers" / "baseline", base)
    path = folder / "eval.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} and the answers in the benchmark's own format under {folder / 'answers'}")
    send_to_trackers(cfg, trackers, result, base)
    return out


def _write_answers(folder: Path, result: BenchResult) -> None:
    """The answers in the benchmark's own formats (``.jsonl``: one JSON object a line; else one JSON value)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in result.answer_files.items():
        if name.endswith(".jsonl"):
            text = "".join(json.dumps(row) + "\n" for row in value)
        else:
            text = json.dumps(value, indent=1) + "\n"
        (folder / name).write_text(text)
