"""The embedded default world: written on first use, rewritten when a file it should hold is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlalign.models.tiny import resolve_model
from vlalign.shapes.embedded import resolve_data
from vlalign.shapes.tasks import write_world
from vlalign.shapes.world import DEMO_WORLD, WorldConfig


def test_shapes_files_resolve_and_a_stale_cache_is_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLALIGN_CACHE", str(tmp_path))
    for split in ("n_train", "n_validation", "n_test", "n_compositional"):  # a small demo world, for speed
        monkeypatch.setitem(DEMO_WORLD, split, 20)
    # a world cached by an older vlalign, of another configuration: rewritten as the demo's world
    write_world(WorldConfig(n_train=5, n_validation=5, n_test=5, n_compositional=5), str(tmp_path / "shapes-default"))
    path = Path(resolve_data("shapes:train_sft.jsonl"))
    assert path == tmp_path / "shapes-default" / "train_sft.jsonl" and path.stat().st_size > 0
    manifest = json.loads((tmp_path / "shapes-default" / "manifest.json").read_text())
    assert manifest["config"]["shapes"] == list(DEMO_WORLD["shapes"]) and manifest["config"]["n_train"] == 20
    assert sum(1 for _ in path.open()) == 2 * 20  # one description and one conversation per scene
    original = path.read_bytes()
    path.unlink()  # as a world cached by an older vlalign, before it wrote the SFT conversations
    assert Path(resolve_data("shapes:train_sft.jsonl")).read_bytes() == original  # deterministic rewrite
    with pytest.raises(FileNotFoundError, match="no file 'nope.jsonl'; available: .*train_sft.jsonl"):
        resolve_data("shapes:nope.jsonl")
    assert resolve_data("data/mine.jsonl") == "data/mine.jsonl"  # ordinary paths pass through


def test_bad_tiny_names_are_refused() -> None:
    with pytest.raises(ValueError, match="tiny:<arch>:<size>"):
        resolve_model("tiny:gemma3")
    assert resolve_model("/models/mine") == "/models/mine"


def test_a_cache_entry_being_built_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While another process (here: this test) holds a cache entry's lock, resolving that entry waits
    and writes nothing; once the lock is released it builds the entry and returns."""
    import threading

    from vlalign.models.tiny import STAMP_FILE, cache_lock

    monkeypatch.setenv("VLALIGN_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "qwen2_vl-tiny-seed0"
    result: list[str] = []
    lock = cache_lock("models/qwen2_vl-tiny-seed0")
    lock.acquire()
    waiter = threading.Thread(target=lambda: result.append(resolve_model("tiny:qwen2_vl:tiny")))
    waiter.start()
    waiter.join(timeout=1.5)
    assert waiter.is_alive() and not (folder / STAMP_FILE).exists()  # waiting, nothing written
    lock.release()
    waiter.join(timeout=60)
    assert result == [str(folder)] and (folder / STAMP_FILE).is_file()
