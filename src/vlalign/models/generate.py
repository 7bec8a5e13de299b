"""Batched generation from any loaded image-text-to-text model: greedy or sampled, n per prompt.

:func:`generate` is what evaluation, sample-and-rank pair construction and the RL recipes call.
It returns :class:`Generations`: the texts, the generated token ids (cut after the stop token, so
that RL scores exactly what was sampled, without re-tokenising) and whether each completion
stopped by itself or ran into ``max_new_tokens``.

How a batch is generated (the decode loop is written out here, not delegated to
``model.generate``):

1. one processor call for the batch's prompts (:func:`~vlalign.data.collate.encode_prompts`,
   then left-padded rows);
2. one *prefill* forward over the B prompts: each image goes through the vision tower once and
   each prompt through the language model once, giving the next-token logits and the KV cache;
3. the cache and logits are repeated ``n`` times along the batch (``cache.batch_repeat_interleave``)
   so that the n completions of a prompt share that prefill;
4. one-token decode steps over the B*n rows; rows that produced a stop token leave the batch
   (their cache rows are dropped), so short answers do not pay for long ones.

Why not ``model.generate(num_return_sequences=n)``: it runs the language model's prefill over n
copies of every prompt, where this loop prefills each prompt once for its n completions. Greedy
outputs are token for token those of ``model.generate`` (``tests/models/test_generate.py``, all
five tiny architectures). See docs/notes/generation.md for the timings.

Positions: left padding means a row's positions must start at its first real token. Every
architecture gets explicit ``position_ids``: ``cumsum(attention_mask) - 1`` for ordinary RoPE, and
for multimodal RoPE (Qwen2-VL, Qwen2.5-VL) the model's own ``get_rope_index`` at prefill, then the
text position plus the per-row offset (``rope_deltas``) it returns, as ``model.generate`` does.

Randomness: every completion has its own stream of uniforms, seeded by ``(seed, sample id, k)``
(k = 0..n-1), and tokens are drawn by inverse-CDF sampling from the temperature / top-k / top-p
filtered distribution. A completion therefore does not depend on the batch size, on the order of
the prompts or on which other prompts share its batch (up to floating-point differences between
padded batches), and the same seed gives the same completions after a resumed run.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vlalign.config import StrictFields
from vlalign.data.chat import feature_token_ids
from vlalign.data.collate import (
    TOKEN_SPAN_KEYS,
    EncodedPrompts,
    GenerationBatch,
    PromptLike,
    build_prompt_rows,
    encode_prompts,
    end_of_turn_ids,
    pad_token_id_of,
    tokenizer_of,
)
from vlalign.models.arch import cache_of, left_padded_positions, position_base
from vlalign.models.moe import router_logits_off


@dataclass
class GenerationSettings(StrictFields):
    """How to generate (a config section of the recipes that generate: eval, pairs, GRPO, PPO)."""

    n: int = 1
    """Completions per prompt."""
    temperature: float = 0.0
    """Sampling temperature; 0 decodes greedily (then the n completions of a prompt are equal)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens before top_p (0 = off)."""
    max_new_tokens: int = 64
    """Longest completion, in tokens (the stop token included)."""
    batch_size: int = 16
    """Prompts per forward pass (each brings its n completions)."""
    engine: Literal["hf", "vllm"] = "hf"
    """What generates: hf (vlalign's decode loop on the policy itself) or vllm (a vLLM engine beside the
    policy, given its weights after every update; GRPO, PPO and iterative DPO; docs/vllm.md)."""
    vllm_gpu_memory_utilization: float = 0.3
    """engine = vllm: share of the GPU's memory vLLM may take (weights + KV cache); the trainer needs the rest."""
    vllm_max_model_len: int = 4096
    """engine = vllm: longest prompt + completion, in tokens (sizes vLLM's KV cache)."""
    vllm_tensor_parallel: int = 1
    """engine = vllm: GPUs one engine spans (tensor parallel)."""
    vllm_sleep: bool = False
    """engine = vllm: free the engine's weights and KV cache during the update and wake it for the next
    rollout (GPU only; vLLM's CPU build has no sleep mode)."""
    vllm_server: str = ""
    """engine = vllm: URL of a running ``vlalign rollout-server`` (e.g. http://rollout-host:8000) that
    generates instead of an engine in this process; the policy's weights are pushed to it after every
    update (docs/vllm.md). Empty: the engine lives beside the policy."""


