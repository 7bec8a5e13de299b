"""Iterative (online) DPO, as RLAIF-V does it: rounds of sample-and-rank from the current policy,
each followed by DPO on the new pairs. One command: ``vlalign dpo --online.rounds=N``.

Round r (1-based), in ``<output_dir>/round-<r>/``:

1. the policy of the round's start (the configured model for round 1, the previous round's
   ``model/`` after) answers ``online.prompts_per_round`` prompts of ``online.prompts`` (a fresh,
   seeded draw each round) ``online.generation.n`` times;
2. a scorer (``online.scorer``: claim-level verification against the annotations by default, or
   exact ground truth, or your own / a reward model) rates the answers, and
   :func:`vlalign.data.pairs.rank.rank_pairs` pairs a better with a worse one
   (``pairs.jsonl`` + ``pairs.stats.json``);
3. DPO (every option of ``vlalign dpo``) trains on those pairs from the round's start policy,
   against a reference that is that same start policy (``online.update_reference``, as RLAIF-V)
   or the initial model.

Everything is resumable: a round whose ``model/`` exists is skipped, its pairs are not sampled
again, and an interrupted round resumes from its last checkpoint. With LoRA, intermediate rounds
are saved merged (the next round puts a fresh adapter on them). The last round's model is copied
to ``<output_dir>/model``; ``<output_dir>/rounds.json`` lists each round's pairs and metrics.
With several processes, the main process samples and ranks while the others wait; every process
then trains on the same pairs file.

This module knows nothing of DPO's losses: :func:`run_rounds` is given the offline trainer
(``vlalign.recipes.dpo.train``) and reads only the config sections of :class:`RoundsConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from accelerate import PartialState

from vlalign.config import StrictFields
from vlalign.data.io import load_samples, write_samples
from vlalign.data.pairs.rank import sample_and_rank
from vlalign.eval.scorers import build_scorer
from vlalign.models.generate import GenerationSettings, generate, settings_kwargs
from vlalign.models.load import load_model_and_processor
from vlalign.models.tiny import resolve_model
from vlalign.models.vllm_client import ServerEngine
from vlalign.models.vllm_engine import check_server, check_vllm, generate_once, options_of
from vlalign.recipes.common import DataConfig, ModelConfig
from vlalign.shapes.embedded import resolve_data
from vlalign.shapes.vocabulary import find_vocabulary
from vlalign.training import TrainConfig
from vlalign.training.options import check_options


def _online_generation_defaults() -> GenerationSettings:
    return GenerationSettings(n=4, temperature=1.0, top_p=0.95, max_new_tokens=48, batch_size=16)


@dataclass
class OnlineConfig(StrictFields):
    """Iterative DPO: sample-and-rank pairs from the current policy each round."""

    rounds: int = 0
    """Rounds of (sample, rank, DPO); 0 = ordinary offline DPO on data.train."""
    prompts: str = "shapes:train_prompts.jsonl"
    """Prompts with ground truth (object annotations or answers) that the policy answers."""
    prompts_per_round: int = 256
    """Prompts drawn (seeded, without replacement) for each round (0: all)."""
    generation: GenerationSettings = field(default_factory=_online_generation_defaults)
    """How the policy samples its answers (n per prompt, temperature, top_p, ...)."""
    scorer: str = "claims"
    """claims (claim-level verification), ground_truth, or file.py:name / module:name (e.g. a reward model)."""
    vocabulary: str = ""
    """Object vocabulary JSON ({object: [phrases]}); '' uses the manifest.json beside the prompts file."""
    threshold: float = 0.25
    """Smallest score gap between the chosen and the rejected answer."""
    pairing: Literal["best_worst", "all"] = "best_worst"
    """best_worst: the best answer of a prompt against its worst; all: every pair whose gap reaches the threshold."""
    max_pairs_per_prompt: int = 1
    """At most this many pairs per prompt."""
    update_reference: bool = True
    """Each round's reference is the policy at the round's start (RLAIF-V); false keeps the initial
    model. A --ref-model, when given, is the reference of every round."""

    def validate(self, prefix: str = "online") -> None:
        """Refuse unusable values (called by :class:`~vlalign.training.Run` before the model loads)."""
        check_options(
            prefix,
            [
                ("rounds", self.rounds >= 0, "must be >= 0 (0: offline DPO)"),
                ("prompts_per_round", self.prompts_per_round >= 0, "must be >= 0 (0: all)"),
                ("threshold", self.threshold >= 0, "must be >= 0"),
                ("max_pairs_per_prompt", self.max_pairs_per_prompt >= 1, "must be >= 1"),
            ],
            values=self,
        )


class RoundsConfig(Protocol):
    """The sections of a recipe config (``vlalign.recipes.dpo.Config``) that the rounds read and replace."""

    model: ModelConfig
    ref_model: str
    data: DataConfig
    train: TrainConfig
    online: OnlineConfig
    save: str


C = TypeVar("C", bound=RoundsConfig)


@dataclass
class RoundResult:
    """What one round made and measured."""

    round: int
    model: str
    pairs: int
    pair_stats: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float


def round_prompts(samples: list[Any], cfg: OnlineConfig, *, seed: int, round_: int) -> list[Any]:
    """The prompts of round ``round_``: a seeded draw without replacement (all when prompts_per_round is 0)."""
    if cfg.prompts_per_round <= 0 or cfg.prompts_per_round >= len(samples):
        return list(samples)
    return random.Random(f"vlalign-online/{seed}/{round_}").sample(list(samples), cfg.prompts_per_round)


def sample_and_rank_round(policy_path: str, cfg: RoundsConfig, out_dir: Path, round_: int) -> dict[str, Any]:
    """Sample answers of the round's policy and write the ranked pairs; returns the pair statistics."""
    o = cfg.online
    data_path = resolve_data(o.prompts)
    prompts = round_prompts(load_samples(data_path, "prompt"), o, seed=cfg.train.seed, round_=round_)
    scorer = build_scorer(o.scorer, find_vocabulary(o.vocabulary, data_path))
    path = resolve_model(policy_path, seed=cfg.model.tiny_seed)
    model, processor = load_model_and_processor(path, dtype=cfg.model.dtype, device=cfg.model.device)
    kwargs = {"seed": cfg.train.seed * 1000 + round_, **settings_kwargs(o.generation)}
    if o.generation.engine == "vllm" and o.generation.vllm_server:  # the server takes this round's weights
        base = resolve_model(cfg.model.name_or_path, seed=cfg.model.tiny_seed)
        gens = ServerEngine(o.generation.vllm_server, base, processor).generate(model, prompts, **kwargs)
    elif o.generation.engine == "vllm":  # an engine for this round's saved policy (docs/vllm.md)
        gens = generate_once(path, model, processor, prompts, options=options_of(o.generation), **kwargs)
    else:
        gens = generate(
            model, processor, prompts, progress=cfg.train.progress, desc=f"round {round_}: sampling", **kwargs
        )
    del model
    pairs, stats = sample_and_rank(
        prompts,
        gens.texts,
        scorer,
        threshold=o.threshold,
        pairing=o.pairing,
        max_pairs_per_prompt=o.max_pairs_per_prompt,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_samples(pairs, out_dir / "pairs.jsonl")
    summary = {
        **stats.summary(),
        "prompts": len(prompts),
        "sampled_tokens": gens.new_tokens,
        "sampling_seconds": gens.seconds,
    }
    (out_dir / "pairs.stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"round {round_}: {stats.describe()}")
    return summary


def round_config(cfg: C, *, policy: str, reference: str, out_dir: Path, last: bool, resume: bool) -> C:
    """The offline DPO config of one round."""
    save = cfg.save if last else ("merged" if cfg.model.use_lora else "full")
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name_or_path=policy),
        ref_model=reference,
        data=dataclasses.replace(cfg.data, train=str(out_dir / "pairs.jsonl"), image_root=""),
        train=dataclasses.replace(cfg.train, output_dir=str(out_dir), resume=resume, overwrite=not resume),
        online=dataclasses.replace(cfg.online, rounds=0),
        save=save,
    )


