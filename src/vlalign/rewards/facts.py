"""The fact-augmented input of a Fact-RLHF reward model: ground-truth context before the question.

LLaVA-RLHF (Sun et al., arXiv 2309.14525) gives its reward model ground-truth context (image
captions, multiple-choice answers) besides the image, question and response, which makes the
reward harder to hack. :func:`fact_augmented_sample` puts ``meta[column]`` as one line of text
(:func:`facts_text`) at the start of the last user turn.

Which values make facts: a string as is, a list of strings joined with ``"; "``, and any value a
registered *fact formatter* turns into text (:func:`register_fact_formatter`; the shapes world
registers one that writes its ``scene_objects`` as the canonical caption when
:mod:`vlalign.shapes` is imported).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from vlalign.data.schema import Message, PromptSample, data_error
from vlalign.rewards.verifiable import require_meta, sample_id

FACTS_TEMPLATE = "Facts about the image: {facts}\n"
"""How ground-truth context is put before the question for a fact-augmented reward model."""

FactFormatter = Callable[[Any], "str | None"]
"""``formatter(value) -> text``, or None when ``value`` is not in the format it reads."""

_FACT_FORMATTERS: dict[str, tuple[str, FactFormatter]] = {}


def register_fact_formatter(name: str, formatter: FactFormatter, *, accepts: str) -> None:
    """Let :func:`facts_text` write values that ``formatter`` reads (``accepts`` says which, for
    error messages: ``"a list of scene objects"``); a name registered again is replaced."""
    _FACT_FORMATTERS[name] = (accepts, formatter)


def facts_text(sample: PromptSample, column: str) -> str:
    """The ground-truth context of ``sample`` from its ``meta[column]``, as one line of text.

    A string is used as is; a list of strings is joined with ``"; "`` (e.g. the shapes world's
    ``objects``); another value goes to the registered fact formatters, in registration order (the
    shapes world's turns a list of scene objects into its canonical caption: "The image shows two
    red circles and a blue square.").
    """
    value = require_meta(sample, column, "fact-augmented reward model", "the ground-truth context")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "; ".join(v.strip() for v in value)
    for _, formatter in _FACT_FORMATTERS.values():
        text = formatter(value)
        if text is not None:
            return text
    accepted = ["text", "a list of texts", *(accepts for accepts, _ in _FACT_FORMATTERS.values())]
    expected = " or ".join(accepted) if len(accepted) == 2 else ", ".join(accepted[:-1]) + ", or " + accepted[-1]
    raise data_error(
        "invalid value",
        f"fact-augmented reward model: sample {sample_id(sample)!r} meta[{column!r}] is a "
        f"{type(value).__name__}; expected {expected}",
    )


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
