"""The registry of named data sources (``shapes:`` and the like)."""

from __future__ import annotations

import pytest

from vlalign.data import sources


@pytest.fixture
def empty_registry(monkeypatch):
    monkeypatch.setattr(sources, "_SOURCES", {})


def test_a_registered_prefix_is_resolved_and_other_paths_pass_through(empty_registry) -> None:
    seen: list[str] = []

    def resolver(path: str) -> str:
        seen.append(path)
        return "/cache/world/" + path.removeprefix("toy:")

    sources.register_source("toy:", resolver)
    assert sources.resolve("toy:train.jsonl") == "/cache/world/train.jsonl"
    assert seen == ["toy:train.jsonl"]  # the resolver gets the whole path, prefix included
    assert sources.resolve("data/mine.jsonl") == "data/mine.jsonl"
    assert sources.resolve("toy2:train.jsonl") == "toy2:train.jsonl"  # an unregistered prefix is a path
    assert sources.registered_sources() == ("toy:",)


def test_registering_again_replaces_and_bad_prefixes_are_refused(empty_registry) -> None:
    sources.register_source("toy:", lambda p: "first")
    sources.register_source("toy:", lambda p: "second")
    assert sources.resolve("toy:x") == "second"
    for bad in ("toy", ":", "a:b:"):
        with pytest.raises(ValueError, match="a name and a colon"):
            sources.register_source(bad, lambda p: p)
