"""Configs: YAML + dotted overrides, type coercion, unknown keys, --help text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from vlalign.config import CONFIG_DIR, ConfigError, StrictFields, format_help, load_config, parse_overrides, to_dict


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


# ----------------------------------------------------------------------------- words stay words


@dataclass
class Words:
    precision: Literal["auto", "no", "bf16"] = "auto"
    """A Literal that holds the word 'no'."""
    switch: Literal["on", "off"] = "on"
    """A Literal of on / off."""
    name: str = "x"
    """A free text."""
    version: str = ""
    """A text that looks like a number."""


def test_text_options_keep_the_words_typed_on_the_command_line():
    """YAML reads ``no`` / ``off`` as false, ``null`` as None and ``1.10`` as 1.1: a text field gets the text
    as typed instead (``--train.mixed_precision=no`` was rejected)."""
    cfg = load_config(Words, None, ["--precision=no", "--switch=off", "--name=null", "--version=1.10"])
    assert (cfg.precision, cfg.switch, cfg.name, cfg.version) == ("no", "off", "null", "1.10")
    assert load_config(Outer, None, ["--name=yes"]).name == "yes"
    assert load_config(Outer, None, ["--limit=null"]).limit is None  # int | None still reads null as None


def test_text_options_from_a_yaml_file_map_booleans_back_to_allowed_words(tmp_path):
    """From a file only YAML's reading is there: false -> the Literal's 'no' (or 'off'); in a free
    text field false -> 'false', an empty value -> '', a number -> its text."""
    path = tmp_path / "c.yaml"
    path.write_text("precision: no\nswitch: off\nname: false\nversion:\n")
    cfg = load_config(Words, path)
    assert (cfg.precision, cfg.switch, cfg.name, cfg.version) == ("no", "off", "false", "")
    path.write_text("version: 2\n")
    assert load_config(Words, path).version == "2"
    with pytest.raises(ConfigError, match=r"precision: True is not one of"):
        load_config(Words, _yaml(tmp_path, "precision: yes"))  # no word for true among the choices


def _yaml(tmp_path, text):
    path = tmp_path / "w.yaml"
    path.write_text(text + "\n")
    return path


def test_mixed_precision_no_works_on_the_real_train_section():
    from vlalign.training import TrainConfig

    assert load_config(TrainConfig, None, ["--mixed_precision=no"]).mixed_precision == "no"


# ----------------------------------------------------------------------------- unknown fields from Python


@dataclass
class StrictInner(StrictFields):
    max_steps: int = 1
    """Steps."""


def test_setting_a_misspelt_field_raises_naming_the_close_match():
    inner = StrictInner()
    inner.max_steps = 3
    assert inner.max_steps == 3
    with pytest.raises(AttributeError, match=r"StrictInner has no field 'max_stpes'; did you mean 'max_steps'\?"):
        inner.max_stpes = 2  # type: ignore[attr-defined]
    inner._private = 1  # private state stays free


def test_recipe_configs_reject_unknown_fields():
    from vlalign.recipes import dpo, grpo

    cfg = dpo.Config()
    with pytest.raises(AttributeError, match=r"did you mean 'max_steps'"):
        cfg.train.max_stpes = 2
    with pytest.raises(AttributeError, match=r"did you mean 'loss'"):
        cfg.los = None
    with pytest.raises(AttributeError, match=r"did you mean 'weights'"):
        grpo.Config().rewards.weight = {}
    assert load_config(dpo.Config, None, ["--train.max_steps=2"]).train.max_steps == 2  # the loader still works


# ----------------------------------------------------------------------------- the config file's folder


@dataclass
class WithFolder:
    base_dir: str = field(default="", metadata={CONFIG_DIR: True})
    """Filled with the config file's folder."""
    train: Inner = field(default_factory=Inner)
    """A section."""


def test_fields_marked_config_dir_receive_the_config_files_folder(tmp_path):
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text("train: {lr: 0.5}\n")
    assert load_config(WithFolder, path).base_dir == str(path.parent.resolve())
    assert load_config(WithFolder, path, ["--base_dir=/elsewhere"]).base_dir == "/elsewhere"
    assert load_config(WithFolder, None, []).base_dir == ""
