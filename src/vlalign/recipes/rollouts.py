"""The batch of the on-policy RL recipes and phase 1 of their step: rollout.

:class:`Rollouts` holds B prompts ("groups") of G sampled completions each, and what the later
phases (:mod:`vlalign.recipes.rl_common`) attach to them. Per-completion ("row") tensors are flat
and prompt-major, row ``r`` is completion ``r % G`` of prompt ``r // G``; per-token tensors are
``(R, L)``, right-padded to the longest completion ``L``, with :attr:`Rollouts.mask` marking real
tokens. Each prompt (and its image) is processed once, by the processor call of the rollout, and
that encoding is reused for every log-prob forward (shared prefix:
:func:`vlalign.models.logprobs.completion_logprobs`).

Sampling is seeded by :func:`rollout_seed` ``(seed, step, round)``, a pure function, so a resumed
run samples the same completions as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from functools import reduce
from typing import Any

import torch
from torch import Tensor, nn

from vlalign.data.collate import EncodedPrompts
from vlalign.data.schema import PromptSample
from vlalign.models.generate import GenerationSettings, generate
from vlalign.models.packing import concat_prompts
from vlalign.models.tiny import resolve_model
from vlalign.models.vllm_client import ServerEngine
from vlalign.models.vllm_engine import (
    EngineGenerations,
    VLLMEngine,
    VLLMError,
    check_server,
    check_vllm,
    close_engines,
    options_of,
)
from vlalign.recipes.common import ModelConfig

RolloutEngine = VLLMEngine | ServerEngine
"""A vLLM engine in this process or one behind ``rollout.vllm_server`` (same methods)."""

# ----------------------------------------------------------------------------- the batch


@dataclass
class Rollouts:
    """B prompts with G sampled completions each, and what the later phases attach to them.

    Per-row tensors have R = B * G rows (prompt-major); per-token tensors are ``(R, L, ...)``.
    """

    samples: list[PromptSample]
    """The B prompts (ground truth in ``meta`` for the rewards)."""
    prompts: EncodedPrompts
    """The prompts after their one processor call (shared by generation and every log-prob forward)."""
    token_ids: list[list[list[int]]]
    """Sampled token ids, ``token_ids[i][k]`` = completion k of prompt i (stop token included when it stopped)."""
    texts: list[list[str]]
    """Decoded completions, like ``token_ids``."""
    stopped: list[list[bool]]
    """True when a completion ended with a stop token, False when max_new_tokens cut it."""
    group_size: int
    """G, completions per prompt."""
    seconds: float = 0.0
    """Wall time of the generation."""
    rewards: Tensor | None = None  # (R,) float32: the rewards the advantages are computed from
    old_logps: Tensor | None = None  # (R, L): log-probs under the rollout policy (None: on-policy update)
    ref_logps: Tensor | None = None  # (R, L): log-probs under the reference policy
    advantages: Tensor | None = None  # (R,) outcome or (R, L) per-token advantages
    engine_logps: Tensor | None = None  # (R, L): log-probs the rollout engine reported (vLLM), for rollout_is_cap
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Other per-row tensors a recipe attaches (PPO: old values, returns). Tensors of one dimension are
    ``(R,)``; those of two or more are per-token ``(R, L, ...)`` (cut and padded along L with the rest)."""

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_rows(self) -> int:
        return len(self.samples) * self.group_size

    @property
    def lengths(self) -> Tensor:  # (R,) long
        return torch.tensor([len(c) for group in self.token_ids for c in group], dtype=torch.long)

    @property
    def width(self) -> int:
        """L, the longest completion."""
        return max((len(c) for group in self.token_ids for c in group), default=0)

    @property
    def mask(self) -> Tensor:  # (R, L) bool
        return torch.arange(self.width)[None, :] < self.lengths[:, None]

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for group in self.token_ids for c in group)

    def flat_samples(self) -> list[PromptSample]:
        """Each prompt repeated G times (one per row)."""
        return [s for s in self.samples for _ in range(self.group_size)]

    def flat_texts(self) -> list[str]:
        return [t for group in self.texts for t in group]

    def flat_stopped(self) -> Tensor:  # (R,) bool
        return torch.tensor([s for group in self.stopped for s in group], dtype=torch.bool)

    def row_tensors(self) -> dict[str, Tensor]:
        """Every per-row tensor attached so far, by field name (extras as ``extras.<key>``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        out.update({f"extras.{k}": v for k, v in self.extras.items()})
        return out

    def select_groups(self, groups: Sequence[int]) -> Rollouts:
        """The prompts ``groups`` (in that order) with their G completions; per-token tensors are cut to
        the new longest completion, so they line up with a forward over the selection."""
        groups = list(groups)
        rows = torch.tensor([g * self.group_size + k for g in groups for k in range(self.group_size)], dtype=torch.long)
        width = max((len(c) for g in groups for c in self.token_ids[g]), default=0)

        def cut(t: Tensor) -> Tensor:
            picked = t[rows.to(t.device)]
            return picked[:, :width] if picked.ndim >= 2 else picked

        changes: dict[str, Any] = {name: cut(t) for name, t in self.row_tensors().items() if "." not in name}
        return replace(
            self,
            samples=[self.samples[g] for g in groups],
            prompts=self.prompts.select(groups),
            token_ids=[self.token_ids[g] for g in groups],
            texts=[self.texts[g] for g in groups],
            stopped=[self.stopped[g] for g in groups],
            extras={k: cut(v) for k, v in self.extras.items()},
            **changes,
        )

    @staticmethod
    def concat(parts: Sequence[Rollouts]) -> Rollouts:
        """The groups of ``parts`` one after the other (per-token tensors padded with zeros to the longest)."""
        if not parts:
            raise ValueError("Rollouts.concat needs at least one part")
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"Rollouts.concat: parts have different group sizes {sorted(sizes)}")
        nonempty = [p for p in parts if len(p)]
        if len(nonempty) <= 1:
            return nonempty[0] if nonempty else parts[0]
        parts = nonempty
        width = max(p.width for p in parts)
        tensors: dict[str, Tensor | None] = {}
        for name in parts[0].row_tensors():
            values = [p.row_tensors().get(name) for p in parts]
            if any(v is None for v in values):
                raise ValueError(f"Rollouts.concat: {name} is set in some parts and not in others")
            tensors[name] = torch.cat([pad_width(v, width) for v in values])  # type: ignore[arg-type]
        return Rollouts(
            samples=[s for p in parts for s in p.samples],
            prompts=reduce(concat_prompts, [p.prompts for p in parts]),
            token_ids=[g for p in parts for g in p.token_ids],
            texts=[g for p in parts for g in p.texts],
            stopped=[g for p in parts for g in p.stopped],
            group_size=parts[0].group_size,
            seconds=sum(p.seconds for p in parts),
            **{k: v for k, v in tensors.items() if "." not in k},
            extras={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("extras.")},  # type: ignore[misc]
        )


def pad_width(t: Tensor, width: int) -> Tensor:
    """``t`` padded with zeros along dimension 1 to ``width`` (tensors of one dimension pass unchanged)."""
    if t.ndim < 2 or t.shape[1] == width:
        return t
    pad = t.new_zeros((t.shape[0], width - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


# ----------------------------------------------------------------------------- phase 1: rollout


def rollout_seed(seed: int, step: int, round_: int = 0) -> int:
    """The sampling seed of round ``round_`` of step ``step`` (a pure function: exact resume)."""
    digest = hashlib.sha256(f"vlalign-rl/{seed}/{step}/{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def check_rollout_engine(settings: GenerationSettings, model: ModelConfig) -> None:
    """Start-up check of ``rollout.engine`` (before the policy loads): one-line error when vLLM is asked
    for and missing or unable to load the model, or when ``rollout.vllm_server`` does not answer or serves
    another model (:class:`~vlalign.models.vllm_engine.VLLMError`)."""
    if settings.vllm_server and settings.engine != "vllm":
        raise VLLMError("rollout.vllm_server is set but rollout.engine=hf; set rollout.engine=vllm or leave it empty")
    if settings.engine == "vllm":
        path = resolve_model(model.name_or_path, seed=model.tiny_seed)
        if settings.vllm_server:
            check_server(settings.vllm_server, path)
        else:
            check_vllm(path)


def rollout_engine(
    settings: GenerationSettings, model: ModelConfig, processor: Any, policy: nn.Module
) -> RolloutEngine | None:
    """The rollout engine ``settings.engine`` names: None for ``hf`` (the policy generates), else a
    vLLM engine beside the policy, or the rollout server ``settings.vllm_server``, holding the
    policy's current weights (a resumed run's included)."""
    if settings.engine != "vllm":
        return None
    path = resolve_model(model.name_or_path, seed=model.tiny_seed)
    if settings.vllm_server:
        engine: RolloutEngine = ServerEngine(settings.vllm_server, path, processor)
    else:
        engine = VLLMEngine(path, processor, dtype=next(policy.parameters()).dtype, options=options_of(settings))
    engine.load_weights(policy)
    return engine


def close_rollout_engines() -> None:
    """Shut down the vLLM engines :func:`rollout_engine` started (before the run's end tears down the
    process group vLLM uses); nothing to do with the ``hf`` engine."""
    close_engines()


@torch.no_grad()
def rollout(
    model: nn.Module,
    processor: Any,
    samples: Sequence[PromptSample],
    *,
    settings: GenerationSettings,
    seed: int,
    engine: RolloutEngine | None = None,
) -> Rollouts:
    """Sample ``settings.n`` completions per prompt (G); each prompt is processed and prefilled once.

    ``model`` should be the unwrapped policy (no DDP wrapper: generation needs no gradient sync).
    With an ``engine`` (:func:`rollout_engine`), it generates, and its log-probs of the sampled tokens
    are kept as :attr:`Rollouts.engine_logps`.
    """
    if settings.n < 1:
        raise ValueError(f"rollout.n (completions per prompt) must be >= 1, got {settings.n}")
    if not samples:
        raise ValueError("rollout: no prompts given")
    kwargs = dict(
        n=settings.n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_new_tokens=settings.max_new_tokens,
        seed=seed,
        batch_size=settings.batch_size,
    )
    if engine is not None:
        gens = engine.generate(model, list(samples), **kwargs)
    else:
        gens = generate(model, processor, list(samples), keep_prompts=True, **kwargs)
    out = Rollouts(
        samples=list(samples),
        prompts=reduce(concat_prompts, gens.encoded),
        token_ids=gens.token_ids,
        texts=gens.texts,
        stopped=gens.stopped,
        group_size=settings.n,
        seconds=gens.seconds,
    )
    if isinstance(gens, EngineGenerations):
        out.engine_logps = torch.zeros(out.num_rows, out.width)
        for r, lp in enumerate(lp for group in gens.logps for lp in group):
            out.engine_logps[r, : len(lp)] = torch.tensor(lp)
    return out
