"""Reward functions by config: the registry, user functions, guarded calls, weighted combination.

A rewards config names reward functions with weights::

    rewards:
      weights: {count_match: 1.0, format: 0.2, my_rewards.py:brevity: 0.1}
      options: {overlong_penalty: {max_length: 64, cache_length: 16}}
      tasks: {count_match: [counting]}     # optional: the tasks a reward scores
      timeout_s: 5

A name is a key of :data:`vlalign.rewards.verifiable.REWARD_FUNCTIONS`, a user function
``path/to/file.py:function`` (relative paths from ``base_dir``, usually the config file's folder)
or ``package.module:function``, or the name of a batched scorer (a reward model) that the recipe
passes in ``scorers``. :func:`build_reward` checks every name and its options at once (a missing
file, a missing or non-callable function, an option the function does not take: one clear error);
the returned :class:`CombinedReward` scores a batch into the weighted total plus each function's
own values, whose metrics are ``rewards/<name>/mean`` and ``rewards/<name>/std``.

Several tasks in one run (``tasks``): a reward named there scores only the samples whose task
(:func:`vlalign.eval.tasks.task_of`, the ``task`` column) is one of its tasks, and gives 0 to the
others without being called. So a reward model trained on descriptions scores the descriptions,
and a verifiable reward the short answers, in the same batch. Its metrics are over the samples it
scored (absent from a step where it scored none). When every reward is restricted, a sample that
none of them scores is an error, not a zero.

Every call is guarded (:func:`call_reward`): a reward that raises, returns something other than a
finite real number (a string, None, NaN, inf), or runs past ``timeout_s`` stops the step with a
:class:`RewardError` naming the function and the sample; never a silent zero.

Time limits (:func:`call_with_timeout`). In the main thread on Linux/macOS, ``SIGALRM`` through
``setitimer``: the limit interrupts Python code, ``time.sleep`` and ``re`` matching, but a call
stuck inside C code that never returns to the interpreter is only stopped when it does; the
SIGALRM handler is borrowed for the call and restored, and the guard falls back to threads if a
real-time timer is already armed. Elsewhere (other threads, Windows), a daemon thread per call: the
step stops on time, but the timed-out call keeps running in the background until it ends (Python
cannot kill a thread). Batched scorers (reward models) run without a time limit.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from vlalign.data.schema import Message, PromptSample, data_error
from vlalign.rewards.verifiable import REWARD_FUNCTIONS, require_meta, sample_id
from vlalign.shapes.world import COLOUR_RGB, SHAPE_PLURALS, caption_from_counts

# ----------------------------------------------------------------------------- protocols and errors


class RewardFunction(Protocol):
    """A reward of one completion: ``(completion, sample) -> float`` (options bound beforehand)."""

    def __call__(self, completion: str, sample: PromptSample) -> float: ...


class BatchScorer(Protocol):
    """Rewards of a batch: ``(samples, completions) -> one float per pair`` (e.g. a reward model).

    ``samples[i]`` is the prompt that ``completions[i]`` answers (repeat a prompt for its G
    completions). The same protocol serves sample-and-rank and the win-rate metric.
    """

    def __call__(self, samples: Sequence[PromptSample], completions: Sequence[str]) -> Sequence[float]: ...


class RewardConfigError(ValueError):
    """A rewards config cannot be built (unknown name, unloadable user function, bad option)."""


class RewardError(RuntimeError):
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


# ----------------------------------------------------------------------------- resolving names


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


def metric_name(name: str) -> str:
    """The name a reward's metrics go under: the function part of ``file.py:function``."""
    return name.rpartition(":")[2] if ":" in name else name


# ----------------------------------------------------------------------------- combination


