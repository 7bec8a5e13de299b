"""Reward-model scoring: a trained reward model as a :class:`~vlalign.rewards.BatchScorer`.

:class:`RewardModelScorer` turns ``(samples, completions)`` into one float per completion, so a
reward model trained by ``vlalign rm`` plugs in wherever a batched scorer goes: the rewards of the
RL recipes (``build_reward(..., scorers={"reward_model": scorer})``), sample-and-rank pair
construction, and the win-rate metric of the evaluation suite (``evaluate(..., scorer=scorer)``).

How a batch is scored: consecutive entries with the same sample (the G completions of one prompt,
as the RL recipes lay them out) become ONE prompt with G completions, so each image and prompt
goes through the backbone once (:func:`vlalign.models.logprobs.completion_logprobs`); completions
are tokenized with the end-of-turn token appended, as in training. Scores are the raw head outputs
normalised with the model's saved offset and scale (``normalise=False`` for the raw outputs).

Fact-augmented reward models (Fact-RLHF, LLaVA-RLHF, arXiv 2309.14525) were trained with
ground-truth context in the prompt; the scorer reads the column from the model's
``reward_model.json`` and rebuilds the same prompt with
:func:`~vlalign.rewards.facts.fact_augmented_sample` for every sample it scores, so a sample without
that column is an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlalign.data.collate import encode_completions, encode_prompts, end_of_turn_ids, pad_token_id_of
from vlalign.data.schema import PromptSample
from vlalign.models.heads import RewardModel, RewardModelInfo, load_reward_model
from vlalign.models.reference import eval_mode
from vlalign.models.tiny import resolve_model
from vlalign.rewards.facts import FACTS_TEMPLATE, fact_augmented_sample


def group_consecutive(samples: Sequence[Any]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: runs of consecutive entries that are the same sample (same id, same prompt)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(samples) + 1):
        if i == len(samples) or not _same(samples[i], samples[start]):
            runs.append((start, i))
            start = i
    return runs


def _same(a: Any, b: Any) -> bool:
    return a is b or (
        a.id == b.id
        and a.prompt == b.prompt
        and len(a.images) == len(b.images)
        and all(x is y or x == y for x, y in zip(a.images, b.images))
    )


def prepare_samples(samples: Sequence[Any], info: RewardModelInfo) -> list[Any]:
    """What the reward model sees: the samples themselves, or with their facts in the prompt."""
    if not info.facts_column:
        return list(samples)
    template = info.facts_template or FACTS_TEMPLATE
    return [fact_augmented_sample(_as_prompt(s), info.facts_column, template=template) for s in samples]


def _as_prompt(sample: Any) -> PromptSample:
    return (
        sample
        if isinstance(sample, PromptSample)
        else PromptSample(
            id=sample.id, images=sample.images, prompt=sample.prompt, meta=getattr(sample, "meta", {}) or {}
        )
    )


class RewardModelScorer:
    """``(samples, completions) -> list[float]``: a reward model's scores, batched, without gradients."""

    def __init__(
        self,
        model: RewardModel,
        processor: Any,
        info: RewardModelInfo,
        *,
        batch_size: int = 16,
        normalise: bool = True,
        max_length: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.info = info
        self.batch_size = batch_size
        self.normalise = normalise
        self.max_length = max_length
        self.eot_ids = end_of_turn_ids(processor)
        self.pad_token_id = pad_token_id_of(processor)
        self.num_scored = 0
        """Completions scored so far."""

    @torch.no_grad()
    def raw_scores(self, samples: Sequence[Any], completions: Sequence[str]) -> torch.Tensor:
        """Raw head outputs ``(N,)`` float32 (on the CPU), before normalisation."""
        if len(samples) != len(completions):
            raise ValueError(
                f"{len(samples)} samples but {len(completions)} completions; give one sample per completion"
            )
        seen = prepare_samples(samples, self.info)
        runs = group_consecutive(seen)
        out: list[torch.Tensor] = []
        with eval_mode(self.model):
            for lo in range(0, len(runs), self.batch_size):
                chunk = runs[lo : lo + self.batch_size]
                prompts = encode_prompts(self.processor, [seen[a] for a, _ in chunk])
                texts = [[completions[k] for k in range(a, b)] for a, b in chunk]
                ids = encode_completions(self.processor, texts, eot_ids=self.eot_ids)
                scores = self.model(prompts, ids, pad_token_id=self.pad_token_id, max_length=self.max_length)
                out.append(scores.float().cpu())
        self.num_scored += len(completions)
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, samples: Sequence[Any], completions: Sequence[str]) -> list[float]:
        raw = self.raw_scores(samples, completions)
        scores = self.info.normalise(raw.double()) if self.normalise else raw.double()
        return scores.tolist()


def load_reward_scorer(
    folder: str | Path,
    *,
    device: str | None = "auto",
    dtype: str | torch.dtype = "auto",
    batch_size: int = 16,
    normalise: bool = True,
) -> RewardModelScorer:
    """A :class:`RewardModelScorer` for the reward model saved in ``folder`` (``vlalign rm``'s ``<run>/model``)."""
    model, processor, info = load_reward_model(resolve_model(str(folder)), device=device, dtype=dtype)
    return RewardModelScorer(model, processor, info, batch_size=batch_size, normalise=normalise)


__all__ = ["RewardModelScorer", "group_consecutive", "load_reward_scorer", "prepare_samples"]
