"""`vlalign eval` never replaces an evaluation without being asked, and says so before loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlalign.commands import eval as eval_cmd
from vlalign.config import ConfigError, load_config


def test_an_existing_eval_json_is_kept_unless_overwrite(tmp_path: Path) -> None:
    """The model path does not exist: the refusal comes first (nothing loaded, the file unchanged);
    with --overwrite=true the command goes on and stops at the model instead."""
    (tmp_path / "eval.json").write_text('{"metrics": {}}\n')
    args = [f"--model={tmp_path / 'no-such-model'}", f"--output_dir={tmp_path}", "--trackers=[]"]
    with pytest.raises(ConfigError) as info:
        eval_cmd.run(load_config(eval_cmd.Config, None, args))
    assert str(info.value) == (
        f"{tmp_path / 'eval.json'} already exists; pass --overwrite=true to replace it, or choose another --output_dir"
    )
    assert (tmp_path / "eval.json").read_text() == '{"metrics": {}}\n'
    with pytest.raises(Exception) as info:
        eval_cmd.run(load_config(eval_cmd.Config, None, [*args, "--overwrite=true"]))
    assert "no-such-model" in str(info.value)


def test_a_missing_model_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^model: required"):
        eval_cmd.run(load_config(eval_cmd.Config, None, []))