@dataclass
class RewardScores:
    """Rewards of a batch of N completions."""

    total: Tensor
    """``(N,)`` Σ_k weight_k · values[k]."""
    values: dict[str, Tensor]
    """Each function's own (unweighted) values, ``(N,)``, keyed by metric name (0 where it did not score)."""
    weights: dict[str, float]
    """Each function's weight, keyed by metric name."""
    scored: dict[str, Tensor] = field(default_factory=dict)
    """``(N,)`` bool: which completions a task-restricted function scored (absent: all of them)."""

    def metrics(self) -> dict[str, Tensor]:
        """``rewards/<name>/mean`` and ``/std`` (population std) per function, over the completions it
        scored, and for the total."""
        out: dict[str, Tensor] = {}
        for name, values in [*self.values.items(), ("total", self.total)]:
            if name in self.scored:
                values = values[self.scored[name]]
                if values.numel() == 0:
                    continue
            out[f"rewards/{name}/mean"] = values.mean()
            out[f"rewards/{name}/std"] = values.std(correction=0) if values.numel() > 1 else values.new_zeros(())
        return out


@dataclass
class CombinedReward:
    """Weighted sum of reward functions and batched scorers, each call guarded."""

    functions: dict[str, RewardFunction]
    """Per-completion reward functions (options bound), keyed by metric name."""
    scorers: dict[str, BatchScorer]
    """Batched scorers (reward models), keyed by metric name."""
    weights: dict[str, float]
    """Weight of every function and scorer (0: computed and logged, not added to the total)."""
    timeout_s: float | None = 10.0
    """Time limit of one reward-function call in seconds (None: no limit)."""
    mode: Literal["auto", "signal", "thread"] = "auto"
    """How time limits are enforced (see :func:`call_with_timeout`)."""
    tasks: dict[str, frozenset[str]] = field(default_factory=dict)
    """Metric name -> the sample tasks it scores; a function not named here scores every sample."""

    def _scored(self, name: str, samples: Sequence[PromptSample]) -> list[bool] | None:
        """Which samples ``name`` scores (None: all), by the task that ``grpo.tasks`` / ``ppo.tasks`` filter on."""
        if name not in self.tasks:
            return None
        from vlalign.eval.tasks import task_of  # here: vlalign.eval.tasks imports vlalign.rewards

        return [task_of(s) in self.tasks[name] for s in samples]

    def __call__(
        self, samples: Sequence[PromptSample], completions: Sequence[str], *, dtype: torch.dtype = torch.float32
    ) -> RewardScores:
        """Score ``completions[i]`` against ``samples[i]`` with every function and scorer."""
        if len(samples) != len(completions):
            raise ValueError(
                f"{len(samples)} samples but {len(completions)} completions; pass one sample per completion"
            )
        values: dict[str, Tensor] = {}
        scored: dict[str, Tensor] = {}
        for name in [*self.functions, *self.scorers]:
            mask = self._scored(name, samples)
            keep = range(len(samples)) if mask is None else [i for i, m in enumerate(mask) if m]
            sub_s, sub_c = [samples[i] for i in keep], [completions[i] for i in keep]
            if name in self.functions:
                found = [
                    call_reward(self.functions[name], name, c, s, timeout_s=self.timeout_s, mode=self.mode)
                    for s, c in zip(sub_s, sub_c)
                ]
            else:
                found = self._score_batch(name, self.scorers[name], sub_s, sub_c) if keep else []
            v = torch.zeros(len(samples), dtype=torch.float64)  # (N,)
            v[list(keep)] = torch.tensor(found, dtype=torch.float64)
            values[name] = v
            if mask is not None:
                scored[name] = torch.tensor(mask, dtype=torch.bool)
        if scored and len(scored) == len(values):  # every reward is task-restricted: none may leave a sample out
            unscored = [i for i in range(len(samples)) if not any(bool(m[i]) for m in scored.values())]
            if unscored:
                from vlalign.eval.tasks import task_of

                s = samples[unscored[0]]
                raise RewardError(
                    f"no reward scores sample {sample_id(s)!r} (task {task_of(s)!r}): "
                    f"rewards.tasks names only {sorted(set().union(*self.tasks.values()))}",
                    function="rewards.tasks",
                    sample_id=sample_id(s),
                )
        total = torch.zeros(len(completions), dtype=torch.float64)  # (N,)
        for name, v in values.items():
            total = total + self.weights[name] * v
        return RewardScores(
            total=total.to(dtype),
            values={k: v.to(dtype) for k, v in values.items()},
            weights=dict(self.weights),
            scored=scored,
        )

    @staticmethod
    def _score_batch(
        name: str, scorer: BatchScorer, samples: Sequence[PromptSample], completions: Sequence[str]
    ) -> list[float]:
        try:
            raw = scorer(samples, completions)
        except Exception as exc:
            ids = [sample_id(s) for s in samples[:4]]
            raise RewardError(
                f"reward scorer {name!r} raised {type(exc).__name__} on a batch of {len(samples)} "
                f"(samples {ids}...): {exc}",
                function=name,
                sample_id=None,
            ) from exc
        if isinstance(raw, Tensor):
            raw = raw.detach().cpu().reshape(-1).tolist()
        if len(raw) != len(completions):
            raise RewardError(
                f"reward scorer {name!r} returned {len(raw)} scores for {len(completions)} completions",
                function=name,
                sample_id=None,
            )
        return [as_reward_value(v, function=name, sample=s) for v, s in zip(raw, samples)]


