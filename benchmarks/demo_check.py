"""Check the full demo's improvements against the base model (issue 8's targets), from its summary.

    make demo                                   # or: vlalign demo --output_dir=runs/demo
    python benchmarks/demo_check.py runs/demo   # prints each target, measured; exit 1 if one fails

The numbers come from ``demo_summary.json`` (written by ``vlalign demo``): the last stage (the
aligned model) against the first (the base model). Where both stages' ``eval.json`` are there,
each difference also gets its 95% paired-bootstrap interval over the test scenes
(:func:`vlalign.commands.demo.stage_intervals`; ``-`` for CHAIR_i from evaluations written before
the mention count was kept). Nothing is timed here: the stage wall times are printed as measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlalign.commands.demo import SMOKE_TEST, stage_intervals


def _metrics(summary: dict, stage: str) -> dict[str, float]:
    for s in summary["stages"]:
        if s["stage"] == stage:
            return s["metrics"]
    raise SystemExit(f"demo_summary.json has no stage {stage!r} (stages: {[s['stage'] for s in summary['stages']]})")


def checks(summary: dict) -> list[tuple[str, float, float, bool]]:
    """(target, base value, aligned value, met) for each target of the demo."""
    base = _metrics(summary, "base")
    final = summary["stages"][-1]["metrics"]
    out = []
    for label, key, ok in [
        ("CHAIR_i at most half of the base", "chair/chair_i", lambda b, a: a <= 0.5 * b),
        ("adversarial POPE F1 higher", "pope/adversarial/f1", lambda b, a: a > b),
        ("counting accuracy at least 15 points higher", "task/counting", lambda b, a: a >= b + 0.15),
        ("colour accuracy not more than 1 point lower", "task/colour", lambda b, a: a >= b - 0.01),
    ]:
        b, a = base[key], final[key]
        out.append((f"{label} ({key})", b, a, bool(ok(b, a))))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", nargs="?", default="runs/demo", help="the demo folder (default runs/demo)")
    args = parser.parse_args()
    path = Path(args.demo_dir) / "demo_summary.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make demo` (or `vlalign demo --output_dir={args.demo_dir}`) first")
    summary = json.loads(path.read_text())
    if summary.get("quick"):
        print(SMOKE_TEST + " The targets below are the full demo's.\n")
    results = checks(summary)
    paired = stage_intervals(Path(args.demo_dir), summary)
    width = max(len(r[0]) for r in results)
    print(f"{'target'.ljust(width)}  {'base':>7}  {'aligned':>7}  met  aligned - base, 95% interval")
    for label, b, a, met in results:
        iv = paired.get(label[label.rindex("(") + 1 : -1])
        span = iv.text() if iv is not None else "-"
        print(f"{label.ljust(width)}  {b:7.3f}  {a:7.3f}  {'yes' if met else 'NO ':3}  {span}")
    seconds = summary.get("stage_seconds", {})
    print("stage wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    print(f"total: {sum(seconds.values()) / 60:.1f} min")
    return 0 if all(r[3] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
