"""The chat template and tokenizer of a processor: rendering, end of turn, multi-turn pieces.

The helpers here read what a processor's chat template writes (the generation prompt, the text
after an assistant message, the image placeholder) instead of hard-coding it per architecture;
:mod:`vlalign.data.collate` builds batches on top of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlalign.data.schema import (
    DataError,
    ImageLike,
    Message,
    SupervisedSample,
    count_image_placeholders,
    count_video_placeholders,
)

_SENTINEL = "@@vlalign-completion@@"


def tokenizer_of(processor: Any) -> Any:
    """The processor's tokenizer (or the argument itself when it is a tokenizer)."""
    return getattr(processor, "tokenizer", processor)


def image_placeholder(processor: Any) -> str | None:
    """The string the chat template writes once per image (expanded later by the processor)."""
    return getattr(processor, "image_token", None)


def image_token_ids(processor: Any) -> list[int]:
    """Ids of the tokens repeated once per image feature (``<|image_pad|>``, ``<image_soft_token>``).

    Gemma3's chat-template placeholder (``<start_of_image>``) differs from its feature token;
    ``ProcessorMixin.image_token_ids`` knows both cases.
    """
    ids = getattr(processor, "image_token_ids", None)
    if ids is None:
        ids = [getattr(processor, "image_token_id", None)]
    return [int(i) for i in ids if i is not None]


def feature_token_ids(processor: Any) -> list[int]:
    """:func:`image_token_ids` and, for a processor that takes videos, its video token (``<|video_pad|>``):
    the tokens generation must never write (a completion holding one could not be fed back: the
    model would find one feature token more than its features)."""
    video = getattr(processor, "video_token_id", None) if getattr(processor, "video_processor", None) else None
    return [int(i) for i in dict.fromkeys([*image_token_ids(processor), video]) if i is not None]