@dataclass
class Generations:
    """The completions of a list of prompts: ``texts[i][k]`` is completion k of prompt i."""

    sample_ids: list[str]
    texts: list[list[str]]
    """Decoded completions, special tokens and surrounding whitespace removed."""
    token_ids: list[list[list[int]]]
    """Generated token ids of each completion; ends with the stop token when ``stopped``."""
    stopped: list[list[bool]]
    """True when the completion ended with a stop token, False when max_new_tokens cut it."""
    prompt_tokens: int = 0
    """Prompt tokens processed (image tokens included; each prompt counted once)."""
    new_tokens: int = 0
    """Tokens generated, over all completions."""
    seconds: float = 0.0
    """Wall time of the whole call."""
    encoded: list[EncodedPrompts] = field(default_factory=list)
    """With ``keep_prompts=True``: the processed prompts of each generation batch, in order (batch b
    holds prompts ``[b * batch_size, (b + 1) * batch_size)``), so that scoring the completions
    (:func:`vlalign.models.logprobs.completion_logprobs` with ``token_ids``) needs no second
    processor call."""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def flat_texts(self) -> list[str]:
        """All completions, prompt by prompt: ``[t[0][0], ..., t[0][n-1], t[1][0], ...]``."""
        return [t for group in self.texts for t in group]


# ----------------------------------------------------------------------------------- sampling


def stream_seed(seed: int, sample_id: str, k: int) -> int:
    """The seed of completion ``k`` of sample ``sample_id`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"vlalign-rollout/{seed}/{sample_id}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def completion_uniforms(seed: int, sample_ids: Sequence[str], n: int, steps: int) -> Tensor:
    """``(len(sample_ids) * n, steps)`` float64 uniforms in [0, 1), one row per completion."""
    rows = []
    for sid in sample_ids:
        for k in range(n):
            gen = torch.Generator().manual_seed(stream_seed(seed, sid, k))
            rows.append(torch.rand(steps, generator=gen, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, steps, dtype=torch.float64)


def filter_logits(logits: Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Log-probabilities ``(R, V)`` after temperature, top-k and top-p; removed tokens get -inf.

    Top-p keeps, in order of decreasing probability, every token whose preceding mass is below
    ``top_p`` (so at least the most likely token survives).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (R, V)
    if 0 < top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logp, dim=-1)


def sample_tokens(logp: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw: for each row, the first token whose cumulative probability exceeds u.

    ``logp`` ``(R, V)`` (filtered log-probabilities), ``uniforms`` ``(R,)`` in [0, 1).
    """
    cdf = logp.double().exp().cumsum(-1)  # (R, V)
    u = uniforms.to(cdf.device, torch.float64).unsqueeze(-1) * cdf[:, -1:]  # (R, 1)
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (R,)
    return idx.clamp(max=logp.shape[-1] - 1)


# --------------------------------------------------------------------------------- the model


def stop_token_ids(model: nn.Module, processor: Any) -> list[int]:
    """Token ids that end a completion: the generation config's eos ids and the end-of-turn token."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else list(eos))
    tok = tokenizer_of(processor)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    eot = end_of_turn_ids(processor)
    if len(eot) == 1:
        ids.add(eot[0])
    if not ids:
        raise ValueError("the model has no eos token and the chat template no one-token end of turn; cannot stop")
    return sorted(ids)


@dataclass
class _Decoding:
    """State of the rows still being decoded (R rows)."""

    rows: Tensor  # (R,) long: completion index of each live row
    mask: Tensor  # (R, T) long: attention mask so far
    next_pos: Tensor  # (R,) long: 1-D position of the next token
    deltas: Tensor | None  # (R, 1) long: multimodal RoPE offset, or None
    cache: Any
    step: dict[str, Tensor] = field(default_factory=dict)
    """Per-token vision inputs of each new token, ``(R, 1, ...)``: the prompt's last entry (Mllama's
    cross-attention mask: the answer sees the prompt's images), as ``model.generate`` extends them."""

    def keep(self, live: Tensor) -> None:
        """Drop the rows where ``live`` is False (and their cache rows)."""
        index = live.nonzero().squeeze(-1)
        self.rows, self.mask, self.next_pos = self.rows[index], self.mask[index], self.next_pos[index]
        if self.deltas is not None:
            self.deltas = self.deltas[index]
        self.step = {k: v[index] for k, v in self.step.items()}
        self.cache.reorder_cache(index)  # index_select: every cache layer has it (linear-attention ones too)


