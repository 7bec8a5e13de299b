"""Offline tokenizers and chat templates for the tiny models of :mod:`vlalign.models.tiny`.

Each architecture family gets a byte-level BPE tokenizer trained in milliseconds on a *corpus*
(sentences covering the vocabulary the model will see) plus the role words of its chat template,
and the special tokens its real processor looks for. Corpora are registered by name
(:func:`register_corpus`); the default, ``shapes``, is the shapes world's vocabulary
(:func:`vlalign.shapes.world.tokenizer_corpus`), registered when :mod:`vlalign.shapes` is
imported.

===========  ==============================================================  =================
family       special tokens (besides bos / eos / pad)                         end of turn
===========  ==============================================================  =================
chatml       ``<|im_start|> <|vision_start|> <|image_pad|> <|vision_end|>``   ``<|im_end|>``
(Qwen2-VL,   ``<|video_pad|>``
Qwen2.5-VL)
llava        ``<image>``                                                      ``</s>``
idefics3     ``<fake_token_around_image> <image> <global-img> <row_i_col_j>``  ``<end_of_utterance>``
gemma3       ``<start_of_turn> <start_of_image> <end_of_image>``              ``<end_of_turn>``
             ``<image_soft_token>``
===========  ==============================================================  =================

The chat templates are written here in the style of each family's public template (role
markers, where the image placeholder goes) but kept minimal: no default system prompt, so that
the tiny models' prompts stay short. Byte-level BPE encodes any text, so user data outside the
corpus still tokenizes (into more pieces).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

# ---------------------------------------------------------------------------------------------
# Chat templates (Jinja). Every template accepts `content` as a string or as a list of parts
# {"type": "image"} / {"type": "text", "text": ...}, in the Hugging Face conversational layout;
# ChatML (Qwen2-VL, Qwen2.5-VL, whose processors take videos) also {"type": "video"}, written as
# the real Qwen2-VL template writes it: <|vision_start|><|video_pad|><|vision_end|>.
# ---------------------------------------------------------------------------------------------

_PARTS = (
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ IMAGE }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)


def _parts(image_markup: str, *, video_markup: str | None = None) -> str:
    """The content-rendering snippet with ``image_markup`` emitted for each image part and, when
    given, ``video_markup`` for each video part (without it a video part renders as nothing)."""
    out = _PARTS.replace("{{ IMAGE }}", image_markup)
    if video_markup is not None:
        out = out.replace(
            "{%- elif part['type'] == 'text' -%}",
            "{%- elif part['type'] == 'video' -%}" + video_markup + "{%- elif part['type'] == 'text' -%}",
        )
    return out


CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _parts(
        "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}",
        video_markup="{{ '<|vision_start|><|video_pad|><|vision_end|>' }}",
    )
    + "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}" + _parts("") + "{{ '</s>' }}"
    "{%- elif message['role'] == 'system' -%}" + _parts("") + "{{ '\\n' }}"
    "{%- else -%}{{ 'USER: ' }}" + _parts("{{ '<image>\\n' }}") + "{{ ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

IDEFICS3_TEMPLATE = (
    "{{ '<|im_start|>' }}"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}{{ ':' }}"
    "{%- if message['role'] == 'assistant' -%}{{ ' ' }}{%- endif -%}"
    + _parts("{{ '<image>' }}")
    + "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}" + _parts("{{ '<start_of_image>' }}") + "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """What a family's tokenizer must contain for its real processor and chat template."""

    bos: str | None
    """Beginning-of-sequence token (``None``: the family has none)."""
    eos: str
    """End-of-sequence token; generation stops on it (and on ``end_of_turn``)."""
    pad: str
    """Padding token."""
    end_of_turn: str
    """Token the chat template closes an assistant turn with."""
    specials: tuple[str, ...]
    """Further special tokens (never split, never merged with neighbours)."""
    chat_template: str
    """Jinja chat template saved with the processor."""
    named: dict[str, str] = field(default_factory=dict)
    """Model-specific named tokens exposed as tokenizer attributes (``tokenizer.image_token``)."""
    role_words: tuple[str, ...] = ()
    """Words of the template's role markers, added to the training corpus."""
    add_bos: bool = False
    """Whether the tokenizer prepends ``bos`` when called with ``add_special_tokens=True``."""


