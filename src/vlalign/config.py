"""Typed configs: dataclasses documented where they are declared, YAML files, dotted overrides.

A config is a dataclass whose fields carry an *attribute docstring* (a string literal on the line
after the field). Those docstrings are the documentation that ``vlalign <recipe> --help`` prints::

    @dataclass
    class OptimConfig:
        lr: float = 1e-4
        \"\"\"Peak learning rate of AdamW.\"\"\"

Sections nest (a field whose type is a dataclass). A run's config comes from, in order: the
dataclass defaults, a YAML file (``--config run.yaml``), then command-line overrides
``--section.field=value`` (or ``--section.field value``). Values are parsed as YAML scalars or
lists and coerced to the declared type. Unknown keys are errors that name the key and suggest the
nearest valid one; a value of the wrong type names the field and the expected type.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from vlalign.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and the problem."""


# ----------------------------------------------------------------------------- documentation


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (and its dataclass bases), keyed by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def format_help(cls: type | Any, prefix: str = "", *, required: frozenset[str] | None = None) -> str:
    """Every field of ``cls`` (nested sections included) with its type, default and docstring.

    The defaults shown are those of an instance, ``cls()`` (or ``cls`` itself when it is one), read
    section by section from that instance: a recipe that gives a shared section its own defaults
    (``train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5))``) shows those,
    the values its run starts from. Fields a command needs but cannot default (the names in its
    ``REQUIRED`` class attribute, e.g. ``("data.train",)``) are shown as required.
    """
    klass = cls if isinstance(cls, type) else type(cls)
    instance = cls if not isinstance(cls, type) else default_instance(cls)
    if required is None:
        required = frozenset(getattr(klass, "REQUIRED", ()))
    lines: list[str] = []
    docs = field_docs(klass)
    hints = _hints(klass)
    for f in dataclasses.fields(klass):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        value = getattr(instance, f.name) if instance is not None else _default_of(f)
        if dataclasses.is_dataclass(tp):
            section_doc = docs.get(f.name, "")
            lines.append(f"\n[{key}]" + (f"  {section_doc}" if section_doc else ""))
            section = value if dataclasses.is_dataclass(value) else tp
            lines.append(format_help(section, prefix=f"{key}.", required=required))
            continue
        shown = "required" if key in required or value == "<required>" else f"default: {value!r}"
        lines.append(f"  --{key}  ({_type_name(tp)}, {shown})")
        for doc_line in docs.get(f.name, "(undocumented)").splitlines():
            lines.append(f"      {doc_line}")
    return "\n".join(lines)


def default_instance(cls: type[T]) -> T | None:
    """``cls()`` (the defaults a command runs with), or None when some field has no default."""
    try:
        return cls()
    except (TypeError, ValueError):
        return None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "<required>"


