"""POPE from its published question files (``vlalign eval --bench=pope``).

Files: ``<dir>/<dataset>_pope_<mode>.json`` as published in AoiDragon/POPE (``output/coco/``),
or the SEEM-built A-OKVQA and GQA files ``<dataset>_pope_seem_<mode>.json`` (one JSON array; as
distributed in DAMO-NLP-SG/VCD ``experiments/data/POPE/{aokvqa,gqa}/``), or any list of files
(``--pope.files``; a file's mode is the part of its name after ``_pope_`` [``seem_``]). Every question is
asked by default. Answers are read with POPE's ``evaluate.py`` rule (``official``, the default;
:func:`~vlalign.eval.benchmarks.pope_answer_official`) or vlalign's reader (``project``:
:func:`~vlalign.eval.parsing.pope_says_yes`, case-insensitive, punctuation stripped); with
``compare_rules`` both are computed and the number of answers they read differently is reported
(``pope/<mode>/disagreements``).

Metrics: ``pope/<mode>/{accuracy, precision, recall, f1, yes_ratio, n}``, ``pope/average/...``
(the mean over modes, as papers print an "Average" row) and, in ``official``, the counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from vlalign.config import ConfigError, StrictFields
from vlalign.eval.benchmarks import (
    POPE_MODES,
    PopeMetrics,
    average_pope,
    format_pope_table,
    pope_answer_official,
    pope_file_name,
    pope_metrics,
    read_pope_file,
)
from vlalign.eval.official.common import (
    BenchItem,
    BenchScore,
    PreparedBench,
    base_record,
    check_images,
    image_folder,
    join_prompt,
    make_item,
    sha256_of,
)
from vlalign.eval.parsing import pope_says_yes

RULES = ("official", "project")


@dataclass
class PopeBenchConfig(StrictFields):
    """POPE read from its published question files."""

    dir: str = ""
    """Folder of the published question files (e.g. POPE/output/coco); or give files."""
    dataset: Literal["coco", "aokvqa", "gqa"] = "coco"
    """Which files of dir: <dataset>_pope_<mode>.json."""
    modes: tuple[str, ...] = POPE_MODES
    """Negative-sampling modes to run (random, popular, adversarial)."""
    files: tuple[str, ...] = ()
    """Question files instead of dir (a file's mode: its name after '_pope_', else the whole name)."""
    questions: int = 0
    """Questions per file, the first in file order (0: every question, as papers report)."""
    answer_rule: Literal["official", "project"] = "official"
    """How an answer is read: official (POPE's evaluate.py) or project (vlalign's stricter reader)."""
    compare_rules: bool = True
    """Also read every answer with the other rule and report how many answers the two read differently."""
    prompt_suffix: str = ""
    """Text added after every question, after a space (e.g. 'Answer the question using a single word or phrase.')."""
    max_new_tokens: int = 128
    """Longest answer in tokens."""
    batch_size: int = 16
    """Prompts per generation batch."""


def _files(cfg: PopeBenchConfig) -> tuple[str, dict[str, Path]]:
    """The benchmark name and the question file of each mode."""
    if cfg.files:
        by_mode: dict[str, Path] = {}
        dataset = ""
        for f in cfg.files:
            stem = Path(f).name.split(".")[0]
            head, _, mode = stem.partition("_pope_")
            dataset = dataset or (head if mode else "")
            by_mode[mode.removeprefix("seem_") or stem] = Path(f)
        return f"pope/{dataset or 'custom'}", by_mode
    if not cfg.dir:
        raise ConfigError("--bench=pope needs --pope.dir=FOLDER of the published question files (or --pope.files)")
    unknown = [m for m in cfg.modes if m not in POPE_MODES]
    if unknown:
        raise ConfigError(f"pope.modes: unknown mode(s) {unknown}; choose from {', '.join(POPE_MODES)}")
    return f"pope/{cfg.dataset}", {m: _published(Path(cfg.dir), cfg.dataset, m) for m in cfg.modes}


def _published(folder: Path, dataset: str, mode: str) -> Path:
    """``<dataset>_pope_<mode>.json``, or the SEEM-built ``<dataset>_pope_seem_<mode>.json`` (A-OKVQA, GQA)."""
    path = folder / pope_file_name(dataset, mode)
    seem = folder / f"{dataset}_pope_seem_{mode}.json"
    return seem if not path.is_file() and seem.is_file() else path


def prepare_pope(cfg: PopeBenchConfig, images: str) -> PreparedBench:
    """Read and check every question file and image (see the module doc); nothing is generated."""
    name, files = _files(cfg)
    root = image_folder(images, "pope", "COCO val2014 for coco and aokvqa, GQA's images for gqa")
    read = {mode: read_pope_file(path) for mode, path in files.items()}  # every file parsed first: fast errors
    if cfg.questions > 0:
        read = {mode: questions[: cfg.questions] for mode, questions in read.items()}
    check_images(((q.image, q.source, q.line, "image") for qs in read.values() for q in qs), root)
    hashes = {str(path): sha256_of(path) for path in files.values()}
    items: list[BenchItem] = []
    for mode, questions in read.items():
        for q in questions:
            info = {"id": str(q.question_id), "question_id": q.question_id, "image": q.image, "question": q.text}
            info["label"] = q.label
            text = join_prompt(q.text, cfg.prompt_suffix)
            items.append(
                make_item(f"pope/{mode}", f"{mode}/{q.question_id}", root / q.image, text, info, cfg.max_new_tokens)
            )
    settings = {
        "answer_rule": cfg.answer_rule,
        "compare_rules": cfg.compare_rules,
        "modes": list(files),
        "questions_per_file": cfg.questions or "all",
        "prompt_suffix": cfg.prompt_suffix,
        "generation": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size},
        "images": str(root),
    }
    scorer = partial(score_pope, items, rule=cfg.answer_rule, both=cfg.compare_rules, dataset=name.split("/")[1])
    return PreparedBench(name, items, hashes, settings, scorer, batch_size=cfg.batch_size)


