"""Guarded reward calls: time limits, and errors that name the function and the sample.

Every call of a reward function is guarded (:func:`call_reward`): a reward that raises, returns
something other than a finite real number (a string, None, NaN, inf), or runs past its time limit
stops the step with a :class:`RewardError` naming the function and the sample; never a silent zero.

Time limits (:func:`call_with_timeout`). In the main thread on Linux/macOS, ``SIGALRM`` through
``setitimer``: the limit interrupts Python code, ``time.sleep`` and ``re`` matching, but a call
stuck inside C code that never returns to the interpreter is only stopped when it does; the
SIGALRM handler is borrowed for the call and restored, and the guard falls back to threads if a
real-time timer is already armed. Elsewhere (other threads, Windows), a daemon thread per call: the
step stops on time, but the timed-out call keeps running in the background until it ends (Python
cannot kill a thread). Batched scorers (reward models) run without a time limit.
"""

from __future__ import annotations

import math
import numbers
import signal
import threading
from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor

from vlalign.data.schema import PromptSample
from vlalign.errors import UserError
from vlalign.rewards.user import RewardFunction
from vlalign.rewards.verifiable import sample_id

# ----------------------------------------------------------------------------- errors


class RewardError(UserError, RuntimeError):
    """A reward function failed on a sample; ``function`` and ``sample_id`` say which."""

    def __init__(self, message: str, *, function: str, sample_id: str | None) -> None:
        super().__init__(message)
        self.function = function
        self.sample_id = sample_id


class RewardTimeout(BaseException):
    """Raised inside a timed call when its time is up (a BaseException, so ``except Exception``
    in user code cannot swallow it)."""


# ----------------------------------------------------------------------------- time limits


def _signal_usable() -> bool:
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    return signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


def _call_with_alarm(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
    def on_alarm(signum: int, frame: Any) -> None:
        raise RewardTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0.0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _call_in_thread(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    worker = threading.Thread(target=target, name="vlalign-reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeout
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_with_timeout(
    fn: Callable[..., Any],
    *args: Any,
    timeout_s: float | None,
    mode: Literal["auto", "signal", "thread"] = "auto",
) -> Any:
    """``fn(*args)``, raising :class:`RewardTimeout` after ``timeout_s`` seconds (None or 0: no limit).

    ``mode="auto"`` uses SIGALRM where it can (main thread, a platform with ``setitimer``, no
    timer armed) and a daemon thread elsewhere; see the module docstring for the limits of each.
    """
    if timeout_s is None or timeout_s <= 0:
        return fn(*args)
    if mode == "signal" and not _signal_usable():
        raise RuntimeError("signal-based time limits need the main thread, setitimer and no armed ITIMER_REAL")
    if mode == "signal" or (mode == "auto" and _signal_usable()):
        return _call_with_alarm(fn, args, timeout_s)
    return _call_in_thread(fn, args, timeout_s)


# ----------------------------------------------------------------------------- guarded calls


def _shorten(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def as_reward_value(value: Any, *, function: str, sample: Any) -> float:
    """``value`` as a finite float, or a :class:`RewardError` naming the function and the sample.

    Accepts real numbers (``bool``, ``int``, ``float``, NumPy scalars) and one-element tensors.
    """
    where = f"reward function {function!r} on sample {sample_id(sample)!r}"
    if isinstance(value, (Tensor,)) and value.numel() == 1:
        value = value.detach().reshape(()).cpu().tolist()
    if not isinstance(value, numbers.Real):
        raise RewardError(
            f"{where} returned {_shorten(repr(value))} ({type(value).__name__}), not a number; "
            "a reward function must return a float",
            function=function,
            sample_id=sample_id(sample),
        )
    out = float(value)
    if not math.isfinite(out):
        raise RewardError(
            f"{where} returned {out}; rewards must be finite numbers", function=function, sample_id=sample_id(sample)
        )
    return out


def call_reward(
    fn: RewardFunction,
    name: str,
    completion: str,
    sample: PromptSample,
    *,
    timeout_s: float | None = None,
    mode: Literal["auto", "signal", "thread"] = "auto",
) -> float:
    """``fn(completion, sample)`` checked: an exception, a non-number, NaN/inf or a timeout becomes
    a :class:`RewardError` whose message names ``name``, the sample id and the completion."""
    sid = sample_id(sample)
    try:
        value = call_with_timeout(fn, completion, sample, timeout_s=timeout_s, mode=mode)
    except RewardTimeout:
        raise RewardError(
            f"reward function {name!r} timed out after {timeout_s} s on sample {sid!r} "
            f"(completion {_shorten(completion)}); make it faster or raise rewards.timeout_s",
            function=name,
            sample_id=sid,
        ) from None
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(
            f"reward function {name!r} raised {type(exc).__name__} on sample {sid!r} "
            f"(completion {_shorten(completion)}): {exc}",
            function=name,
            sample_id=sid,
        ) from exc
    return as_reward_value(value, function=name, sample=sample)