def _prefill(model: nn.Module, batch: GenerationBatch, n: int, device: torch.device) -> tuple[Tensor, _Decoding]:
    """One forward over the prompts; the logits and cache repeated for n completions each."""
    dtype = next(model.parameters()).dtype
    vision = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.vision.items()}
    input_ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    positions, deltas = left_padded_positions(model, input_ids, mask, vision)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **vision,
        **router_logits_off(model),
    )
    logits = out.logits[:, -1]  # (B, V)
    cache = cache_of(out)
    step = {k: vision[k][:, -1:] for k in TOKEN_SPAN_KEYS if k in vision}  # left padding: the last is the prompt's
    if n > 1:
        cache.reorder_cache(torch.arange(logits.shape[0], device=device).repeat_interleave(n))  # as above
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        deltas = deltas.repeat_interleave(n, 0) if deltas is not None else None
        step = {k: v.repeat_interleave(n, 0) for k, v in step.items()}
    state = _Decoding(
        rows=torch.arange(logits.shape[0], device=device),
        mask=mask,
        next_pos=mask.sum(-1) + (position_base(model) if deltas is None else 0),
        deltas=deltas.to(device) if deltas is not None else None,
        cache=cache,
        step=step,
    )
    return logits, state


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.20), else ``past_key_values``
    (the vLLM test environment's transformers 5.19 ignores an unknown ``cache`` and decodes without it)."""
    for module in model.modules():  # the outermost forward that names its cache (PEFT wrappers take **kwargs)
        forward = inspect.signature(type(module).forward).parameters
        if "cache" in forward or "past_key_values" in forward:
            return "cache" if "cache" in forward else "past_key_values"
    return "cache"


def _decode_step(model: nn.Module, tokens: Tensor, state: _Decoding) -> Tensor:
    """Feed one token per live row; return the next logits ``(R, V)``."""
    state.mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], dim=1)
    pos = state.next_pos.unsqueeze(-1)  # (R, 1)
    if state.deltas is not None:
        pos = (pos + state.deltas).unsqueeze(0).expand(3, -1, -1)  # (3, R, 1)
    out = model(
        input_ids=tokens.unsqueeze(-1),
        attention_mask=state.mask,
        position_ids=pos,
        **{_cache_kwarg(model): state.cache},
        use_cache=True,
        logits_to_keep=1,
        **state.step,
        **router_logits_off(model),
    )
    state.cache = cache_of(out)
    state.next_pos = state.next_pos + 1
    return out.logits[:, -1]


