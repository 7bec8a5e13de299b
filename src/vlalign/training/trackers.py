"""Evaluation metrics and sample texts and images, sent to the experiment trackers.

A run's numbers reach its trackers through ``accelerator.log`` (:class:`~vlalign.training.metrics.MetricsLog`);
that carries scalars only. What a person wants to see beside the curves is what the model wrote:
a few held-out descriptions, with their images and the objects it made up. accelerate's tracker
objects each wrap their library's own run, and each library shows samples its own way, so
:func:`log_samples` speaks to each in its own terms:

==============  ===================================================================================
tracker         what :func:`log_samples` writes
==============  ===================================================================================
tensorboard     one text summary ``<name>`` (a Markdown table: id, prompt, output, notes) and an image
                summary ``<name>/<i>`` per sample (TensorBoard's Text and Images tabs)
wandb           one ``wandb.Table`` ``<name>`` (columns id, prompt, output, notes) and the images
                ``<name>/images`` (captioned with the sample's id)
mlflow          artifacts ``<name>/step_<step>.json`` (the rows), ``<name>/step_<step>.md`` (the
                table) and ``<name>/step_<step>_<i>.png`` (the images)
==============  ===================================================================================

Other trackers get no samples (:func:`log_samples` returns the names of those that did).
:func:`samples_from_records` turns an evaluation's answers (:func:`vlalign.eval.suite.evaluate`'s
records) into samples; :func:`log_evaluation` sends an evaluation's metrics and samples at once;
:func:`start_trackers` opens trackers without an ``Accelerator``, for a command that trains
nothing (``vlalign eval``). Everything here runs on the main process only and imports each tracker's
library only when that tracker is in use (they are optional dependencies).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

SAMPLE_COLUMNS = ("id", "prompt", "output", "notes")
"""The text columns of a sample, in the order every tracker shows them."""


@dataclass
class Sample:
    """One thing the model wrote, as a tracker shows it."""

    output: str
    """The model's text."""
    prompt: str = ""
    """What it was asked."""
    id: str = ""
    """The sample's id (an evaluation record's ``id``)."""
    notes: str = ""
    """A short remark, e.g. the hallucinated objects."""
    image: Image.Image | None = None
    """The image it saw (None: none, or not found)."""

    def row(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if k in SAMPLE_COLUMNS}


def _trackers(target: Any) -> list[Any]:
    """The tracker objects of an ``Accelerator`` (main process only; [] elsewhere) or of a list."""
    if hasattr(target, "trackers"):
        return list(target.trackers) if getattr(target, "is_main_process", True) else []
    return list(target)


def _load_image(path: Any, search: Sequence[Path]) -> Image.Image | None:
    if not isinstance(path, str) or not path:
        return None
    candidates = [Path(path)] + [Path(root) / path for root in search if not Path(path).is_absolute()]
    for candidate in candidates:
        if candidate.is_file():
            try:
                with Image.open(candidate) as image:
                    return image.convert("RGB")
            except OSError:
                return None
    return None


def samples_from_records(
    records: Iterable[Mapping[str, Any]], *, k: int = 4, task: str = "describe", search: Sequence[Path] = ()
) -> list[Sample]:
    """The first ``k`` records of ``task`` (all tasks when none is of it), in the evaluation's own order,
    as samples: the question, the output, the hallucinated objects as notes, the image (a path,
    tried as written and then under each folder of ``search``)."""
    rows = [r for r in records if isinstance(r, Mapping)]
    picked = [r for r in rows if r.get("task") == task] or rows
    out = []
    for record in picked[:k]:
        hallucinated = record.get("hallucinated") or []
        notes = "hallucinated: " + ", ".join(str(h) for h in hallucinated) if hallucinated else ""
        out.append(
            Sample(
                output=str(record.get("output") or ""),
                prompt=str(record.get("question") or record.get("prompt") or ""),
                id=str(record.get("id") or ""),
                notes=notes,
                image=_load_image(record.get("image"), search),
            )
        )
    return out


