"""``vlalign compare``: the difference between evaluations already written, with its paired interval.

Reads the ``eval.json`` files of ``vlalign eval`` (or the folders holding them), runs the paired
bootstrap of :mod:`vlalign.eval.paired` over the scenes both sides answered, and prints one row
per metric: side a, side b, ``a - b`` and its interval (``*`` where the interval excludes zero).
Several files per side are pooled (runs with other seeds of one setting, say); the interval then
covers which scenes were asked, not which seed was drawn, so with as many files on each side the
k-th of a is also compared with the k-th of b alone (printed below the table, ``per_run`` in
``out``): read each run's own difference too.
Every evaluation must have answered the same questions (the same suite settings). Evaluations of
a published benchmark (``vlalign eval --bench``) pair by image and must have read the same
benchmark files (the same name and sha256 hashes in their ``benchmark`` entry).

Examples::

    vlalign compare runs/eval-dpo runs/eval-sft
    vlalign compare --a=runs/ev-plain-s0,runs/ev-plain-s1 --b=runs/ev-mdpo-s0,runs/ev-mdpo-s1 \\
                    --metrics=pope/adversarial --out=runs/plain-vs-mdpo.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from vlalign.commands.eval import format_table
from vlalign.config import StrictFields
from vlalign.eval.paired import paired_bootstrap, scene_counts

POSITIONAL = ("a", "b")
"""Fields that may also be given as bare arguments, in this order (``vlalign compare A B``)."""


@dataclass
class Config(StrictFields):
    """Which evaluations to compare, and how many bootstrap draws."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("a", "b")
    """Options that have no default: the command stops without them."""

    a: tuple[str, ...] = ()
    """Side a: eval.json files or folders holding one (comma-separated; several are pooled) (required)."""
    b: tuple[str, ...] = ()
    """Side b, as side a; the difference is a - b (required)."""
    which: Literal["model", "baseline"] = "model"
    """Whose answers in each eval.json: model, or baseline (the second model of a side-by-side eval)."""
    metrics: tuple[str, ...] = ()
    """Show only metrics starting with one of these (e.g. pope/adversarial,chair); empty: all."""
    samples: int = 2000
    """Bootstrap draws (scenes drawn with replacement)."""
    level: float = 0.95
    """Coverage of the interval."""
    seed: int = 0
    """Seed of the draws."""
    out: str = ""
    """A JSON file for the intervals ('' for none)."""
    overwrite: bool = False
    """Replace an existing ``out`` file (else the command refuses before reading anything)."""


def _read(path: str) -> tuple[Path, Any]:
    file = Path(path) / "eval.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ValueError(f"{path}: no eval.json there (give the file of vlalign eval, or its folder)")
    try:
        return file, json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from exc


def _records(path: str, which: str) -> list[dict[str, Any]]:
    file, data = _read(path)
    records = (data.get("records") or {}).get(which) if isinstance(data, dict) else None
    if not records:
        raise ValueError(f"{file}: no '{which}' answers under 'records' (written by vlalign eval?)")
    return list(records)


def benchmark_of(path: str) -> tuple[str | None, tuple[str, ...]]:
    """The benchmark an eval.json measured (None for the suite) and the sorted sha256 of its files."""
    _, data = _read(path)
    bench = data.get("benchmark") if isinstance(data, dict) else None
    if not isinstance(bench, dict):
        return None, ()
    return bench.get("name"), tuple(sorted((bench.get("files") or {}).values()))


def same_benchmark(paths: list[str]) -> str | None:
    """The benchmark all ``paths`` measured; ``ValueError`` naming two that differ (name or file hashes)."""
    first = benchmark_of(paths[0])
    for path in paths[1:]:
        other = benchmark_of(path)
        if other[0] != first[0]:
            names = [n or "the evaluation suite" for n in (first[0], other[0])]
            raise ValueError(f"{paths[0]} measured {names[0]}, {path} measured {names[1]}: compare like with like")
        if other[1] != first[1]:
            raise ValueError(
                f"{paths[0]} and {path} read other {first[0]} files (their sha256 differ): compare runs on the same files"
            )
    return first[0]


def _per_run(
    a: list[list[dict[str, Any]]], b: list[list[dict[str, Any]]], shown: dict[str, Any], cfg: Config
) -> list[dict[str, Any]]:
    """Each pair of runs (a's k-th, b's k-th) compared alone: the spread the pooled interval omits."""
    return [paired_bootstrap([x], [y], samples=cfg.samples, level=cfg.level, seed=cfg.seed) for x, y in zip(a, b)]


def run(cfg: Config) -> int:
    """Print the comparison table (and write ``out``); 2 with the reason on stderr for bad inputs."""
    if not cfg.a or not cfg.b:
        print(
            "vlalign compare: give both sides: vlalign compare A B (eval.json files or their folders)", file=sys.stderr
        )
        return 2
    if cfg.out and Path(cfg.out).exists() and not cfg.overwrite:
        print(
            f"vlalign compare: {cfg.out} already exists; pass --overwrite=true to replace it, or choose another --out",
            file=sys.stderr,
        )
        return 2
    try:
        bench = same_benchmark([*cfg.a, *cfg.b])
        a = [_records(p, cfg.which) for p in cfg.a]
        b = [_records(p, cfg.which) for p in cfg.b]
        intervals = paired_bootstrap(a, b, samples=cfg.samples, level=cfg.level, seed=cfg.seed)
    except ValueError as exc:
        print(f"vlalign compare: {exc}", file=sys.stderr)
        return 2
    shown = {k: v for k, v in intervals.items() if not cfg.metrics or any(k.startswith(m) for m in cfg.metrics)}
    if not shown:
        have = ", ".join(intervals)
        print(f"vlalign compare: no metric starts with {', '.join(cfg.metrics)} (have: {have})", file=sys.stderr)
        return 2
    columns = {"a": {k: v.a for k, v in shown.items()}, "b": {k: v.b for k, v in shown.items()}}
    unit = "images" if bench else "scenes"
    print(
        (f"benchmark {bench}\n" if bench else "") + f"a: {', '.join(cfg.a)}\nb: {', '.join(cfg.b)}\n"
        f"{len(a[0])} answers per evaluation over {scene_count(a[0])} {unit}; "
        f"{cfg.samples} paired draws of whole {unit}"
    )
    print(format_table(columns, intervals=shown, level=cfg.level))
    per_run = _per_run(a, b, shown, cfg) if len(a) == len(b) > 1 else []
    if per_run:
        print(
            f"\neach run against its counterpart (a's k-th against b's k-th; * the {cfg.level:.0%} interval excludes 0):"
        )
        width = max(len(k) for k in shown)
        for key in shown:
            print(
                f"{key.ljust(width)}  "
                + " / ".join(f"{r[key].difference:+.3f}{'*' if r[key].excludes_zero else ''}" for r in per_run)
            )
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        saved = {
            "a": list(cfg.a),
            "b": list(cfg.b),
            "level": cfg.level,
            "samples": cfg.samples,
            "intervals": {k: asdict(v) for k, v in shown.items()},
            "per_run": [{k: asdict(r[k]) for k in shown} for r in per_run],
        }
        Path(cfg.out).write_text(json.dumps(saved, indent=1) + "\n")
        print(f"wrote {cfg.out}")
    return 0


def scene_count(records: list[dict[str, Any]]) -> int:
    """How many scenes (images) the bootstrap draws from."""
    return len(scene_counts([records])[0])
