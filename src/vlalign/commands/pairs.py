"""``vlalign pairs``: build a preference dataset by hallucination injection, image corruption, or
sampling and ranking a policy's responses; writes ``<out>`` (JSONL or Parquet) and
``<out stem>.stats.json`` (pairs made, dropped and why, margin distribution).

Examples::

    vlalign pairs --method=inject --data=shapes:train.jsonl --out=data/pairs/inject.jsonl
    vlalign pairs --method=inject --inject.probes_per_image=1 --inject.kinds=add,count
    vlalign pairs --method=corrupt --corrupt.method=noise --corrupt.level=0.5 --out=data/pairs/noise.jsonl
    vlalign pairs --method=rank --rank.model=runs/sft/model --rank.n=8 --rank.scorer=claims \\
                  --data=shapes:train_prompts.jsonl --tasks=[describe] --out=data/pairs/rank.jsonl

Injection and ranking read object annotations (an ``objects`` column) and an object vocabulary:
``--vocabulary=FILE.json`` (``{object: [phrases]}``), by default the ``manifest.json`` beside the
data file (the shapes world writes one).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlalign.data.annotations import ObjectVocabulary
from vlalign.data.io import load_samples, write_samples
from vlalign.data.pairs import PairStats
from vlalign.data.pairs.corrupt import CorruptConfig, corrupt_pairs, image_saver
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.data.pairs.rank import sample_and_rank
from vlalign.eval.scorers import build_scorer
from vlalign.eval.tasks import has_task, require_rows
from vlalign.models.generate import generate
from vlalign.models.load import load_model_and_processor
from vlalign.models.tiny import resolve_model
from vlalign.shapes.embedded import resolve_data
from vlalign.shapes.vocabulary import find_vocabulary


@dataclass
class RankConfig:
    """Sample-and-rank options."""

    model: str = ""
    """The policy that answers (a model folder, a hub name or tiny:<arch>:<size>); required for method=rank."""
    n: int = 4
    """Responses sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling threshold."""
    max_new_tokens: int = 48
    """Longest response in tokens."""
    batch_size: int = 16
    """Prompts per generation batch."""
    scorer: str = "claims"
    """ground_truth, claims (claim-level verification), a reward model folder (vlalign rm's <run>/model),
    or file.py:name / module:name of a scorer."""
    threshold: float = 0.25
    """Smallest score gap between chosen and rejected."""
    pairing: Literal["best_worst", "all"] = "best_worst"
    """best_worst: best vs worst response of each prompt; all: every pair whose gap reaches the threshold."""
    max_pairs_per_prompt: int = 1
    """At most this many pairs per prompt."""
    device: str = "auto"
    """Where the policy runs (auto: CUDA when available)."""
    dtype: str = "auto"
    """Policy weights dtype (auto: bf16 on capable GPUs, else float32)."""
    seed: int = 0
    """Sampling seed."""


@dataclass
class Config:
    """Preference-pair construction."""

    method: Literal["inject", "corrupt", "rank"] = "inject"
    """inject (hallucination injection), corrupt (image corruption) or rank (sample and rank)."""
    data: str = "shapes:train.jsonl"
    """Input: faithful (prompt, completion) rows for inject / corrupt; prompts (with ground truth) for rank."""
    out: str = "data/pairs/pairs.jsonl"
    """Output preference file (.jsonl, or .parquet with images embedded)."""
    vocabulary: str = ""
    """Object vocabulary JSON ({object: [phrases]}); '' uses the manifest.json beside the data file, if any."""
    tasks: tuple[str, ...] = ()
    """Use only input rows whose task column is one of these (e.g. [describe]); empty: every row."""
    limit: int = 0
    """Use at most this many input rows (0: all), counted after the tasks filter."""
    inject: InjectConfig = field(default_factory=InjectConfig)
    """Hallucination injection."""
    corrupt: CorruptConfig = field(default_factory=CorruptConfig)
    """Image corruption."""
    rank: RankConfig = field(default_factory=RankConfig)
    """Sample and rank."""
    progress: bool = True
    """Show the progress bar of sampling (method=rank)."""


def _require_vocabulary(vocab: ObjectVocabulary | None, method: str) -> ObjectVocabulary:
    if vocab is None:
        raise SystemExit(
            f"vlalign pairs: method={method} needs an object vocabulary: pass --vocabulary=FILE.json "
            "({object: [phrases]}) or put the data beside a shapes-world manifest.json"
        )
    return vocab


def _load(cfg: Config, data_path: str, kind: str) -> list[Any]:
    """The input rows: the first ``cfg.limit`` of those whose task is in ``cfg.tasks``."""
    samples = load_samples(data_path, kind, limit=cfg.limit or None, keep=has_task(cfg.tasks))
    return require_rows(samples, cfg.tasks, source=data_path, option="tasks") if cfg.tasks else samples


def build_pairs(cfg: Config, data_path: str, out_dir: Path) -> tuple[list[Any], PairStats]:
    """Run the configured method on the data at ``data_path``."""
    vocab = find_vocabulary(cfg.vocabulary, data_path)
    if cfg.method == "inject":
        samples = _load(cfg, data_path, "supervised")
        return inject_pairs(samples, _require_vocabulary(vocab, "inject"), cfg.inject)
    if cfg.method == "corrupt":
        samples = _load(cfg, data_path, "supervised")
        return corrupt_pairs(samples, cfg.corrupt, save_image=image_saver(out_dir, Path(cfg.out).stem + "_images"))
    if not cfg.rank.model:
        raise SystemExit("vlalign pairs: method=rank needs --rank.model (the policy whose responses are ranked)")
    samples = _load(cfg, data_path, "prompt")
    scorer = build_scorer(cfg.rank.scorer, vocab)
    model, processor = load_model_and_processor(
        resolve_model(cfg.rank.model), dtype=cfg.rank.dtype, device=cfg.rank.device
    )
    r = cfg.rank
    gens = generate(
        model,
        processor,
        samples,
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        max_new_tokens=r.max_new_tokens,
        seed=r.seed,
        batch_size=r.batch_size,
        progress=cfg.progress,
        desc="sampling",
    )
    print(f"sampled {gens.new_tokens} tokens in {gens.seconds:.1f} s ({gens.tokens_per_s:.0f} tokens/s)")
    return sample_and_rank(
        samples,
        gens.texts,
        scorer,
        threshold=r.threshold,
        pairing=r.pairing,
        max_pairs_per_prompt=r.max_pairs_per_prompt,
    )


def run(cfg: Config) -> int:
    """Build the pairs, write them and their statistics, print the summary."""
    start = time.perf_counter()
    data_path = resolve_data(cfg.data)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs, stats = build_pairs(cfg, data_path, out.parent)
    write_samples(pairs, out)
    summary = stats.summary()
    summary.update({"data": cfg.data, "out": str(out), "seconds": time.perf_counter() - start})
    stats_path = out.with_name(out.stem + ".stats.json")
    stats_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(stats.describe())
    print(f"wrote {len(pairs)} pairs to {out} and statistics to {stats_path}")
    return 0
