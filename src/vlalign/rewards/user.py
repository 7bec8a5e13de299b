"""User reward functions: ``path/to/file.py:function`` or ``package.module:function``, options bound.

A rewards config may name a function of the user's besides the built-in ones
(:data:`vlalign.rewards.verifiable.REWARD_FUNCTIONS`): :func:`load_user_function` imports it
(relative file paths from ``base_dir``, usually the config file's folder) and
:func:`bind_options` checks that ``fn(completion, sample, **options)`` is a valid call before
any step runs (a missing file, a missing or non-callable function, an option the function does
not take: one clear :class:`RewardConfigError`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from vlalign.data.schema import PromptSample
from vlalign.errors import UserError


class RewardFunction(Protocol):
    """A reward of one completion: ``(completion, sample) -> float`` (options bound beforehand)."""

    def __call__(self, completion: str, sample: PromptSample) -> float: ...


class RewardConfigError(UserError, ValueError):
    """A rewards config cannot be built (unknown name, unloadable user function, bad option)."""


def _load_file(path: Path, spec_text: str) -> Any:
    if not path.is_file():
        raise RewardConfigError(f"reward {spec_text!r}: file not found: {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_vlalign_user_rewards_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardConfigError(f"reward {spec_text!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before running it: dataclasses in the file look it up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardConfigError(f"reward {spec_text!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_user_function(spec_text: str, *, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """The function named by ``"path/to/file.py:function"`` or ``"package.module:function"``.

    A relative file path is taken from ``base_dir`` (default: the working directory).
    """
    target, sep, attr = spec_text.rpartition(":")
    if not sep or not target or not attr:
        raise RewardConfigError(
            f"reward {spec_text!r}: a user reward is written 'file.py:function' or 'package.module:function'"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute():
            path = Path(base_dir or Path.cwd()) / path
        module = _load_file(path.resolve(), spec_text)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise RewardConfigError(f"reward {spec_text!r}: cannot import module {target!r}: {exc}") from exc
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardConfigError(f"reward {spec_text!r}: {target} has no function {attr!r} (it defines: {found})")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardConfigError(f"reward {spec_text!r}: {target}:{attr} is a {type(fn).__name__}, not a function")
    return fn


def bind_options(fn: Callable[..., Any], name: str, options: Mapping[str, Any] | None) -> RewardFunction:
    """``fn`` with ``options`` bound as keyword arguments, after checking that
    ``fn(completion, sample, **options)`` is a valid call."""
    options = dict(options or {})
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: trust them
        signature = None
    if signature is not None:
        try:
            signature.bind("", None, **options)
        except TypeError as exc:
            call = f"fn(completion, sample{', ' if options else ''}{', '.join(f'{k}=...' for k in options)})"
            raise RewardConfigError(
                f"reward {name!r}: cannot be called as {call}: {exc}. A reward function takes "
                f"(completion, sample) and its options as keyword arguments (set under "
                f"rewards.options); its parameters are {list(signature.parameters)}"
            ) from None
    if not options:
        return fn

    def bound(completion: str, sample: PromptSample) -> float:
        return fn(completion, sample, **options)

    return bound
