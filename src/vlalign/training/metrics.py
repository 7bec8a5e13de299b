"""A training run's numbers: ``metrics.jsonl`` (and the trackers), throughput and peak memory.

:class:`MetricsLog` appends one JSON object per logged step to ``<run_dir>/metrics.jsonl``;
:func:`read_metrics` reads them back; :class:`StepRecords` keeps another per-step JSONL file (e.g.
sampled completions) in step with the checkpoints; :class:`Throughput` turns the samples and tokens of the
steps since its last reading into rates, with the peak memory of those steps.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"

logger = logging.getLogger("vlalign")


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (main process only) and
    forwards the same numbers to the accelerator's trackers."""

    def __init__(self, run_dir: Path, accelerator=None, *, stage: str | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.accelerator = accelerator
        self.stage = stage
        self.is_main = accelerator is None or accelerator.is_main_process
        self.rows = count_records(self.path) if self.is_main else 0
        """Records in the file (what a checkpoint notes, so a resume cuts the file back to it)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: to_float(v) for k, v in metrics.items()}
        if self.is_main:
            record = {"step": step, "time": time.time(), **({"stage": self.stage} if self.stage else {}), **clean}
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.rows += 1
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(clean, step=step)

    def truncate_after(self, step: int, rows: int | None = None) -> None:
        """Drop records past ``step`` (used on resume so a restarted run leaves no duplicates);
        with ``rows`` (the count a checkpoint noted), keep exactly the first ``rows`` records, so
        that rows written after the checkpoint at the same step (a final evaluation) go too."""
        if self.is_main:
            truncate_records(self.path, step, rows=rows)
            self.rows = count_records(self.path)

    def clear(self) -> None:
        """Remove the file (a run that starts from step 0 keeps no rows of an earlier attempt)."""
        if self.is_main:
            self.path.unlink(missing_ok=True)
            self.rows = 0


def _parse_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The (line, record) pairs of a JSONL file of per-step records; a line that is not a JSON
    object (the half-written last line of a killed run) is dropped with a warning naming it."""
    out = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "step" not in record:
            half = " (half-written by a killed run)" if number == len(lines) else ""
            logger.warning("%s line %d is not a complete record%s; dropped", path, number, half)
            continue
        out.append((line, record))
    return out


def count_records(path: Path) -> int:
    """Complete records in a JSONL file of per-step records (0 if there is none)."""
    return len(_parse_records(path)) if path.exists() else 0


def truncate_records(path: Path, step: int, *, rows: int | None = None) -> None:
    """Drop the records of a JSONL file of per-step records whose ``step`` is past ``step`` (and,
    with ``rows``, all records after the first ``rows``); unreadable lines go with a warning."""
    if not path.exists():
        return
    kept = [line for line, record in _parse_records(path) if record["step"] <= step]
    if rows is not None:
        kept = kept[:rows]
    path.write_text("".join(line + "\n" for line in kept))


class StepRecords:
    """A JSONL file of per-step records besides the metrics (e.g. sampled completions), written by the
    main process only (``enabled``); on start it is cut back to ``start_step``, so a resumed (or
    restarted) run keeps only what its checkpoint covers."""

    def __init__(self, path: Path, *, enabled: bool, start_step: int) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            truncate_records(path, start_step)

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """Append ``records`` (nothing is written, nor the file created, when there are none)."""
        lines = [json.dumps(record) + "\n" for record in records] if self.enabled else []
        if lines:
            with open(self.path, "a") as fh:
                fh.writelines(lines)


def to_float(v: Any) -> float:
    """A metric value (a number or a one-element tensor) as a Python float."""
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().cpu())
    return float(v)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (empty if there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [record for _, record in _parse_records(path)]


class Throughput:
    """Samples/s, tokens/s and peak memory over the steps since the last :meth:`read`."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0
        self.tokens = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {
            "perf/samples_per_s": self.samples / dt,
            "perf/tokens_per_s": self.tokens / dt,
            "perf/peak_mem_mb": peak_memory_mb(self.device),
        }
        self.reset()
        return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only: imported where it is used so that the package imports everywhere

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