def run_rounds(cfg: C, train: Callable[[C], dict[str, Any]]) -> dict[str, Any]:
    """All rounds (resuming finished ones), each trained by ``train`` (offline DPO) on the round's
    config; returns the last round's metrics plus ``online/*`` counts."""
    state = PartialState()
    root = Path(cfg.train.output_dir)
    if cfg.online.rounds < 1:
        raise ValueError("online.rounds must be >= 1 for iterative DPO")
    if cfg.online.generation.engine == "vllm":  # fail before the first round when vLLM cannot run it
        base = resolve_model(cfg.model.name_or_path, seed=cfg.model.tiny_seed)
        if cfg.online.generation.vllm_server:
            check_server(cfg.online.generation.vllm_server, base)
        else:
            check_vllm(base, option="online.generation.engine")
    results: list[RoundResult] = []
    summary_path = root / "rounds.json"
    previous = {r["round"]: r for r in json.loads(summary_path.read_text())} if summary_path.exists() else {}
    policy = cfg.model.name_or_path
    for r in range(1, cfg.online.rounds + 1):
        out_dir = root / f"round-{r}"
        start = time.perf_counter()
        if (out_dir / "model").is_dir() and r in previous:
            results.append(RoundResult(**previous[r]))
            policy = str(out_dir / "model")
            continue
        if not (out_dir / "pairs.stats.json").exists() and state.is_main_process:
            sample_and_rank_round(policy, cfg, out_dir, r)
        state.wait_for_everyone()
        stats = json.loads((out_dir / "pairs.stats.json").read_text())
        metrics: dict[str, Any] = {}
        if stats["made"] >= cfg.train.batch_size * cfg.train.grad_accum * state.num_processes:
            resume = (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").iterdir())
            # '' = the round's starting policy; else --ref-model, or the initial model when kept fixed
            reference = cfg.ref_model or ("" if cfg.online.update_reference or r == 1 else cfg.model.name_or_path)
            metrics = train(
                round_config(
                    cfg, policy=policy, reference=reference, out_dir=out_dir, last=r == cfg.online.rounds, resume=resume
                )
            )
            policy = str(out_dir / "model")
        else:
            print(f"round {r}: only {stats['made']} pairs, fewer than one global batch; the policy stays as it was")
        results.append(RoundResult(r, policy, stats["made"], stats, metrics, time.perf_counter() - start))
        if state.is_main_process:
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps([dataclasses.asdict(x) for x in results], indent=1) + "\n")
        state.wait_for_everyone()
    if state.is_main_process and Path(policy).resolve() != (root / "model").resolve():
        shutil.rmtree(root / "model", ignore_errors=True)
        if Path(policy).is_dir():
            shutil.copytree(policy, root / "model")
    state.wait_for_everyone()
    final = dict(results[-1].metrics) if results else {}
    final.update({"online/rounds": float(len(results)), "online/pairs": float(sum(x.pairs for x in results))})
    return final
