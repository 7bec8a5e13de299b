"""Metrics and samples reach each experiment tracker, read back from what the tracker wrote.

Each test opens a real run (:class:`vlalign.training.run.Run`, so the accelerator and its trackers
are the ones every recipe uses), logs an evaluation (:func:`log_evaluation`: ``eval/chair/chair_i``
0.25 at step 3, its count ``chair/n`` left out, and two held-out descriptions with their images)
and a training metric, finishes the run and reads the tracker's files back with the tracker's own
reader. W&B runs offline and MLflow on a local file store; each test is skipped when its tracker's
library is not installed (CI installs tensorboard only).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from PIL import Image

from vlalign.training import Run, TrainConfig
from vlalign.training.trackers import (
    Sample,
    finish_trackers,
    log_evaluation,
    log_samples,
    markdown_table,
    samples_from_records,
    start_trackers,
)

METRICS = {"chair/chair_i": 0.25, "chair/n": 12.0, "task/counting": 0.5}


def _records(folder: Path) -> list[dict]:
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(folder / "images" / "s0.png")
    Image.new("RGB", (8, 6), (0, 0, 255)).save(folder / "images" / "s1.png")
    describe = {"task": "describe", "question": "Describe the image."}
    return [
        {"id": "s0-pope", "task": "existence", "question": "Is there a red circle?", "output": "Yes"},
        {**describe, "id": "s0-describe", "image": "images/s0.png", "output": "A red circle | a green triangle."},
        {**describe, "id": "s1-describe", "image": "images/s1.png", "output": "A blue square.", "hallucinated": []},
    ]


def _log(tmp_path: Path, tracker: str) -> Path:
    records = _records(tmp_path / "data")
    records[1]["hallucinated"] = ["green triangle"]
    run = Run(TrainConfig(output_dir=str(tmp_path / "run"), trackers=[tracker], progress=False), desc="trackers")
    run.log(1, {"train/loss": 0.75})
    took = log_evaluation(run.accelerator, 3, METRICS, records, search=[tmp_path / "data"])
    assert took == [tracker]
    run.finish()
    return run.run_dir


def test_samples_from_records() -> None:
    """The describe records first (the POPE question skipped), the hallucinated objects as notes,
    no image where the path is not found; '|' escaped in the Markdown table."""
    records = _records_in_memory()
    samples = samples_from_records(records, k=1)
    assert samples == [Sample("A red | circle.", "Describe.", "s0-describe", "hallucinated: green triangle", None)]
    assert markdown_table(samples).splitlines()[2] == (
        "| s0-describe | Describe. | A red \\| circle. | hallucinated: green triangle |"
    )
    assert [s.id for s in samples_from_records(records[:1])] == ["s0-pope"]  # no description: any task


def _records_in_memory() -> list[dict]:
    return [
        {"id": "s0-pope", "task": "existence", "output": "Yes"},
        {
            "id": "s0-describe",
            "task": "describe",
            "question": "Describe.",
            "output": "A red | circle.",
            "image": "missing.png",
            "hallucinated": ["green triangle"],
        },
    ]


def test_tensorboard_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _log(tmp_path, "tensorboard")
    events = EventAccumulator(str(run_dir / "logs" / "trackers"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["eval/chair/chair_i"] == [(3, 0.25)] and scalars["train/loss"] == [(1, 0.75)]
    assert "eval/chair/n" not in scalars  # counts are not metrics
    (text,) = events.Tensors("eval/samples/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 3 and "| s0-describe | Describe the image. | A red circle \\| a green triangle." in table
    assert "hallucinated: green triangle" in table and "s1-describe" in table and "s0-pope" not in table
    images = {tag: events.Images(tag) for tag in events.Tags()["images"]}
    assert sorted(images) == ["eval/samples/0", "eval/samples/1"]
    assert (images["eval/samples/0"][0].width, images["eval/samples/0"][0].height) == (8, 6)


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run's ``run-*.wandb`` file: a LevelDB log (a 7-byte file
    header, 32 KiB blocks of records, each a 7-byte header (crc, length, type) and its bytes, a
    record split over blocks as first / middle / last pieces) of ``wandb_internal_pb2.Record``s."""
    from wandb.proto import wandb_internal_pb2

    data, pos, piece, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # the block's tail is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        piece, pos = piece + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            piece = b""
    return rows


def test_wandb_offline_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log(tmp_path, "wandb")
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows: dict = {}
    for _ in range(50):  # W&B's service process writes the file; finish() may return a moment before
        rows = {row["_step"]: row for row in _wandb_history(run_file)}
        if 3 in rows:
            break
        time.sleep(0.2)
    assert rows[1]["train/loss"] == 0.75
    assert rows[3]["eval/chair/chair_i"] == 0.25 and "eval/chair/n" not in rows[3]
    table = json.loads((run_file.parent / "files" / rows[3]["eval/samples/path"]).read_text())
    assert table == {
        "columns": ["id", "prompt", "output", "notes"],
        "data": [
            ["s0-describe", "Describe the image.", "A red circle | a green triangle.", "hallucinated: green triangle"],
            ["s1-describe", "Describe the image.", "A blue square.", ""],
        ],
    }
    images = sorted((run_file.parent / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == 2 and all(Image.open(p).size == (8, 6) for p in images)


def test_mlflow_file_store_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow)")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x: the file store is opt-in
    _log(tmp_path, "mlflow")
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("trackers").experiment_id])
    history = client.get_metric_history(run.info.run_id, "eval/chair/chair_i")
    assert [(m.step, m.value) for m in history] == [(3, 0.25)]
    assert run.data.metrics["train/loss"] == 0.75 and "eval/chair/n" not in run.data.metrics
    names = sorted(Path(a.path).name for a in client.list_artifacts(run.info.run_id, "eval/samples"))
    assert names == ["step_0000003.json", "step_0000003.md", "step_0000003_0.png", "step_0000003_1.png"]
    local = client.download_artifacts(run.info.run_id, "eval/samples/step_0000003.json", str(tmp_path / "dl"))
    rows = json.loads(Path(local).read_text())["samples"]
    assert [r["output"] for r in rows] == ["A red circle | a green triangle.", "A blue square."]


def test_start_trackers_without_an_accelerator(tmp_path: Path) -> None:
    """What ``vlalign eval`` would use: a TensorBoard tracker of its own, samples to it, closed."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = start_trackers(["tensorboard"], tmp_path / "logs", "eval", config={"model": "m"})
    assert log_samples(trackers, 0, [Sample("A red circle.", id="s0")]) == ["tensorboard"]
    assert log_samples(trackers, 0, []) == []
    finish_trackers(trackers)
    events = EventAccumulator(str(tmp_path / "logs" / "eval"), size_guidance={"tensors": 0})
    events.Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        start_trackers(["tensorbored"], tmp_path, "eval")
