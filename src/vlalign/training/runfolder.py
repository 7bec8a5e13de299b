"""A run folder is a contract: ``run.json`` records what made the run (command, options, data and
model fingerprints) and whether it finished, so that no command ever overwrites finished work or
continues another command's run by accident.

:func:`check_folder` decides, before anything is loaded, what a command may do with a folder:

* an empty or new folder: start;
* a run of another command, or of an unknown command (an older vlalign left no ``run.json``):
  refuse, unless ``train.overwrite`` starts over;
* a finished run of the same command: refuse without ``--resume`` (which extends it when
  ``train.max_steps`` grows) or ``train.overwrite``;
* an unfinished run of the same command: refuse without ``--resume`` or ``train.overwrite``.

:func:`changed_options` compares the options of a resumed run with the recorded ones: options
that alter training refuse the resume and are named; harmless ones (:data:`HARMLESS`) are
allowed and recorded in ``run.json``'s ``history``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlalign.errors import UserError
from vlalign.training.checkpoints import CHECKPOINT_DIR, Checkpointer
from vlalign.training.metrics import METRICS_FILE

if TYPE_CHECKING:
    from vlalign.training.run import TrainConfig

RUN_FILE = "run.json"

HARMLESS = (
    "train.resume",
    "train.overwrite",
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.trackers",
    "train.progress",
    "train.threads",
    "train.output_dir",
    "model.device",
    "data.eval",
    "data.eval_limit",
    "suite.",
    "eval_suite.",
    "save",
)
"""Options (or prefixes ending in '.') that may change on ``--resume``: logging, checkpointing,
evaluation, the device and the length of the run (``max_steps`` to extend it). Every other
option alters what is trained and refuses the resume."""


class RunFolderError(UserError, FileExistsError):
    """The run folder holds something the command must not overwrite or cannot continue."""


class ResumeMismatchError(UserError, ValueError):
    """``--resume`` with options that alter training; the message names them."""


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The folder's ``run.json`` (None when there is none or it is unreadable)."""
    path = Path(run_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (a kill leaves the old or the new file, never half of one)."""
    path = Path(run_dir) / RUN_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def new_record(command: str, options: dict[str, Any], fingerprints: dict[str, Any]) -> dict[str, Any]:
    """The ``run.json`` of a run that starts now."""
    return {
        "command": command,
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "options": options,
        "fingerprints": fingerprints,
        "history": [],
    }


def holds_earlier_run(run_dir: Path) -> bool:
    """Whether the folder holds outputs of a run (metrics, a model, checkpoints or ``run.json``)."""
    return any((Path(run_dir) / name).exists() for name in (RUN_FILE, "metrics.jsonl", "model", "checkpoints"))


def check_folder(
    run_dir: Path, command: str, *, resume: bool, overwrite: bool, newest_checkpoint: Path | None
) -> dict[str, Any] | None:
    """Refuse (:class:`RunFolderError`) what ``command`` must not do with ``run_dir``; returns the
    recorded ``run.json`` of a run to continue (None for a fresh start or an old unrecorded run)."""
    if overwrite or not holds_earlier_run(run_dir):
        return None
    record = read_record(run_dir)
    there = record.get("command") if record else None
    finished = bool(record and record.get("status") == "finished")
    if there is not None and there != command:
        state = "finished" if finished else "unfinished"
        raise RunFolderError(
            f"{run_dir} holds a{'n' if state[0] == 'u' else ''} {state} `vlalign {there}` run, not a `{command}` run; "
            f"pass --train.overwrite=true to delete it and start over, or choose another --train.output_dir"
        )
    if resume and finished and newest_checkpoint is None:
        raise RunFolderError(
            f"{run_dir} holds a finished `vlalign {command}` run with no checkpoint left to resume from; "
            f"pass --train.overwrite=true to delete it and start over, or choose another --train.output_dir"
        )
    if resume:
        return record
    what = _describe(record, finished, newest_checkpoint)
    if finished:
        how = "pass --resume with a larger --train.max_steps to extend it"
    elif newest_checkpoint is not None:
        how = "pass --resume to continue it"
    else:
        how = "pass --resume to restart it (no checkpoint was written)"
    raise RunFolderError(
        f"{run_dir} already holds {what}; {how}, --train.overwrite=true to start afresh, or another --train.output_dir"
    )


def _describe(record: dict[str, Any] | None, finished: bool, newest: Path | None) -> str:
    if record is None:
        name = "a run of an earlier vlalign (no run.json)"
    else:
        name = f"{'a finished' if finished else 'an unfinished'} `vlalign {record.get('command')}` run"
    return f"{name}{f' (newest checkpoint: {newest.name})' if newest is not None else ''}"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": value}``."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def _harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def changed_options(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(options that alter training, harmless options) whose values differ, each sorted."""
    old, new = flatten(recorded), flatten(current)
    changed = sorted(k for k in set(old) | set(new) if _normalise(old.get(k)) != _normalise(new.get(k)))
    return [k for k in changed if not _harmless(k)], [k for k in changed if _harmless(k)]


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_resume(
    record: dict[str, Any], options: dict[str, Any], fingerprints: dict[str, Any], run_dir: Path
) -> list[str]:
    """Refuse a resume whose options or data/model files differ in what alters training
    (:class:`ResumeMismatchError`, naming them); returns the harmless changes to record."""
    altering, harmless = changed_options(record.get("options", {}), options)
    old_prints = record.get("fingerprints", {})
    files = sorted(k for k in set(old_prints) & set(fingerprints) if old_prints[k] != fingerprints[k])
    if altering or files:
        shown = [
            f"{k} ({flatten(record.get('options', {})).get(k)!r} -> {flatten(options).get(k)!r})" for k in altering
        ]
        shown += [f"the file of {k} changed since the run started" for k in files]
        raise ResumeMismatchError(
            f"--resume of {run_dir} with changes that alter training: {'; '.join(shown)}; resume with the "
            f"recorded options (see {run_dir / RUN_FILE}), or start over with --train.overwrite=true"
        )
    return [k for k in harmless if k not in ("train.resume", "train.overwrite")]


def fingerprint(path: str) -> dict[str, Any] | None:
    """Size and a SHA-256 of a file (the first and last MiB for a large one) or of a folder's
    top-level files (their names, sizes and heads); None when ``path`` is no file or folder."""
    p = Path(path)
    if p.is_file():
        return {"size": p.stat().st_size, "sha256": _digest([p])}
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        return {"files": len(files), "size": sum(f.stat().st_size for f in files), "sha256": _digest(files)}
    return None


def _digest(files: list[Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            if size > 2 * chunk:
                fh.seek(size - chunk)
                h.update(fh.read(chunk))
            elif size > chunk:
                h.update(fh.read())
    return h.hexdigest()


def prepare_run_dir(cfg: TrainConfig, *, is_main: bool = True, command: str | None = None) -> tuple[Path, Path | None]:
    """Create the run folder; return it and the checkpoint to resume from (or None).

    A folder that holds an earlier run is an error unless ``resume`` (continue from the newest
    checkpoint) or ``overwrite`` (delete its outputs) is set, so that no earlier work is lost by
    accident; with ``command``, the folder's ``run.json`` must name the same command and a
    finished run is refused too (:func:`vlalign.training.runfolder.check_folder`). A resume that
    finds no complete checkpoint says so and starts clean from step 0.
    """
    run_dir = Path(cfg.output_dir)
    ckpt = Checkpointer(run_dir)
    latest = ckpt.latest()
    if command is not None and is_main:
        check_folder(run_dir, command, resume=cfg.resume, overwrite=cfg.overwrite, newest_checkpoint=latest)
    elif latest is not None and not cfg.resume and not cfg.overwrite:
        raise RunFolderError(
            f"{run_dir} already holds checkpoints (newest: {latest.name}); pass --resume to continue "
            f"that run, --train.overwrite=true to start afresh, or another --train.output_dir"
        )
    if cfg.overwrite and not cfg.resume:
        if is_main:
            for name in (CHECKPOINT_DIR, "model", "critic"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            for name in (METRICS_FILE, RUN_FILE):
                (run_dir / name).unlink(missing_ok=True)
        latest = None
    if cfg.resume and latest is None and is_main and holds_earlier_run(run_dir):
        print(f"vlalign: {run_dir} holds no complete checkpoint to resume from; starting afresh from step 0")
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, (latest if cfg.resume else None)


def run_fingerprints(config: Any) -> dict[str, Any]:
    """Fingerprints of the training data file and the model folder that ``config`` names (those
    that are local files or folders; the embedded world and tiny models are named by their option)."""
    out = {}
    for key, section, name in (("data.train", "data", "train"), ("model.name_or_path", "model", "name_or_path")):
        value = getattr(getattr(config, section, None), name, None)
        printed = fingerprint(value) if isinstance(value, str) and value else None
        if printed is not None:
            out[key] = printed
    return out