@dataclass
class RewardsConfig:
    """Which rewards a recipe optimises, and how they are called."""

    weights: dict[str, float] = field(default_factory=lambda: {"shapes_answer": 1.0})
    """Reward name -> weight. Names: exact_match, answer_tag, format, count_match, colour_match,
    yes_no_match, object_f1, shapes_answer, box_iou, threshold_score, overlong_penalty; a user
    function 'file.py:function' or 'package.module:function' called as fn(completion, sample);
    or a reward model the recipe provides. Weight 0 logs a reward without optimising it."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Reward name -> keyword options, e.g. {overlong_penalty: {max_length: 64, cache_length: 16}}."""
    tasks: dict[str, list[str]] = field(default_factory=dict)
    """Reward name -> the tasks (a sample's task column) it scores, e.g. {reward_model: [describe],
    shapes_answer: [colour, existence]}; it gives 0 to other samples. A reward not named: every sample."""
    timeout_s: float = 10.0
    """Time limit of one reward call in seconds; a slower call stops the step (0: no limit)."""


def build_reward(
    weights: Mapping[str, float],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    scorers: Mapping[str, BatchScorer] | None = None,
    timeout_s: float | None = 10.0,
    base_dir: str | Path | None = None,
    mode: Literal["auto", "signal", "thread"] = "auto",
    tasks: Mapping[str, Sequence[str]] | None = None,
) -> CombinedReward:
    """Resolve every reward name of ``weights`` (see the module docstring) into a :class:`CombinedReward`."""
    options = dict(options or {})
    scorers = dict(scorers or {})
    tasks = dict(tasks or {})
    if not weights:
        raise RewardConfigError("rewards.weights is empty: name at least one reward, e.g. {count_match: 1.0}")
    for section, names in (("options", options), ("tasks", tasks)):
        unused = sorted(set(names) - set(weights))
        if unused:
            raise RewardConfigError(
                f"rewards.{section} names {unused}, which are not in rewards.weights ({sorted(weights)})"
            )
    for name, listed in tasks.items():
        if isinstance(listed, str) or not listed or not all(isinstance(t, str) and t for t in listed):
            raise RewardConfigError(f"rewards.tasks.{name}: give a non-empty list of task names, got {listed!r}")
    functions: dict[str, RewardFunction] = {}
    batch: dict[str, BatchScorer] = {}
    out_weights: dict[str, float] = {}
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise RewardConfigError(f"rewards.weights.{name}: {weight!r} is not a finite number")
        key = metric_name(name)
        if key in out_weights:
            raise RewardConfigError(f"rewards.weights: {name!r} and another reward both log as {key!r}; rename one")
        if name in scorers:
            if name in options:
                raise RewardConfigError(f"rewards.options.{name}: options of a reward model are set where it is built")
            batch[key] = scorers[name]
        elif name in REWARD_FUNCTIONS:
            functions[key] = bind_options(REWARD_FUNCTIONS[name], name, options.get(name))
        elif ":" in name:
            functions[key] = bind_options(load_user_function(name, base_dir=base_dir), name, options.get(name))
        else:
            known = sorted([*REWARD_FUNCTIONS, *scorers])
            raise RewardConfigError(
                f"rewards.weights: unknown reward {name!r}; choose from {known}, or name a user function "
                "as 'file.py:function'"
            )
        out_weights[key] = float(weight)
    by_task = {metric_name(name): frozenset(listed) for name, listed in tasks.items()}
    return CombinedReward(functions, batch, out_weights, timeout_s=timeout_s or None, mode=mode, tasks=by_task)


