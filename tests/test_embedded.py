"""The embedded default world: written on first use, rewritten when a file it should hold is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlalign.embedded import resolve_data, resolve_model


def test_shapes_files_resolve_and_a_stale_cache_is_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLALIGN_CACHE", str(tmp_path))
    path = Path(resolve_data("shapes:train_sft.jsonl"))
    assert path == tmp_path / "shapes-default" / "train_sft.jsonl" and path.stat().st_size > 0
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
