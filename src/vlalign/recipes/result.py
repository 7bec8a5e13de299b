"""What a recipe's ``run(cfg)`` returns: :class:`RunResult`, the run's folder, model and numbers.

::

    from vlalign.recipes import dpo
    cfg = dpo.Config()
    cfg.data.train = "data/pairs/inject.jsonl"
    result = dpo.run(cfg)
    result.model_path        # Path('runs/dpo/model')
    result.metrics           # the last row of runs/dpo/metrics.jsonl
    result.evaluation        # {'eval/loss': ..., 'eval/rewards/accuracy': ...} ({} without one)
    result["eval/loss"]      # the final numbers, read as a mapping (what run returned before)

A result is also the dictionary of the final numbers the recipe reports, the one ``run`` returned
before, so code that indexed it (or wrote it as JSON) keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlalign.training.metrics import read_metrics

EVALUATION_PREFIXES = ("eval/", "suite/")
"""Keys of the final numbers that belong to an evaluation."""


class RunResult(dict[str, Any]):
    """A finished training run: a dict of the final numbers the recipe reports (what ``run`` returned
    before, so ``result["eval/loss"]``, ``json.dumps(result)`` and ``dict(result)`` keep working), with
    the run's folder, model and metrics as attributes."""

    def __init__(
        self,
        final: Mapping[str, Any],
        *,
        output_dir: Path,
        model_path: Path | None,
        metrics: dict[str, Any],
        evaluation: dict[str, float],
    ) -> None:
        super().__init__(final)
        self.output_dir = output_dir
        """The run folder (metrics.jsonl, config.yaml, checkpoints/, the model)."""
        self.model_path = model_path
        """The saved final model (a Hugging Face folder: full weights or a LoRA adapter); None if none was saved."""
        self.metrics = metrics
        """The last row of ``<output_dir>/metrics.jsonl`` ({} when the file is missing, e.g. on a process
        that does not write it)."""
        self.evaluation = evaluation
        """The final evaluation's numbers (``eval/...``, ``suite/...``); {} when the run evaluated nothing."""

    @property
    def final(self) -> dict[str, Any]:
        """Every final number the recipe reports (evaluation and data counts), as a plain dict."""
        return dict(self)

    def __repr__(self) -> str:
        return (
            f"RunResult(output_dir={str(self.output_dir)!r}, model_path="
            f"{str(self.model_path) if self.model_path else None!r}, final={dict.__repr__(self)})"
        )


def run_result(output_dir: str | Path, final: Mapping[str, Any], model_path: str | Path | None = None) -> RunResult:
    """The :class:`RunResult` of a run that wrote ``output_dir`` and reported ``final``; the model path
    defaults to ``<output_dir>/model`` when that folder exists."""
    out = Path(output_dir)
    if model_path is None and (out / "model").is_dir():
        model_path = out / "model"
    rows = read_metrics(out)
    return RunResult(
        final,
        output_dir=out,
        model_path=Path(model_path) if model_path is not None else None,
        metrics=dict(rows[-1]) if rows else {},
        evaluation={k: v for k, v in final.items() if k.startswith(EVALUATION_PREFIXES)},
    )
