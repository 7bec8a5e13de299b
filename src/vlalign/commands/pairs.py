"""``vlalign pairs``: build a preference dataset by hallucination injection, image corruption,
sampling and ranking a policy's responses, or POVID's two negatives; writes ``<out>`` (JSONL or
Parquet) and ``<out stem>.stats.json`` (pairs made, dropped and why, margin distribution). An
existing ``<out>`` is replaced only with ``--overwrite=true``. Sampling (rank, povid) runs in vlalign's
decode loop, or in vLLM with ``--rank.engine=vllm`` / ``--povid.engine=vllm`` (docs/vllm.md).

Examples::

    vlalign pairs --method=inject --data=shapes:train.jsonl --out=data/pairs/inject.jsonl
    vlalign pairs --method=inject --inject.probes_per_image=1 --inject.kinds=add,count
    vlalign pairs --method=corrupt --corrupt.method=noise --corrupt.level=0.5 --out=data/pairs/noise.jsonl
    vlalign pairs --method=rank --rank.model=runs/sft/model --rank.n=8 --rank.scorer=claims \\
                  --data=shapes:train_prompts.jsonl --tasks=[describe] --out=data/pairs/rank.jsonl
    vlalign pairs --method=povid --povid.model=runs/sft/model --povid.distortion.level=0.5 \\
                  --data=shapes:train.jsonl --tasks=[describe] --out=data/pairs/povid.jsonl

POVID rows (:mod:`vlalign.data.pairs.povid`) hold the faithful response (chosen), an injected
hallucination (rejected) and ``--povid.model``'s own response to the distorted image
(``rejected_extra``): train them with ``vlalign dpo --loss.weights={povid: 1.0}``.

Injection, POVID and ranking read object annotations (an ``objects`` column) and an object vocabulary:
``--vocabulary=FILE.json`` (``{object: [phrases]}``), by default the ``manifest.json`` beside the
data file (the shapes world writes one).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlalign.config import StrictFields
from vlalign.data.annotations import ObjectVocabulary
from vlalign.data.io import load_samples, write_samples
from vlalign.data.pairs import PairStats
from vlalign.data.pairs.corrupt import CorruptConfig, corrupt_pairs, image_saver
from vlalign.data.pairs.inject import InjectConfig, inject_pairs
from vlalign.data.pairs.povid import povid_pairs
from vlalign.data.pairs.rank import sample_and_rank
from vlalign.data.schema import PromptSample
from vlalign.errors import UserError
from vlalign.eval.scorers import build_scorer
from vlalign.eval.tasks import has_task, require_rows
from vlalign.models.generate import generate
from vlalign.models.load import load_model_and_processor
from vlalign.models.tiny import resolve_model
from vlalign.models.vllm_engine import VLLMEngine, VLLMOptions, check_vllm, generate_once
from vlalign.shapes.embedded import resolve_data
from vlalign.shapes.vocabulary import find_vocabulary


@dataclass
class RankConfig(StrictFields):
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
    engine: Literal["hf", "vllm"] = "hf"
    """What samples the responses: hf (vlalign's decode loop) or vllm (a vLLM engine on the model's folder,
    started for the sampling and closed after; its own random stream, so sampled responses differ from
    hf's, greedy ones are equal; docs/vllm.md)."""
    vllm_gpu_memory_utilization: float = 0.3
    """engine = vllm: share of the GPU's memory vLLM may take (weights + KV cache); the policy needs the rest."""
    vllm_max_model_len: int = 2048
    """engine = vllm: longest prompt + response, in tokens (sizes vLLM's KV cache)."""


def _noise() -> CorruptConfig:
    return CorruptConfig(method="noise", level=0.5)


@dataclass
class PovidConfig(StrictFields):
    """POVID options: the policy whose responses to distorted images are the second negatives."""

    model: str = ""
    """The policy that answers the distorted images (a model folder, a hub name or tiny:<arch>:<size>);
    required for method=povid. POVID uses the model being aligned (e.g. the SFT model)."""
    require_worse: bool = True
    """Keep a row only when the distorted-image response is worse than the chosen (a lower claim score
    for a description, another answer for a short answer); false keeps every response that differs
    from the chosen text, as POVID does."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy, the policy's most likely response)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 48
    """Longest response in tokens."""
    batch_size: int = 16
    """Prompts per generation batch."""
    device: str = "auto"
    """Where the policy runs (auto: CUDA when available)."""
    dtype: str = "auto"
    """Policy weights dtype (auto: bf16 on capable GPUs, else float32)."""
    seed: int = 0
    """Sampling seed."""
    distortion: CorruptConfig = field(default_factory=_noise)
    """How the images are distorted (POVID: diffusion noise, method=noise)."""
    engine: Literal["hf", "vllm"] = "hf"
    """What answers the distorted images: hf (vlalign's decode loop) or vllm (a vLLM engine on the model's
    folder, started with the policy and closed when the rows are made; docs/vllm.md)."""
    vllm_gpu_memory_utilization: float = 0.3
    """engine = vllm: share of the GPU's memory vLLM may take (weights + KV cache); the policy needs the rest."""
    vllm_max_model_len: int = 2048
    """engine = vllm: longest prompt + response, in tokens (sizes vLLM's KV cache)."""


@dataclass
class Config(StrictFields):
    """Preference-pair construction."""

    method: Literal["inject", "corrupt", "rank", "povid"] = "inject"
    """inject (hallucination injection), corrupt (image corruption), rank (sample and rank) or povid
    (an injected and a distorted-image negative per row)."""
    data: str = "shapes:train.jsonl"
    """Input: faithful (prompt, completion) rows for inject / corrupt / povid; prompts (with ground truth) for rank."""
    out: str = "data/pairs/pairs.jsonl"
    """Output preference file (.jsonl, or .parquet with images embedded)."""
    overwrite: bool = False
    """Replace an existing ``out`` file instead of stopping."""
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
    povid: PovidConfig = field(default_factory=PovidConfig)
    """POVID's second negative (the injection itself follows inject)."""
    progress: bool = True
    """Show the progress bar of sampling (method=rank, povid)."""


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


Policy = RankConfig | PovidConfig


def _load_policy(policy: Policy) -> tuple[Any, Any]:
    """The model and processor of ``policy.model``."""
    return load_model_and_processor(resolve_model(policy.model), dtype=policy.dtype, device=policy.device)


def vllm_options(policy: Policy) -> VLLMOptions:
    """The vLLM engine's memory settings of ``policy`` (``vllm_*``)."""
    return VLLMOptions(
        gpu_memory_utilization=policy.vllm_gpu_memory_utilization, max_model_len=policy.vllm_max_model_len
    )


def check_engine(policy: Policy, section: str) -> None:
    """``<section>.engine=vllm``: fail before anything loads, in one line, when vLLM is missing or cannot
    load the policy (:class:`~vlalign.models.vllm_engine.VLLMError`)."""
    if policy.engine == "vllm":
        check_vllm(resolve_model(policy.model), option=f"{section}.engine")


def policy_responses(
    loaded: tuple[Any, Any],
    policy: Policy,
    samples: list[Any],
    *,
    n: int,
    progress: bool,
    desc: str,
    engine: VLLMEngine | None = None,
) -> list[list[str]]:
    """``n`` responses of the loaded policy to each sample, with ``policy``'s sampling settings and engine
    (``engine=vllm``: ``engine`` when given, else one started for this call and closed after)."""
    model, processor = loaded
    settings = {
        "n": n,
        "temperature": policy.temperature,
        "top_p": policy.top_p,
        "max_new_tokens": policy.max_new_tokens,
        "seed": policy.seed,
        "batch_size": policy.batch_size,
    }
    if engine is not None:
        gens = engine.generate(model, samples, **settings)
    elif policy.engine == "vllm":
        options = vllm_options(policy)
        gens = generate_once(resolve_model(policy.model), model, processor, samples, options=options, **settings)
    else:
        gens = generate(model, processor, samples, progress=progress, desc=desc, **settings)
    print(f"sampled {gens.new_tokens} tokens in {gens.seconds:.1f} s ({gens.tokens_per_s:.0f} tokens/s)")
    return gens.texts


def _povid(cfg: Config, data_path: str, vocab: ObjectVocabulary | None) -> tuple[list[Any], PairStats]:
    """POVID rows: injection, then ``cfg.povid.model``'s responses to the distorted images."""
    p = cfg.povid
    if not p.model:
        raise SystemExit("vlalign pairs: method=povid needs --povid.model (the policy that answers distorted images)")
    check_engine(p, "povid")
    samples = _load(cfg, data_path, "supervised")
    vocab = _require_vocabulary(vocab, "povid")
    loaded: list[tuple[Any, Any]] = []  # the policy, loaded at the first call
    engines: list[VLLMEngine] = []  # engine=vllm: one engine for every chunk, started with the policy

    def respond(prompts: Sequence[PromptSample]) -> list[str]:
        if not loaded:
            loaded.append(_load_policy(p))
            if p.engine == "vllm":
                dtype = next(loaded[0][0].parameters()).dtype
                engines.append(VLLMEngine(resolve_model(p.model), loaded[0][1], dtype=dtype, options=vllm_options(p)))
        texts = policy_responses(
            loaded[0],
            p,
            list(prompts),
            n=1,
            progress=cfg.progress,
            desc="distorted images",
            engine=next(iter(engines), None),
        )
        return [group[0] for group in texts]

    try:
        return povid_pairs(
            samples, vocab, respond, inject=cfg.inject, distortion=p.distortion, require_worse=p.require_worse
        )
    finally:
        for engine in engines:
            engine.close()


def build_pairs(cfg: Config, data_path: str, out_dir: Path) -> tuple[list[Any], PairStats]:
    """Run the configured method on the data at ``data_path``."""
    vocab = find_vocabulary(cfg.vocabulary, data_path)
    if cfg.method == "inject":
        samples = _load(cfg, data_path, "supervised")
        return inject_pairs(samples, _require_vocabulary(vocab, "inject"), cfg.inject)
    if cfg.method == "corrupt":
        samples = _load(cfg, data_path, "supervised")
        return corrupt_pairs(samples, cfg.corrupt, save_image=image_saver(out_dir, Path(cfg.out).stem + "_images"))
    if cfg.method == "povid":
        return _povid(cfg, data_path, vocab)
    if not cfg.rank.model:
        raise SystemExit("vlalign pairs: method=rank needs --rank.model (the policy whose responses are ranked)")
    check_engine(cfg.rank, "rank")
    samples = _load(cfg, data_path, "prompt")
    scorer = build_scorer(cfg.rank.scorer, vocab)
    r = cfg.rank
    texts = policy_responses(_load_policy(r), r, samples, n=r.n, progress=cfg.progress, desc="sampling")
    return sample_and_rank(
        samples,
        texts,
        scorer,
        threshold=r.threshold,
        pairing=r.pairing,
        max_pairs_per_prompt=r.max_pairs_per_prompt,
    )


def run(cfg: Config) -> int:
    """Build the pairs, write them and their statistics, print the summary."""
    start = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite=true to replace it, or choose another --out")
    data_path = resolve_data(cfg.data)
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