def render_prompt(processor: Any, messages: list[Message]) -> str:
    """The prompt as text, through the chat template, ending with the generation prompt."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def end_of_turn_text(processor: Any, *, convention: str = "vlalign") -> str:
    """What the chat template writes right after an assistant message's text, minus whitespace.

    Rendered from a one-turn conversation whose assistant text is a sentinel; a template that
    writes nothing there falls back to the tokenizer's ``eos_token``. ``convention="trl"`` keeps
    the whitespace after it (Qwen's ``<|im_end|>\n``): TRL scores the whole rendered suffix of
    prompt + response after the prompt, the newline after the end-of-turn token included
    (``docs/performance.md``, "Which tokens count as the response").
    """
    if convention not in ("vlalign", "trl"):
        raise ValueError(f"convention must be 'vlalign' or 'trl', not {convention!r}")
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    if _SENTINEL not in text:
        raise ValueError("the chat template does not render the assistant's text; cannot find the end of turn")
    tail = text.split(_SENTINEL, 1)[1]
    tail = tail if convention == "trl" else tail.strip()
    if not tail.strip():
        tail = tokenizer_of(processor).eos_token or ""
    if not tail:
        raise ValueError("the chat template ends assistant turns with nothing and the tokenizer has no eos_token")
    return tail


def end_of_turn_ids(processor: Any, *, convention: str = "vlalign") -> list[int]:
    """Token ids of :func:`end_of_turn_text` (``convention`` as there)."""
    text = end_of_turn_text(processor, convention=convention)
    return list(tokenizer_of(processor)(text, add_special_tokens=False)["input_ids"])


def response_affixes(processor: Any) -> tuple[str, str]:
    """TRL's response text around a completion: ``(lead, tail)``, so that ``lead + text + tail`` is
    what the chat template writes after the generation prompt for an assistant message ``text``.

    ``lead`` is the separator some templates put before the answer (LLaVA's and Idefics3's space,
    PaliGemma's newline; often ''), ``tail`` is :func:`end_of_turn_text` with ``convention="trl"``
    (Qwen's ``<|im_end|>\n``).
    """
    user = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    reply = [{"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(user + reply, add_generation_prompt=False, tokenize=False)
    if not full.startswith(prompt) or _SENTINEL not in full[len(prompt) :]:
        raise ValueError(
            "the chat template's prompt is not a prefix of its prompt + response; cannot split TRL's response"
        )
    lead = full[len(prompt) :].split(_SENTINEL, 1)[0]
    return lead, end_of_turn_text(processor, convention="trl")


def _add_special_tokens(processor: Any, texts: Sequence[str]) -> bool:
    """Whether to let the tokenizer add its special tokens to rendered prompts.

    No when the template already wrote the bos token (Gemma3), or when the tokenizer would
    append something at the end (an eos after the generation prompt); yes otherwise (LLaVA's
    template leaves ``<s>`` to the tokenizer).
    """
    tok = tokenizer_of(processor)
    bos = tok.bos_token
    if bos and any(t.startswith(bos) for t in texts):
        return False
    probe = "a"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    special = tok(probe, add_special_tokens=True)["input_ids"]
    return special[len(special) - len(plain) :] == plain


def pad_token_id_of(processor: Any) -> int:
    """The tokenizer's pad id (its eos id when it has no pad token)."""
    tok = tokenizer_of(processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
    return int(pad)


# ------------------------------------------------------------------------ multi-turn samples


@dataclass
class _FirstTurn:
    """A sample's prompt cut before its first assistant turn (what the processor sees)."""

    id: str
    images: list[ImageLike]
    prompt: list[Message]


def _message_text(message: Message) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def conversation_pieces(processor: Any, sample: SupervisedSample) -> tuple[_FirstTurn, list[tuple[str, bool]]]:
    """Split a multi-turn sample into its first prompt and the text pieces that follow it.

    A sample whose ``prompt`` holds earlier assistant turns (a multi-turn conversation) is laid
    out as ``[first prompt | a_1 eot | user turn 2 + generation prompt | a_2 eot | ... | completion]``.
    Each piece is ``(text, supervised)``: assistant texts and their end-of-turn markers are
    supervised, the user turns between them are not. The pieces come from rendering the
    conversation's prefixes with the chat template, which must render incrementally (each
    prefix a prefix of the next); images may only appear before the first assistant turn.
    A single-turn sample gives its whole prompt and no pieces.
    """
    turns = [k for k, m in enumerate(sample.prompt) if m.get("role") == "assistant"]
    if not turns:
        return _FirstTurn(sample.id, sample.images, sample.prompt), []
    for kind, count in (("images", count_image_placeholders), ("videos", count_video_placeholders)):
        if count(sample.prompt[turns[0] :]) > 0:
            raise DataError(
                f"sample {sample.id!r}: {kind} after the first assistant turn are not supported in multi-turn training"
            )
    eot = end_of_turn_text(processor)
    ends = [*turns, len(sample.prompt)]
    rendered = [render_prompt(processor, sample.prompt[:k]) for k in ends]
    pieces: list[tuple[str, bool]] = []
    for n, k in enumerate(turns):
        answer = _message_text(sample.prompt[k])
        before, after = rendered[n], rendered[n + 1]
        # Some templates put a space between the generation prompt and the answer ("ASSISTANT: Yes");
        # it is left out, as it is when the model generates right after the generation prompt.
        tail = after[len(before) :] if after.startswith(before) else ""
        if not tail.lstrip().startswith(answer):
            raise DataError(
                f"sample {sample.id!r}: the chat template does not render the conversation incrementally "
                "(a prefix's rendering is not a prefix of the next); train on single-turn samples instead"
            )
        glue = tail.lstrip()[len(answer) :]
        lead = glue[: len(glue) - len(glue.lstrip())]
        if not glue.lstrip().startswith(eot):
            raise DataError(
                f"sample {sample.id!r}: assistant turn {n + 1} does not end with {eot!r} in the chat template"
            )
        rest = glue.lstrip()[len(eot) :]
        pieces += [(answer, True), (lead + eot, True), (rest, False)]
    return _FirstTurn(sample.id, sample.images, sample.prompt[: turns[0]]), pieces
