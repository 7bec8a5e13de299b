"""What vlalign needs of a model and its processor, checked when they are loaded.

:func:`missing_pieces` lists, in words, what a loaded model and processor lack; the loader
(:func:`vlalign.models.load.load_model_and_processor`) refuses them with all of it in one
``ModelLoadError`` rather than let the first training step fail deep inside.
:func:`from_pretrained` loads the model, with eager attention where its language model refuses
sdpa (the default, not a demand).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import AutoModelForImageTextToText

from vlalign.data.chat import end_of_turn_text, image_token_ids, tokenizer_of
from vlalign.models.arch import image_token_id

logger = logging.getLogger(__name__)


def missing_pieces(model: nn.Module, processor: Any) -> list[str]:
    """What vlalign needs of a model and its processor that they lack, in words (empty: nothing).

    Checked at load time because each one otherwise fails deep inside the first step: the chat
    template (prompts are rendered through it, and the end of an assistant turn is read from
    it), a pad or eos token (padding), the processor's image token (counting and checking image
    tokens), and the model's image token id agreeing with it (the model scatters image features
    into the positions of its own id).
    """
    missing: list[str] = []
    tok = tokenizer_of(processor)
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token_id", None) is None:
        missing.append("a pad or eos token (set tokenizer.pad_token)")
    if not (getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)):
        missing.append("a chat template (save one with the processor, as chat_template.jinja)")
    else:
        try:
            end_of_turn_text(processor)
        except (ValueError, TypeError) as exc:
            missing.append(f"a chat template that renders an assistant turn ({exc})")
    ids = image_token_ids(processor)
    model_id = image_token_id(model)
    if not ids:
        missing.append("an image token in the processor (processor.image_token / image_token_id)")
    elif model_id is not None and model_id not in ids:
        missing.append(f"agreement on the image token: the model's config says {model_id}, the processor {ids}")
    return missing


def from_pretrained(source: str, kwargs: dict[str, Any]) -> nn.Module:
    """``from_pretrained``; a model whose language model refuses sdpa (Gemma2, hence PaliGemma 2)
    is loaded with eager attention instead, with a warning (sdpa is the default, not a demand)."""
    try:
        return AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except ValueError as exc:
        refused = "does not support an attention implementation" in str(exc)
        if kwargs.get("attn_implementation") != "sdpa" or not refused:
            raise
    logger.warning("%s: its language model does not support sdpa attention; loading it with eager attention", source)
    return AutoModelForImageTextToText.from_pretrained(source, **{**kwargs, "attn_implementation": "eager"})
