"""docs/benchmarks-official.md stays true to the code: every `vlalign eval` and `vlalign compare`
command on the page parses into the command's config (every option is a real field, every value
of the right type), and every option the text names exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from vlalign.commands import compare as compare_command
from vlalign.commands import eval as eval_command
from vlalign.config import load_config

PAGE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks-official.md"


def _commands(name: str) -> list[list[str]]:
    """The argument lists of the page's `vlalign <name>` commands (continuation lines joined)."""
    text = PAGE.read_text(encoding="utf-8").replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith(f"vlalign {name} ")]


@pytest.mark.parametrize("args", _commands("eval"), ids=lambda a: " ".join(a)[:60])
def test_eval_commands_parse(args: list[str]) -> None:
    cfg = load_config(eval_command.Config, None, args)
    assert cfg.bench in ("pope", "chair", "amber") and cfg.images


def test_every_command_kind_is_shown_and_options_named_in_the_text_exist() -> None:
    assert {load_config(eval_command.Config, None, a).bench for a in _commands("eval")} == {"pope", "chair", "amber"}
    for args in _commands("compare"):
        positional = [f"--{n}={v}" for n, v in zip(compare_command.POSITIONAL, args) if not v.startswith("--")]
        load_config(compare_command.Config, None, positional + [a for a in args if a.startswith("--")])
    named = set(re.findall(r"`--((?:pope|chair|amber)\.\w+)", PAGE.read_text(encoding="utf-8")))
    assert len(named) > 15
    for option in named:
        section, field = option.split(".")
        assert hasattr(getattr(eval_command.Config(), section), field), option
