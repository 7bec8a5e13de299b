"""Task accuracy of short answers (counting, colour, existence, any exact-answer task).

An answer is correct when the verifiable reward of its task pays 1 (:mod:`vlalign.rewards.verifiable`
is the single place where answers are normalised, so that what RL rewards and what evaluation
counts agree):

==============  ====================================================================================
task            correct when
==============  ====================================================================================
``counting``    the answer states exactly one number and it is the count (``"three"`` = ``"3"`` =
                ``"There are 3."``; ``"no"``/``"none"`` = 0; ``"3 or 4"`` is wrong)
``colour``      it names exactly one colour and it is the right one (synonyms: ``grey`` = ``gray``)
``existence``   it says yes or no, not both, and agrees with the label
anything else   the normalised answer equals the normalised reference (case, punctuation,
                articles and number spelling ignored)
==============  ====================================================================================

Descriptions (task ``describe``) are not scored here; CHAIR (:mod:`vlalign.eval.chair`) does. A
sample's task is :func:`vlalign.data.annotations.task_of`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from vlalign.data.annotations import DESCRIBE, task_of
from vlalign.rewards.verifiable import colour_match, count_match, exact_match, yes_no_match

TASK_CHECKS = {"counting": count_match, "colour": colour_match, "existence": yes_no_match}
"""Task name -> the check of its answers; other tasks use exact match after normalisation."""

# DESCRIBE and task_of live in vlalign.data.annotations (data reads a sample's task too)
__all__ = [
    "DESCRIBE",
    "TASK_CHECKS",
    "answer_correct",
    "filter_tasks",
    "has_task",
    "require_rows",
    "task_accuracy",
    "task_of",
]


def has_task(tasks: Collection[str]) -> Callable[[Any], bool] | None:
    """Whether a sample's :func:`task_of` is in ``tasks``, as a predicate (None when ``tasks`` is
    empty: every sample is wanted)."""
    if not tasks:
        return None
    wanted = set(tasks)
    return lambda sample: task_of(sample) in wanted


def require_rows(kept: list[Any], tasks: Collection[str], *, source: str, option: str) -> list[Any]:
    """``kept``, or ``ValueError`` naming ``source`` (the data file) and ``option`` (the setting that
    asked for ``tasks``) when it is empty."""
    if not kept:
        raise ValueError(f"{source}: no row has a task in {option}={sorted(set(tasks))}")
    return kept


def filter_tasks(samples: list[Any], tasks: Collection[str], *, source: str, option: str) -> list[Any]:
    """The samples whose task is in ``tasks`` (all of them when ``tasks`` is empty; see :func:`require_rows`)."""
    keep = has_task(tasks)
    if keep is None:
        return samples
    return require_rows([s for s in samples if keep(s)], tasks, source=source, option=option)


def answer_correct(text: str, sample: Any) -> bool:
    """Whether ``text`` answers ``sample`` correctly (``meta["answer"]`` is the reference)."""
    check = TASK_CHECKS.get(task_of(sample), exact_match)
    return check(text, sample) == 1.0


def task_accuracy(texts: Sequence[str], samples: Sequence[Any]) -> dict[str, float]:
    """Accuracy per task over short-answer samples (descriptions skipped): ``{task: accuracy}``
    plus ``{task}_n`` (the number of questions)."""
    hits: dict[str, list[bool]] = {}
    for text, sample in zip(texts, samples, strict=True):
        task = task_of(sample)
        if task == DESCRIBE:
            continue
        hits.setdefault(task, []).append(answer_correct(text, sample))
    out: dict[str, float] = {}
    for task, values in sorted(hits.items()):
        out[task] = sum(values) / len(values)
        out[f"{task}_n"] = float(len(values))
    return out