def generate_batch(
    model: nn.Module,
    batch: GenerationBatch,
    *,
    n: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniforms: Tensor | None = None,
    suppress_ids: Sequence[int] = (),
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of n completions per prompt of ``batch`` (rows prompt-major), and stop flags.

    ``uniforms`` ``(B*n, max_new_tokens)``: the random numbers of each completion (needed when
    ``temperature > 0``; see :func:`completion_uniforms`). ``suppress_ids``: tokens never generated.
    """
    if temperature > 0 and (uniforms is None or uniforms.shape != (len(batch) * n, max_new_tokens)):
        raise ValueError(f"sampling needs uniforms of shape ({len(batch) * n}, {max_new_tokens})")
    device = next(model.parameters()).device
    logits, state = _prefill(model, batch, n, device)
    total = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(total)]
    stopped = [False] * total
    stops = torch.tensor(list(stop_ids), device=device)
    banned = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        if banned.numel():
            logits = logits.index_fill(-1, banned, float("-inf"))
        if temperature > 0:
            logp = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            tokens = sample_tokens(logp, uniforms[state.rows.cpu(), step])
        else:
            tokens = logits.argmax(-1)
        tokens = tokens.to(device)
        for row, tok in zip(state.rows.tolist(), tokens.tolist()):
            out[row].append(tok)
        done = torch.isin(tokens, stops)
        for row in state.rows[done].tolist():
            stopped[row] = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if bool(done.any()):
            state.keep(~done)
            tokens = tokens[~done]
        logits = _decode_step(model, tokens, state)
    return out, stopped


# ------------------------------------------------------------------------------------ driver


def decode_text(tok: Any, ids: list[int], stopped: bool) -> str:
    """A completion's text: its ids less the stop token (when it stopped), special tokens skipped, stripped."""
    body = ids[:-1] if stopped else ids
    return tok.decode(body, skip_special_tokens=True).strip()


@torch.no_grad()
def generate(
    model: nn.Module,
    processor: Any,
    samples: Sequence[PromptLike],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generate",
    keep_prompts: bool = False,
) -> Generations:
    """Generate ``n`` completions for each sample's prompt (greedy when ``temperature == 0``).

    Any loaded model works (PEFT-wrapped or not); it is put in eval mode for the call and restored
    after. Image placeholder tokens are never generated (a completion holding one could not be
    fed back to the model: the processor's image-token count would no longer match).
    Completions are reproducible: see the module doc for how ``seed`` is used. With greedy
    decoding the n completions of a prompt are decoded once and repeated.
    """
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n ({n}), max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    start = time.perf_counter()
    pad = pad_token_id_of(processor)
    tok = tokenizer_of(processor)
    stop_ids = stop_token_ids(model, processor)
    suppress = feature_token_ids(processor)
    rows_per_prompt = n if temperature > 0 else 1
    result = Generations(sample_ids=[s.id for s in samples], texts=[], token_ids=[], stopped=[])
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(samples), desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for lo in range(0, len(samples), batch_size):
            chunk = samples[lo : lo + batch_size]
            encoded = encode_prompts(processor, chunk)  # the batch's one processor call
            batch = build_prompt_rows(encoded, pad_token_id=pad)
            if keep_prompts:
                result.encoded.append(encoded)
            uniforms = None
            if temperature > 0:
                uniforms = completion_uniforms(seed, [s.id for s in chunk], n, max_new_tokens)
            ids, stopped = generate_batch(
                model,
                batch,
                n=rows_per_prompt,
                max_new_tokens=max_new_tokens,
                stop_ids=stop_ids,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                uniforms=uniforms,
                suppress_ids=suppress,
            )
            result.prompt_tokens += int(batch.attention_mask.sum())
            for i in range(len(chunk)):
                group = range(i * rows_per_prompt, (i + 1) * rows_per_prompt)
                g_ids = [ids[r] for r in group] * (n // rows_per_prompt)
                g_stop = [stopped[r] for r in group] * (n // rows_per_prompt)
                result.token_ids.append([list(x) for x in g_ids])
                result.stopped.append(g_stop)
                result.texts.append([decode_text(tok, x, s) for x, s in zip(g_ids, g_stop)])
                result.new_tokens += sum(len(x) for x in g_ids)
            bar.update(len(chunk))
            result.seconds = time.perf_counter() - start
            bar.set_postfix(tok_s=f"{result.tokens_per_s:.0f}")
    finally:
        bar.close()
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def generate_texts(model: nn.Module, processor: Any, samples: Sequence[PromptLike], **kwargs: Any) -> list[list[str]]:
    """:func:`generate`, texts only: ``out[i][k]`` is completion k of prompt i."""
    return generate(model, processor, samples, **kwargs).texts


def settings_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    """The keyword arguments of :func:`generate` that a :class:`GenerationSettings` holds."""
    return {
        "n": settings.n,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
    }


__all__ = [
    "GenerationSettings",
    "Generations",
    "completion_uniforms",
    "decode_text",
    "filter_logits",
    "generate",
    "generate_batch",
    "generate_texts",
    "sample_tokens",
    "settings_kwargs",
    "stop_token_ids",
    "stream_seed",
]

# For RL: ``gens = generate(policy, processor, prompts, n=G, temperature=1.0, seed=step,
# batch_size=len(prompts), keep_prompts=True)``; the rewards read ``gens.texts``, and the
# log-probs of exactly what was sampled are
# ``completion_logprobs(policy, gens.encoded[0], gens.token_ids)`` (vlalign.models.logprobs).