# ----------------------------------------------------------------------------- building


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "", base: Any = None) -> T:
    """Build dataclass ``cls`` from a nested dict, coercing values to the declared types.

    Fields absent from ``data`` keep their value in ``base`` (an instance of ``cls``), or the
    dataclass default; a nested section starts from its parent's default for it (so a recipe's
    own defaults for a shared section survive a partial override).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(_unknown_key_message(cls, where, key))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{where}{f.name}"
        tp = hints[f.name]
        if base is not None:
            current = getattr(base, f.name)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            current = _default_of(f)
        else:
            current = dataclasses.MISSING
        if f.name not in data:
            if current is not dataclasses.MISSING:
                kwargs[f.name] = current
            continue
        if dataclasses.is_dataclass(tp):
            child_base = current if dataclasses.is_dataclass(current) else None
            kwargs[f.name] = from_dict(tp, data[f.name] or {}, where=f"{key}.", base=child_base)
        else:
            kwargs[f.name] = coerce(data[f.name], tp, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {exc}") from exc


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], prefix + f.name + "."))
    return keys


def _unknown_key_message(cls: type, where: str, key: str) -> str:
    full = f"{where}{key}"
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        hint = f"; did you mean '{where}{close[0]}'?"
    else:  # maybe the key belongs to a nested section: --lr for --train.lr
        nested = [k for k in _all_keys(cls) if k.rsplit(".", 1)[-1] == key]
        hint = f"; did you mean '{where}{nested[0]}'?" if nested else ""
    return f"unknown config key '{full}'{hint} (valid keys here: {', '.join(valid)})"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to type ``tp``; errors name ``key``.

    Text fields keep words as words: a command-line value reaches a ``str`` field (or a ``Literal``
    of strings) as typed (``--train.mixed_precision=no`` is ``"no"``, not YAML's false), and a YAML
    file's ``no`` / ``off`` / ``null`` / ``1.5`` becomes the text a Literal allows or the number's text.
    """
    origin = get_origin(tp)
    if isinstance(value, Typed) and origin not in (Union, types.UnionType):  # a union's members choose
        value = value.text if _wants_text(tp) else value.value
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if isinstance(value, Typed) and value.value is None and type(None) in args:
            return None
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        shown = value.text if isinstance(value, Typed) else value
        raise ConfigError(f"{key}: {shown!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if not isinstance(value, str) and all(isinstance(c, str) for c in choices):
            value = _yaml_word(value, choices)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {coerce(k, k_tp, key): coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """:func:`coerce` for bool, int, float, str, Path and plain classes."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value if isinstance(value, str) else _yaml_word(value, ())
    if tp is Path:
        return Path(str(value))
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot use {value!r} as {_type_name(tp)}")


class Typed:
    """A command-line value: the text as typed and its YAML reading (``"no"`` and False)."""

    def __init__(self, text: str, value: Any) -> None:
        self.text = text
        self.value = value

    def __repr__(self) -> str:
        return repr(self.text)


def _wants_text(tp: Any) -> bool:
    """Whether a field of type ``tp`` takes the typed text rather than its YAML reading."""
    if tp is str or tp is Path:
        return True
    return get_origin(tp) is Literal and all(isinstance(c, str) for c in get_args(tp))


_YAML_WORDS: dict[Any, tuple[str, ...]] = {
    False: ("no", "off", "false", "n"),
    True: ("yes", "on", "true", "y"),
    None: ("none", "null", ""),
}


def _yaml_word(value: Any, choices: tuple[Any, ...]) -> Any:
    """A YAML reading turned back into text: False -> the first of no/off/false among ``choices``
    (``choices`` empty: "false"), None -> none/null/"" (empty: ""), a number -> its text. Anything else
    (or no word allowed) comes back unchanged, for the caller's error."""
    if isinstance(value, bool) or value is None:
        words = _YAML_WORDS[value]
        if not choices:
            return "" if value is None else str(value).lower()
        return next((w for w in words if w in choices), value)
    if isinstance(value, (int, float)) and not choices:
        return str(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config (paths become strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


# ----------------------------------------------------------------------------- the command line


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--a.b=1", "--c", "x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    return _plain(override_tree(args))


def override_tree(args: list[str]) -> dict[str, Any]:
    """:func:`parse_overrides` keeping each scalar as :class:`Typed` (its text and its YAML reading), so
    that a text field receives what was typed."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.field=value")
        body = arg[2:]
        if "=" in body:
            dotted, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            dotted, raw = body, args[i + 1]
            i += 1
        else:
            dotted, raw = body, "true"  # a bare flag switches a boolean on
        i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, dotted.replace("-", "_"), value if isinstance(value, (dict, list)) else Typed(raw, value))
    return out


def _plain(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return tree.value if isinstance(tree, Typed) else tree


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of ``update`` win; nested mappings merge."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``--dotted.key=value`` overrides.

    With a file, every field declared with ``metadata={CONFIG_DIR: True}`` that is left empty
    (e.g. ``rewards.base_dir``) is set to the file's folder, so that paths written in the file can
    be read relative to it.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    if overrides:
        data = merge(data, override_tree(overrides))
    cfg = from_dict(cls, data)
    if path is not None:
        fill_config_dir(cfg, Path(path).resolve().parent)
    return cfg


CONFIG_DIR = "vlalign_config_dir"
"""Field metadata key: a ``str`` field so marked, left '', receives the config file's folder."""


def fill_config_dir(cfg: Any, folder: Path) -> None:
    """Set every empty field of ``cfg`` (nested sections included) marked with :data:`CONFIG_DIR` to ``folder``."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            fill_config_dir(value, folder)
        elif f.metadata.get(CONFIG_DIR) and value == "":
            setattr(cfg, f.name, str(folder))


def did_you_mean(name: str, choices: Any) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``name``, or "" when none is close."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class StrictFields:
    """Mixin of config dataclasses: setting a name that is not a field raises ``AttributeError``
    naming the closest field (``cfg.train.max_stpes = 2`` would otherwise be silently ignored).
    Names starting with ``_`` stay free for private state."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        fields = getattr(type(self), "__dataclass_fields__", None)
        if fields is not None and name not in fields and not name.startswith("_"):
            raise AttributeError(
                f"{type(self).__name__} has no field {name!r}{did_you_mean(name, fields)} (fields: {', '.join(fields)})",
                name=name,
                obj=self,
            )
        super().__setattr__(name, value)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML (what a run used, beside its outputs)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
