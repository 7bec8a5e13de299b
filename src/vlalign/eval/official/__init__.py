"""Published benchmarks run on a model: ``vlalign eval --bench=pope|chair|amber``.

The readers and scorers are :mod:`vlalign.eval.benchmarks` (pure text); this package turns their
files into prompts, checks every file and image *before* a model is loaded
(:func:`prepare_benchmark`), answers them (:func:`~.common.run_benchmark`) and scores the answers
as each benchmark's own script does, keeping per-question records, file hashes and settings:

- :mod:`.pope`: POPE question files (COCO, A-OKVQA, GQA; random, popular, adversarial);
- :mod:`.chair`: CHAIR on COCO val2014 from the COCO annotation files;
- :mod:`.amber`: AMBER, discriminative and generative.
"""

from __future__ import annotations

from vlalign.config import ConfigError
from vlalign.eval.official.amber import AmberBenchConfig, prepare_amber
from vlalign.eval.official.chair import ChairBenchConfig, prepare_chair
from vlalign.eval.official.common import BenchResult, PreparedBench, run_benchmark
from vlalign.eval.official.pope import PopeBenchConfig, prepare_pope

BENCHMARKS = ("pope", "chair", "amber")


def prepare_benchmark(
    bench: str, images: str, *, pope: PopeBenchConfig, chair: ChairBenchConfig, amber: AmberBenchConfig
) -> PreparedBench:
    """The checked questions of benchmark ``bench`` (pope, chair, amber); raises before any generation."""
    if bench == "pope":
        return prepare_pope(pope, images)
    if bench == "chair":
        return prepare_chair(chair, images)
    if bench == "amber":
        return prepare_amber(amber, images)
    raise ConfigError(f"--bench: unknown benchmark {bench!r}; choose from {', '.join(BENCHMARKS)}")


__all__ = [
    "BENCHMARKS",
    "AmberBenchConfig",
    "BenchResult",
    "ChairBenchConfig",
    "PopeBenchConfig",
    "PreparedBench",
    "prepare_benchmark",
    "run_benchmark",
]
