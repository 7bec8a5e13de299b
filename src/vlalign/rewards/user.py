"""User reward functions: ``path/to/file.py:function`` or ``package.module:function``, options bound.

A rewards config may name a function of the user's besides the built-in ones
(:data:`vlalign.rewards.verifiable.REWARD_FUNCTIONS`): :func:`load_user_function` imports it
(a relative file path from ``base_dir``, usually the config file's folder, then from the working
directory) and :func:`bind_options` checks that ``fn(completion, sample, **options)`` is a valid
call before any step runs (a missing file, a missing or non-callable function, an option the
function does not take: one clear :class:`RewardConfigError`).

Two signatures are accepted, told apart by the function's parameters:

* per completion (vlalign's own): ``fn(completion: str, sample: PromptSample, **options) -> float``;
* batched, as TRL's ``GRPOTrainer`` calls a reward function (any function with a parameter named
  ``completions``): ``fn(prompts, completions, **kwargs) -> list[float]``, one call per batch
  (:class:`BatchedUserReward`). ``prompts[i]`` is the conversation (a list of
  ``{"role", "content"}`` messages), ``completions[i]`` is ``[{"role": "assistant", "content":
  text}]`` (TRL's conversational format), and every column of the data (a sample's ``meta``:
  ``answer``, ``task``, ...) and ``images`` come as keyword arguments holding one value per
  completion. A TRL user's reward file works unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
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

    A relative file path is looked up in ``base_dir`` (the config file's folder), then in the
    working directory; the error names both places when it is in neither.
    """
    target, sep, attr = spec_text.rpartition(":")
    if not sep or not target or not attr:
        raise RewardConfigError(
            f"reward {spec_text!r}: a user reward is written 'file.py:function' or 'package.module:function'"
        )
    if target.endswith(".py"):
        module = _load_file(_find_file(Path(target), base_dir, spec_text), spec_text)
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


def _find_file(path: Path, base_dir: str | Path | None, spec_text: str) -> Path:
    """``path`` if absolute, else the first of ``base_dir / path`` and ``cwd / path`` that exists."""
    if path.is_absolute():
        return path
    places = [Path(base_dir)] if base_dir else []
    places.append(Path.cwd())
    for place in places:
        if (place / path).is_file():
            return (place / path).resolve()
    tried = " or ".join(str((p / path).resolve()) for p in dict.fromkeys(places))
    raise RewardConfigError(
        f"reward {spec_text!r}: file not found: {tried} (a relative path is read from the config file's "
        "folder, then from the working directory)"
    )


def is_batched(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a batched (TRL-style) reward: one of its parameters is named ``completions``."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class BatchedUserReward:
    """A TRL-style reward ``fn(prompts, completions, **kwargs) -> list[float]`` as a batch scorer
    ``(samples, completions) -> list[float]`` (see the module docstring for what it receives)."""

    def __init__(self, fn: Callable[..., Any], name: str, options: Mapping[str, Any] | None = None) -> None:
        self.fn = fn
        self.name = name
        self.options = dict(options or {})
        params = inspect.signature(fn).parameters
        self.takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.accepted = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}
        self.required = {
            n
            for n, p in params.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        unknown = sorted(set(self.options) - self.accepted) if not self.takes_any else []
        if unknown:
            raise RewardConfigError(
                f"reward {name!r}: rewards.options gives {unknown}, which the function does not take "
                f"(its parameters are {list(params)})"
            )

    def arguments(self, samples: Sequence[PromptSample], completions: Sequence[str]) -> dict[str, Any]:
        """The keyword arguments of one call: prompts, completions, images and the data's columns."""
        columns = sorted({k for s in samples for k in s.meta})
        found: dict[str, Any] = {
            "prompts": [s.prompt for s in samples],
            "completions": [[{"role": "assistant", "content": c}] for c in completions],
            "images": [s.images for s in samples],
            **{k: [s.meta.get(k) for s in samples] for k in columns},
        }
        missing = sorted(self.required - set(found) - set(self.options))
        if missing:
            raise ValueError(
                f"it needs {missing}, which vlalign does not pass (it passes prompts, completions, images "
                f"and the data's columns: {columns})"
            )
        found.update(self.options)
        return found if self.takes_any else {k: v for k, v in found.items() if k in self.accepted}

    def __call__(self, samples: Sequence[PromptSample], completions: Sequence[str]) -> list[Any]:
        return list(self.fn(**self.arguments(samples, completions)))


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
                f"rewards.options), or, batched as in TRL, (prompts, completions, **kwargs); its parameters "
                f"are {list(signature.parameters)}"
            ) from None
    if not options:
        return fn

    def bound(completion: str, sample: PromptSample) -> float:
        return fn(completion, sample, **options)

    return bound
