"""``vlalign <command> --help`` shows the defaults the command runs with; ``--print_config`` prints
the resolved config and loads nothing; ``--version``; config value errors are one line."""

from __future__ import annotations

import importlib
import re

import pytest
import yaml

from vlalign import __version__
from vlalign.cli import COMMANDS, main, resolved_config_text
from vlalign.config import fill_config_dir, format_help, load_config

OPTION = re.compile(r"^  --(?P<key>[\w.]+)  \((?P<type>.*), (?P<shown>required|default: (?P<default>.*))\)$")


def _value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_default_shown_in_help_is_the_default_the_command_runs_with(name):
    """Each ``--key (type, default: X)`` line of the help: X is the repr of that key in the config
    the command parses from no arguments; a key shown as required is one the command's Config lists
    in ``REQUIRED``. (Before the fix, grpo showed lr 0.0001, rollout.n 1, temperature 0.0.)"""
    module = importlib.import_module(COMMANDS[name][0])
    cfg = load_config(module.Config, None, [])
    required = set(getattr(module.Config, "REQUIRED", ()))
    lines = [m for m in map(OPTION.match, format_help(module.Config).splitlines()) if m]
    assert lines, name
    for m in lines:
        if m["shown"] == "required":
            assert m["key"] in required, m["key"]
        else:
            assert m["key"] not in required, m["key"]
            assert m["default"] == repr(_value(cfg, m["key"])), m["key"]


def test_grpo_help_shows_its_own_section_defaults(capsys):
    assert main(["grpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--train.lr  (float, default: 1e-05)" in out
    assert "--rollout.n  (int, default: 8)" in out
    assert "--rollout.temperature  (float, default: 1.0)" in out


def test_dpo_help_shows_data_train_as_required(capsys):
    assert main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--data.train  (str, required)" in out
    assert "shapes:train.jsonl" not in out.split("--data.train")[1].split("\n")[0]


def test_print_config_prints_the_resolved_config_and_loads_nothing(capsys, monkeypatch):
    """A model that does not exist: --print_config still exits 0 (nothing is loaded); the YAML reads
    back as the config, headed by the global batch 4 x 3 x WORLD_SIZE 2 = 24."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["--model.name_or_path=/no/such/model", "--train.batch_size=4", "--train.grad_accum=3"]
    assert main(["grpo", *args, "--print_config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# processes: 2; global batch: 24 ")
    printed = yaml.safe_load(out)
    assert printed["model"]["name_or_path"] == "/no/such/model" and printed["rollout"]["n"] == 8
    module = importlib.import_module(COMMANDS["grpo"][0])
    assert load_config(module.Config, None, args).train.lr == printed["train"]["lr"] == 1e-5


@pytest.mark.parametrize("name", list(COMMANDS))
def test_print_config_works_on_every_command(name, capsys, tmp_path):
    """Every command: the printed YAML, fed back with --config, gives the same config (with the config
    file's folder filled into the fields that take it, e.g. rewards.base_dir)."""
    assert main([name, "--print_config"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "c.yaml"
    path.write_text(out)
    module = importlib.import_module(COMMANDS[name][0])
    cfg = load_config(module.Config, None, [])
    fill_config_dir(cfg, tmp_path.resolve())
    again = load_config(module.Config, path)
    assert resolved_config_text(again) == resolved_config_text(cfg)


def test_dpo_print_config_lists_a_required_option_left_unset(capsys):
    assert main(["dpo", "--print_config"]) == 0
    assert "# required, not set: data.train" in capsys.readouterr().out


def test_a_semantic_value_error_is_one_line_naming_the_option(capsys):
    """``--loss.weights='{sigmod: 1.0}'`` was a 19-line traceback; now one line, the option and the
    valid names, before any model loads (the model path does not exist)."""
    code = main(["dpo", "--data.train=x.jsonl", "--model.name_or_path=/no/such", "--loss.weights={sigmod: 1.0}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "loss.weights" in err and "sigmod" in err and "'sigmoid'" in err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vlalign {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", __version__)