def markdown_table(samples: Sequence[Sample]) -> str:
    """The samples' text columns as a Markdown table (``|`` and new lines escaped)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(s.row()[c]) for c in SAMPLE_COLUMNS) + " |" for s in samples]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one function per tracker


def _tensorboard(tracker: Any, step: int, samples: Sequence[Sample], name: str) -> None:
    import numpy as np  # a dependency of tensorboard and torch; imported with the tracker in use

    writer = tracker.writer
    writer.add_text(name, markdown_table(samples), global_step=step)
    for i, sample in enumerate(samples):
        if sample.image is not None:
            writer.add_image(f"{name}/{i}", np.asarray(sample.image), global_step=step, dataformats="HWC")
    writer.flush()


def _wandb(tracker: Any, step: int, samples: Sequence[Sample], name: str) -> None:
    import wandb

    table = wandb.Table(columns=list(SAMPLE_COLUMNS), data=[[s.row()[c] for c in SAMPLE_COLUMNS] for s in samples])
    values: dict[str, Any] = {name: table}
    images = [wandb.Image(s.image, caption=s.id or s.output[:60]) for s in samples if s.image is not None]
    if images:  # beside the table: images inside a table are kept only in an artifact, not in an offline run
        values[f"{name}/images"] = images
    tracker.run.log(values, step=step)


def _mlflow(tracker: Any, step: int, samples: Sequence[Sample], name: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    run_id = tracker.active_run.info.run_id
    stem = f"{name}/step_{step:07d}"
    client.log_dict(run_id, {"step": step, "samples": [s.row() for s in samples]}, f"{stem}.json")
    client.log_text(run_id, markdown_table(samples), f"{stem}.md")
    for i, sample in enumerate(samples):
        if sample.image is not None:
            client.log_image(run_id, sample.image, artifact_file=f"{stem}_{i}.png")


_WRITERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}


def log_samples(target: Any, step: int, samples: Sequence[Sample], *, name: str = "samples") -> list[str]:
    """Send ``samples`` at ``step`` to every tracker of ``target`` (an ``Accelerator`` or a list of
    accelerate trackers) that shows them (see the module doc); returns those trackers' names."""
    done = []
    for tracker in _trackers(target) if samples else []:
        writer = _WRITERS.get(getattr(tracker, "name", ""))
        if writer is not None:
            writer(tracker, step, samples, name)
            done.append(tracker.name)
    return done


def log_metrics(target: Any, step: int, metrics: Mapping[str, float]) -> None:
    """Send scalar ``metrics`` at ``step`` to every tracker of ``target`` (main process only)."""
    values = {k: float(v) for k, v in metrics.items()}
    for tracker in _trackers(target):
        tracker.log(values, step=step)


def log_evaluation(
    target: Any,
    step: int,
    metrics: Mapping[str, float],
    records: Iterable[Mapping[str, Any]],
    *,
    prefix: str = "eval/",
    k: int = 4,
    search: Sequence[Path] = (),
) -> list[str]:
    """An evaluation's metrics (as ``<prefix><name>``; counts ``.../n`` and ``..._n`` left out) and
    its first ``k`` held-out descriptions (:func:`samples_from_records`) at ``step``; returns the
    names of the trackers that took the samples."""
    scalars = {f"{prefix}{key}": v for key, v in metrics.items() if not key.endswith(("/n", "_n"))}
    log_metrics(target, step, scalars)
    return log_samples(target, step, samples_from_records(records, k=k, search=search), name=f"{prefix}samples")


def start_trackers(
    names: Sequence[str], logging_dir: Path, project: str, config: Mapping[str, Any] | None = None
) -> list[Any]:
    """Open accelerate's trackers ``names`` (tensorboard, wandb, mlflow, ...) without an
    ``Accelerator``: TensorBoard writes under ``logging_dir/project``, W&B keeps its run folder in
    ``logging_dir`` (unless ``WANDB_DIR`` says otherwise), MLflow uses its tracking URI
    (``MLFLOW_TRACKING_URI``, else ``./mlruns``). ``config``: hyperparameters to store. Call
    :func:`finish_trackers` at the end."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    trackers = []
    Path(logging_dir).mkdir(parents=True, exist_ok=True)
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS.get(name)
        if cls is None:
            raise ValueError(f"unknown tracker {name!r} (choose from {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        if name == "wandb":
            tracker = cls(project, dir=str(logging_dir))
        elif cls.requires_logging_directory:
            tracker = cls(project, str(logging_dir))
        else:
            tracker = cls(project)
        tracker.start()
        if config is not None:
            tracker.store_init_configuration(dict(config))
        trackers.append(tracker)
    return trackers


def finish_trackers(trackers: Sequence[Any]) -> None:
    """Close trackers opened by :func:`start_trackers`."""
    for tracker in trackers:
        tracker.finish()
