"""Reading the benchmarks' published JSON files with errors that say where the problem is.

Every reader in this subpackage goes through :func:`read_json_records` (JSON Lines, or one JSON
array of objects, as the benchmarks publish them) or :func:`read_json_document`, and checks
fields with :func:`require`. A problem raises :class:`BenchmarkFileError` naming the file, the
line (1-based, of the record's first character) and the column (the field), before any metric
is computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlalign.errors import UserError


class BenchmarkFileError(UserError, ValueError):
    """A benchmark file that cannot be read as its format says: file, line and column named."""

    def __init__(self, path: str | Path, message: str, *, line: int | None = None, column: str | None = None):
        self.path = str(path)
        self.line = line
        self.column = column
        where = self.path if line is None else f"{self.path}, line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Row:
    """One JSON object of a file and where it starts (``line`` 1-based)."""

    path: str
    line: int
    value: dict[str, Any]


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchmarkFileError(path, "no such file") from None
    except UnicodeDecodeError as exc:
        raise BenchmarkFileError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_json_document(path: str | Path) -> Any:
    """The single JSON value of a file; a syntax error names the file, line and column."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkFileError(
            path, f"invalid JSON: {exc.msg} (character column {exc.colno})", line=exc.lineno
        ) from None


def _array_rows(path: str | Path, text: str, start: int) -> list[Row]:
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    i = start + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == "]":
            return rows
        if rows:
            if i >= n or text[i] != ",":
                raise BenchmarkFileError(path, "expected ',' or ']' between array items", line=_line_of(text, i))
            i += 1
            while i < n and text[i] in " \t\r\n":
                i += 1
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise BenchmarkFileError(path, f"invalid JSON: {exc.msg}", line=exc.lineno) from None
        rows.append(Row(str(path), _line_of(text, i), value))
        i = end


def read_json_records(path: str | Path) -> list[Row]:
    """The objects of a JSON Lines file, or of a file holding one JSON array, with their lines.

    Blank lines of a JSON Lines file are skipped. Each value must be an object.
    """
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = _array_rows(path, text, len(text) - len(stripped))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkFileError(
                    path, f"invalid JSON: {exc.msg} (character column {exc.colno})", line=number
                ) from None
            rows.append(Row(str(path), number, value))
    for row in rows:
        if not isinstance(row.value, dict):
            raise BenchmarkFileError(path, f"expected a JSON object, got {type(row.value).__name__}", line=row.line)
    return rows


_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", float: "a number"}


def require(row: Row, field: str, kind: type | tuple[type, ...], *, choices: tuple[Any, ...] | None = None) -> Any:
    """The value of ``field`` in ``row``, checked to be of ``kind`` (bool is never an int) and in ``choices``."""
    if field not in row.value:
        raise BenchmarkFileError(row.path, "missing field", line=row.line, column=field)
    value = row.value[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise BenchmarkFileError(
            row.path, f"expected {wanted}, got {json.dumps(value)[:60]}", line=row.line, column=field
        )
    if choices is not None and value not in choices:
        allowed = ", ".join(json.dumps(c) for c in choices)
        raise BenchmarkFileError(
            row.path, f"expected one of {allowed}, got {json.dumps(value)[:60]}", line=row.line, column=field
        )
    return value


def safe_ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN where the denominator is 0 (where the official scripts raise)."""
    return numerator / denominator if denominator else float("nan")