def build_reward_from_config(
    cfg: RewardsConfig, *, scorers: Mapping[str, BatchScorer] | None = None, base_dir: str | Path | None = None
) -> CombinedReward:
    """:func:`build_reward` from a :class:`RewardsConfig` section."""
    return build_reward(
        cfg.weights, options=cfg.options, scorers=scorers, timeout_s=cfg.timeout_s, base_dir=base_dir, tasks=cfg.tasks
    )


# ----------------------------------------------------------------------------- fact-augmented inputs

FACTS_TEMPLATE = "Facts about the image: {facts}\n"
"""How ground-truth context is put before the question for a fact-augmented reward model."""


def facts_text(sample: PromptSample, column: str) -> str:
    """The ground-truth context of ``sample`` from its ``meta[column]``, as one line of text.

    A string is used as is; a list of strings is joined with ``"; "`` (e.g. the shapes world's
    ``objects``); a list of scene objects (``scene_objects``: dicts with ``shape`` and ``colour``)
    becomes the canonical caption ("The image shows two red circles and a blue square.").
    """
    value = require_meta(sample, column, "fact-augmented reward model", "the ground-truth context")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "; ".join(v.strip() for v in value)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, Mapping) and "shape" in v and "colour" in v for v in value
    ):
        return _caption_of(value)
    raise data_error(
        "invalid value",
        f"fact-augmented reward model: sample {sample_id(sample)!r} meta[{column!r}] is a "
        f"{type(value).__name__}; expected text, a list of texts, or a list of scene objects",
    )


def _caption_of(objects: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for obj in objects:
        key = (str(obj["colour"]), str(obj["shape"]))
        counts[key] = counts.get(key, 0) + 1
    shape_rank = {s: i for i, s in enumerate(SHAPE_PLURALS)}
    colour_rank = {c: i for i, c in enumerate(COLOUR_RGB)}
    order = sorted(
        counts, key=lambda k: (shape_rank.get(k[1], len(shape_rank)), colour_rank.get(k[0], len(colour_rank)), k)
    )
    return caption_from_counts([(counts[k], k[0], k[1]) for k in order])


def fact_augmented_prompt(prompt: list[Message], facts: str, *, template: str = FACTS_TEMPLATE) -> list[Message]:
    """A copy of ``prompt`` whose last user turn starts its text with ``template.format(facts=facts)``.

    Image placeholders stay where they are (the facts go right before the first text part, or
    after the images when the turn has no text), so the processor sees the same images.
    """
    if "{facts}" not in template:
        raise ValueError(f"fact template {template!r} must contain '{{facts}}'")
    line = template.format(facts=facts)
    messages = copy.deepcopy(prompt)
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("fact-augmented prompt: the prompt has no user turn to put the facts in")
    turn = users[-1]
    content = turn.get("content")
    if isinstance(content, str):
        turn["content"] = line + content
        return messages
    parts = list(content or [])
    first_text = next((i for i, p in enumerate(parts) if isinstance(p, Mapping) and p.get("type") == "text"), None)
    if first_text is None:
        first_text = len(parts)
    parts.insert(first_text, {"type": "text", "text": line})
    turn["content"] = parts
    return messages


def fact_augmented_sample(sample: PromptSample, column: str, *, template: str = FACTS_TEMPLATE) -> PromptSample:
    """``sample`` with the facts of ``meta[column]`` in its prompt: what a Fact-RLHF reward model sees.

    LLaVA-RLHF (Sun et al., arXiv 2309.14525) gives its reward model ground-truth context (image
    captions, multiple-choice answers) besides the image, question and response, which makes the
    reward harder to hack. Images and meta are shared with ``sample``, not copied.
    """
    prompt = fact_augmented_prompt(sample.prompt, facts_text(sample, column), template=template)
    return PromptSample(id=sample.id, images=sample.images, prompt=prompt, meta=sample.meta)
