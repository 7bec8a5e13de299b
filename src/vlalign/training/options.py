"""Checks of option values, run before any model or data is loaded: each failure is a
:class:`~vlalign.config.ConfigError` naming the option, its rule and its value
(``train.batch_size: must be > 0, got 0``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vlalign.config import ConfigError


def check_options(prefix: str, checks: list[tuple[str, bool, str]], *, values: Any) -> None:
    """Raise a :class:`~vlalign.config.ConfigError` for the first failed ``(field, ok, rule)``:
    ``"train.batch_size: must be > 0, got 0"``."""
    for name, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{prefix}.{name}: {rule}, got {getattr(values, name)!r}")


def validate_config(config: Any, train: Any) -> None:
    """Call ``validate(prefix)`` of ``train`` and of every section of ``config`` that has one."""
    train.validate("train")
    if config is None or not dataclasses.is_dataclass(config):
        return
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if section is not train and callable(getattr(section, "validate", None)):
            section.validate(f.name)


def check_input_files(config: Any) -> None:
    """Call ``check_files(prefix)`` of every section of ``config`` that has one: the files a run
    reads exist (after every option value was checked; ``--print_config`` does not ask)."""
    if config is None or not dataclasses.is_dataclass(config):
        return
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if callable(getattr(section, "check_files", None)):
            section.check_files(f.name)
