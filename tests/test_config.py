"""Configs: YAML + dotted overrides, type coercion, unknown keys, --help text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from vlalign.config import ConfigError, format_help, load_config, parse_overrides, to_dict


@dataclass
class Inner:
    lr: float = 1e-4
    """Peak learning rate."""
    schedule: Literal["cosine", "linear"] = "cosine"
    """Decay after warm-up."""
    layers: list[int] = field(default_factory=lambda: [1, 2])
    """Which layers."""


@dataclass
class Outer:
    name: str = "run"
    """Run name."""
    steps: int = 10
    """Optimiser steps."""
    verbose: bool = False
    """Chatty output."""
    limit: int | None = None
    """Optional cap."""
    train: Inner = field(default_factory=Inner)
    """Training options."""


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ntrain:\n  lr: 0.5\n  schedule: linear\n")
    cfg = load_config(Outer, path, ["--train.lr=0.25", "--name", "x", "--verbose", "--limit=3"])
    assert (cfg.steps, cfg.train.lr, cfg.train.schedule, cfg.name, cfg.verbose, cfg.limit) == (
        20,
        0.25,
        "linear",
        "x",
        True,
        3,
    )
    assert cfg.train.layers == [1, 2]


def test_override_types_are_coerced():
    cfg = load_config(Outer, None, ["--steps=1e3", "--train.layers=[4,5]", "--limit=null"])
    assert cfg.steps == 1000 and cfg.train.layers == [4, 5] and cfg.limit is None
    assert load_config(Outer, None, ["--train.layers=7,8"]).train.layers == [7, 8]


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'; did you mean 'train\.lr'\?"):
        load_config(Outer, None, ["--train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lr'; did you mean 'train\.lr'\?"):
        load_config(Outer, None, ["--lr=1"])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  schedul: linear\n")
    with pytest.raises(ConfigError, match=r"'train\.schedul'; did you mean 'train\.schedule'"):
        load_config(Outer, path)


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 2\.5"):
        load_config(Outer, None, ["--steps=2.5"])
    with pytest.raises(
        ConfigError, match=r"train\.schedule: 'cosin' is not one of 'cosine', 'linear'; did you mean 'cosine'\?"
    ):
        load_config(Outer, None, ["--train.schedule=cosin"])
    with pytest.raises(ConfigError, match=r"verbose: expected true or false"):
        load_config(Outer, None, ["--verbose=maybe"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, "/nonexistent.yaml")


def test_help_lists_fields_with_docs_and_defaults():
    text = format_help(Outer)
    assert "--train.lr  (float, default: 0.0001)" in text
    assert "Peak learning rate." in text
    assert "[train]  Training options." in text
    assert "--limit  (int | None, default: None)" in text


def test_parse_overrides_and_round_trip():
    assert parse_overrides(["--a.b=1", "--c", "x", "--flag"]) == {"a": {"b": 1}, "c": "x", "flag": True}
    cfg = load_config(Outer, None, ["--train.lr=0.3"])
    assert to_dict(cfg)["train"] == {"lr": 0.3, "schedule": "cosine", "layers": [1, 2]}
    with pytest.raises(ConfigError, match="overrides look like"):
        parse_overrides(["positional"])


@dataclass
class WithOwnDefaults:
    train: Inner = field(default_factory=lambda: Inner(lr=0.5, schedule="linear"))
    """A section whose defaults differ from the section class's."""


def test_partial_override_keeps_the_parents_defaults_for_a_section():
    cfg = load_config(WithOwnDefaults, None, ["--train.layers=[9]"])
    assert (cfg.train.lr, cfg.train.schedule, cfg.train.layers) == (0.5, "linear", [9])


def test_cli_help_lists_every_command_with_its_description(capsys):
    """``vlalign --help``: one line per command, its name then its one-line description; every
    command's module exists (the list leaves out a command whose module is missing)."""
    import importlib.util

    from vlalign.cli import COMMANDS, main

    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, (module, doc) in COMMANDS.items():
        assert importlib.util.find_spec(module) is not None, module
        assert any(line.split()[:1] == [name] and line.rstrip().endswith(doc) for line in lines), name


def test_cli_output_into_a_closed_pipe_ends_quietly(tmp_path, monkeypatch):
    """``vlalign demo --help | head -1``: the reader stops early; the command exits 1, no traceback."""
    from vlalign.cli import main

    sink = open(tmp_path / "stdout", "w")  # stands in for the pipe's fd, which main redirects

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sink.fileno()

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["demo", "--help"]) == 1
    sink.close()