def read_answer(text: str, rule: str) -> str:
    """``"yes"`` or ``"no"`` as ``rule`` (official, project) reads an answer."""
    if rule == "official":
        return pope_answer_official(text)
    if rule == "project":
        return "yes" if pope_says_yes(text) else "no"
    raise ValueError(f"unknown POPE answer rule {rule!r}; choose from {RULES}")


def score_pope(
    items: Sequence[BenchItem], texts: Sequence[str], *, rule: str, both: bool, dataset: str = "coco"
) -> BenchScore:
    """POPE's metrics per mode (and their average) of the answers ``texts`` to ``items``."""
    other = next(r for r in RULES if r != rule)
    records = []
    for item, text in zip(items, texts):
        rec = base_record(item, text)
        rec["parsed"] = read_answer(text, rule)
        rec["said_yes"] = rec["parsed"] == "yes"
        if both:
            rec[f"parsed_{other}"] = read_answer(text, other)
        records.append(rec)
    modes = list(dict.fromkeys(item.part.split("/", 1)[1] for item in items))
    results: dict[str, PopeMetrics] = {}
    metrics: dict[str, float] = {}
    disagreements: dict[str, int] = {}
    for mode in modes:
        rows = [r for r in records if r["part"] == f"pope/{mode}"]
        results[mode] = pope_metrics([r["label"] for r in rows], [r["parsed"] for r in rows])
        metrics.update(
            {
                f"pope/{mode}/{k}": float(v)
                for k, v in results[mode].as_dict().items()
                if k not in ("tp", "fp", "tn", "fn")
            }
        )
        metrics[f"pope/{mode}/n"] = float(len(rows))
        if both:
            disagreements[mode] = sum(r["parsed"] != r[f"parsed_{other}"] for r in rows)
            metrics[f"pope/{mode}/disagreements"] = float(disagreements[mode])
    if len(results) > 1:
        metrics.update({f"pope/average/{k}": v for k, v in average_pope(results).items()})
    table = format_pope_table(results)
    if both:
        total = sum(disagreements.values())
        per_mode = ", ".join(f"{m}: {n}" for m, n in disagreements.items())
        table += (
            f"\nanswers read differently by the {rule} and the {other} rule: {total} of {len(records)} ({per_mode})"
        )
    official = {
        "answer_rule": rule,
        "per_mode": {m: r.as_dict() for m, r in results.items()},
        "average": average_pope(results) if len(results) > 1 else None,
        "disagreements": disagreements if both else None,
    }
    answer_files = {
        f"{dataset}_pope_{mode}.jsonl": [
            {"question_id": r["question_id"], "question": r["question"], "answer": r["output"]}
            for r in records
            if r["part"] == f"pope/{mode}"
        ]
        for mode in modes
    }
    return BenchScore(metrics, records, official, table, answer_files)
