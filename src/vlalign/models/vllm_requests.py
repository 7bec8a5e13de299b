"""What a generation call asks of a vLLM engine and what the engine answers, wherever the engine runs.

The engine beside the policy (:class:`vlalign.models.vllm_engine.VLLMEngine`), the rollout server
(:mod:`vlalign.models.rollout_server`) and the trainer's client of that server
(:class:`vlalign.models.vllm_client.ServerEngine`) share these records and the two halves of a
generation around the engine: :func:`build_batch` (prompts as rendered chat text + images, one seed
per completion, the tokens to stop at and the tokens never to sample) and :func:`collect` (the
engine's answers checked against the trainer's prompt ids and arranged as
:class:`EngineGenerations`). :func:`generate_through` is the whole call around any engine's
``run_batch``. Both records turn into JSON and back (images as base64 PNG, lossless), which is what
the server and its client send.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from vlalign.data.chat import feature_token_ids
from vlalign.data.collate import PromptLike, encode_prompts, load_image, render_prompt, tokenizer_of
from vlalign.errors import UserError
from vlalign.models.generate import Generations, decode_text, stop_token_ids, stream_seed


class VLLMError(UserError, RuntimeError):
    """rollout.engine = vllm cannot be used here (vLLM missing, model it cannot load, server down)."""


@dataclass
class EngineGenerations(Generations):
    """:class:`Generations` plus the engine's log-prob of each generated token (``logps[i][k][t]``)."""

    logps: list[list[list[float]]] = field(default_factory=list)


@dataclass
class RequestBatch:
    """One engine call: ``len(seeds[i])`` completion requests for prompt ``i``, sampled alike."""

    prompts: list[str]
    """Each prompt's rendered chat text (the engine's processor tokenises it with its images)."""
    images: list[list[Image.Image]]
    """Each prompt's images, in order."""
    seeds: list[list[int | None]]
    """Per prompt, one seed per completion request (None: greedy)."""
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop_ids: list[int]
    """Token ids that end a completion (kept as its last token)."""
    banned_ids: list[int]
    """Token ids never sampled (the image placeholders, as the hf engine does)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["images"] = [[_png(im) for im in ims] for ims in self.images]
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RequestBatch:
        values = {k: obj[k] for k in cls.__dataclass_fields__}
        values["images"] = [[_unpng(s) for s in ims] for ims in obj["images"]]
        return cls(**values)


@dataclass
class PromptOutput:
    """An engine's answer for one prompt of a :class:`RequestBatch`: one entry per completion request."""

    prompt_ids: list[int]
    """The engine's token ids of the prompt (checked against the trainer's)."""
    token_ids: list[list[int]]
    """Generated ids of each completion (the stop token last when it stopped)."""
    logps: list[list[float]]
    """The engine's log-prob of each generated token, at the sampling temperature."""
    stopped: list[bool]
    texts: list[str] = field(default_factory=list)
    """Decoded completions (:func:`~vlalign.models.generate.decode_text`; the server fills them)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PromptOutput:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _unpng(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def build_batch(
    processor: Any,
    samples: Sequence[PromptLike],
    *,
    rows: int,
    seed: int,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    stop_ids: list[int],
    banned_ids: list[int],
) -> RequestBatch:
    """The requests of ``samples``: ``rows`` per prompt, completion ``k`` of sample ``s`` seeded by
    :func:`~vlalign.models.generate.stream_seed` ``(seed, s.id, k)`` when sampling (None when greedy)."""
    return RequestBatch(
        prompts=[render_prompt(processor, s.prompt) for s in samples],
        images=[[load_image(im) for im in s.images] for s in samples],
        seeds=[[stream_seed(seed, s.id, k) if temperature > 0 else None for k in range(rows)] for s in samples],
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        stop_ids=list(stop_ids),
        banned_ids=sorted(set(banned_ids)),
    )


def collect(result: EngineGenerations, outputs: Sequence[PromptOutput], encoded: Any, n: int, tok: Any) -> None:
    """Append the engine's ``outputs`` (one per prompt of ``encoded``, the trainer's processor call) to
    ``result``; a greedy batch (one request per prompt) is repeated to ``n`` completions. A prompt the
    engine tokenised differently from the trainer is an error (never a silent difference)."""
    if len(outputs) != len(encoded.input_ids):
        raise VLLMError(f"the engine answered {len(outputs)} prompts of {len(encoded.input_ids)}")
    for i, (out, ids) in enumerate(zip(outputs, encoded.input_ids)):
        if list(out.prompt_ids) != list(ids):
            raise VLLMError(
                f"sample {encoded.sample_ids[i]!r}: vLLM tokenised the prompt differently from the trainer "
                f"({len(out.prompt_ids)} vs {len(ids)} tokens); set rollout.engine=hf"
            )
        times = n // len(out.token_ids)
        g_ids = [list(x) for x in out.token_ids] * times
        g_stop = list(out.stopped) * times
        result.token_ids.append(g_ids)
        result.stopped.append(g_stop)
        result.logps.append([list(x) for x in out.logps] * times)
        result.texts.append([decode_text(tok, x, s) for x, s in zip(g_ids, g_stop)])
        result.new_tokens += sum(len(x) for x in g_ids)
        result.prompt_tokens += len(ids)


def generate_through(
    run_batch: Callable[[RequestBatch], list[PromptOutput]],
    processor: Any,
    samples: Sequence[PromptLike],
    *,
    stop_ids: list[int],
    banned_ids: list[int],
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
) -> EngineGenerations:
    """``n`` completions per sample from an engine's ``run_batch`` (greedy when ``temperature == 0``:
    decoded once, repeated), ``batch_size`` prompts per call, as
    :func:`vlalign.models.generate.generate` with ``keep_prompts=True``."""
    start = time.perf_counter()
    tok = tokenizer_of(processor)
    rows = n if temperature > 0 else 1
    result = EngineGenerations(sample_ids=[s.id for s in samples], texts=[], token_ids=[], stopped=[])
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
    for lo in range(0, len(samples), batch_size):
        chunk = list(samples[lo : lo + batch_size])
        encoded = encode_prompts(processor, chunk)
        result.encoded.append(encoded)
        batch = build_batch(
            processor, chunk, rows=rows, seed=seed, stop_ids=stop_ids, banned_ids=banned_ids, **sampling
        )
        collect(result, run_batch(batch), encoded, n, tok)
    result.seconds = time.perf_counter() - start
    return result


def policy_generations(engine: Any, model: Any, samples: Sequence[PromptLike], **kwargs: Any) -> EngineGenerations:
    """What an engine's ``generate`` does (in this process or on a server): bring ``engine`` up to the
    policy ``model``'s weights (``engine.sync``), then :func:`generate_through` its ``run_batch`` with the
    model's stop tokens and the image and video tokens banned; ``kwargs``: those of generate_through."""
    engine.sync(model)
    stop_ids = stop_token_ids(model, engine.processor)
    banned = feature_token_ids(engine.processor)
    return generate_through(engine.run_batch, engine.processor, samples, stop_ids=stop_ids, banned_ids=banned, **kwargs)


__all__ = [
    "EngineGenerations",
    "PromptOutput",
    "RequestBatch",
    "VLLMError",
    "build_batch",
    "collect",
    "generate_through",
    "policy_generations",
]