_IDEFICS3_GRID = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))

SPECS: dict[str, TokenizerSpec] = {
    "chatml": TokenizerSpec(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        end_of_turn="<|im_end|>",
        specials=("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
        chat_template=CHATML_TEMPLATE,
        role_words=("system\n", "user\n", "assistant\n"),
    ),
    "llava": TokenizerSpec(
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        end_of_turn="</s>",
        specials=("<image>",),
        chat_template=LLAVA_TEMPLATE,
        named={"image_token": "<image>"},
        role_words=("USER: ", " ASSISTANT:", "ASSISTANT: "),
        add_bos=True,
    ),
    "idefics3": TokenizerSpec(
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        end_of_turn="<end_of_utterance>",
        specials=("<fake_token_around_image>", "<image>", "<global-img>") + _IDEFICS3_GRID,
        chat_template=IDEFICS3_TEMPLATE,
        role_words=("User:", "Assistant:", "Assistant: ", "System:"),
    ),
    "gemma3": TokenizerSpec(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        end_of_turn="<end_of_turn>",
        specials=("<start_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        chat_template=GEMMA3_TEMPLATE,
        named={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        role_words=("user\n", "model\n", "system\n", "\n\n"),
        add_bos=True,
    ),
}


def _all_special_tokens(spec: TokenizerSpec) -> list[str]:
    """Special tokens in a fixed order (pad first, so that it gets id 0)."""
    ordered = [spec.pad, spec.eos] + ([spec.bos] if spec.bos else []) + [spec.end_of_turn, *spec.specials]
    seen: list[str] = []
    for token in ordered:
        if token not in seen:
            seen.append(token)
    return seen


DEFAULT_CORPUS = "shapes"
"""The corpus the tiny models' tokenizers are trained on unless told otherwise."""

_CORPORA: dict[str, Callable[[], list[str]]] = {}


def register_corpus(name: str, sentences: Callable[[], list[str]]) -> None:
    """Make ``sentences()`` the tokenizer corpus called ``name`` (registering a name again replaces it)."""
    _CORPORA[name] = sentences


def corpus_sentences(name: str = DEFAULT_CORPUS) -> list[str]:
    """The sentences of the registered corpus ``name``."""
    if name not in _CORPORA:
        hint = " (import vlalign.shapes, which registers it)" if name == DEFAULT_CORPUS else ""
        raise ValueError(f"no tokenizer corpus {name!r} is registered{hint}; registered: {sorted(_CORPORA)}")
    return _CORPORA[name]()


def train_tokenizer(
    family: str | TokenizerSpec, corpus: list[str], *, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer for ``family`` on ``corpus`` (deterministic, offline).

    ``vocab_size`` is an upper bound: on the small world corpus the trainer runs out of merges
    first (about 600 entries). The result is a ``transformers`` fast tokenizer carrying the
    family's special tokens, chat template and named tokens, ready for ``save_pretrained``.
    ``family`` is a name in :data:`SPECS` or a :class:`TokenizerSpec` of its own.
    """
    if isinstance(family, TokenizerSpec):
        spec = family
    elif family in SPECS:
        spec = SPECS[family]
    else:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {sorted(SPECS)}")
    specials = _all_special_tokens(spec)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus) + list(spec.role_words) * 4, trainer)
    if spec.add_bos and spec.bos:
        bos_id = backend.token_to_id(spec.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]
        )
    kwargs: dict[str, object] = {"eos_token": spec.eos, "pad_token": spec.pad}
    if spec.bos:
        kwargs["bos_token"] = spec.bos
    extra = [t for t in specials if t not in (spec.pad, spec.eos, spec.bos)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        extra_special_tokens=extra,
        model_specific_special_tokens=dict(spec.named),
        **kwargs,
    )
    tokenizer.chat_template = spec.chat_template
    return tokenizer


def generation_config(tok: PreTrainedTokenizerFast, spec: TokenizerSpec) -> GenerationConfig:
    """Greedy decoding that stops at the end of text or the end of the turn (the family's stop tokens)."""
    stops = sorted({tok.convert_tokens_to_ids(spec.eos), tok.convert_tokens_to_ids(spec.end_of_turn)})
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
