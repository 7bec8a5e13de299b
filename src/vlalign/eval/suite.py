"""The evaluation suite: which prompts, and :func:`evaluate`, which runs a model in memory on them.

A :class:`Suite` holds held-out prompts with ground truth: POPE questions per negative-sampling
mode, descriptions (for CHAIR) and short-answer questions (task accuracy) of the held-out split,
the same of the compositional split (shape-colour combinations never seen in training, reported
beside the ordinary split), and an object vocabulary. :func:`build_suite` makes one from a
:class:`SuiteConfig`:

- the shapes world (default; ``data`` is a folder written by ``vlalign world``, or ``shapes:`` for
  the embedded default world: a named source of :mod:`vlalign.data.sources`, which
  :mod:`vlalign.shapes` registers): ``pope_<split>_<mode>.jsonl``, ``<split>_prompts.jsonl``,
  ``<compositional_split>_prompts.jsonl`` and the vocabulary of ``manifest.json``;
- a user's annotated dataset: ``data`` is a prompts file (JSONL, Parquet, a saved HF dataset)
  whose rows carry ``task`` and ``answer`` (short answers) or ``objects`` (descriptions, with
  ``task: describe`` or no task), ``pope`` maps modes to POPE files (rows with ``answer``
  Yes/No), ``compositional_data`` is an optional second prompts file, ``vocabulary`` a JSON
  ``{object: [phrases]}``.

Sample counts are capped per part (deterministic, seeded choices) so that the whole suite on the
``small`` demo model runs in well under two minutes on two CPU cores.

:func:`evaluate` generates greedily once for every distinct (image, question) of the suite
(POPE modes share their yes-questions), then computes:

=====================================  ============================================================
metric                                 meaning
=====================================  ============================================================
``pope/<mode>/{accuracy, precision,    POPE on random / popular / adversarial negatives
recall, f1, yes_ratio, unclear}``      (:mod:`vlalign.eval.pope`)
``chair/{chair_i, chair_s, recall}``   CHAIR and object recall of held-out descriptions
``task/<task>``                        accuracy per short-answer task (counting, colour, existence)
``compositional/chair/...``,           the same on the compositional split
``compositional/task/<task>``
``kl/seq``, ``kl/token_k3``            KL from ``reference`` (when given; :mod:`vlalign.eval.policy`)
``win_rate``, ``win_rate/score``,      win rate of the descriptions over ``baseline``'s under
``win_rate/baseline_score``,           ``scorer`` (when both are given); identical descriptions tie;
``win_rate/same``                      ``same`` is the share of descriptions identical to the baseline's
``perf/seconds``, ``perf/tokens_per_s`` wall time and generation speed
=====================================  ============================================================
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vlalign.config import StrictFields
from vlalign.data.annotations import ObjectVocabulary, annotations_of, load_vocabulary
from vlalign.data.io import load_samples
from vlalign.data.schema import DataError, PromptSample, data_error
from vlalign.data.sources import registered_sources, resolve
from vlalign.eval.chair import caption_report, chair
from vlalign.eval.parsing import pope_says_yes
from vlalign.eval.policy import generate_answers, kl_divergence, scored_win_rate
from vlalign.eval.pope import pope_label, pope_metrics
from vlalign.eval.tasks import DESCRIBE, answer_correct, task_accuracy, task_of
from vlalign.rewards.combine import BatchScorer

POPE_MODES: tuple[str, ...] = ("random", "popular", "adversarial")


@dataclass
class SuiteConfig(StrictFields):
    """Which evaluation suite, and how many of its samples."""

    data: str = "shapes:"
    """A shapes-world folder ('shapes:' = the embedded default world), or a custom suite's prompts file."""
    parts: tuple[str, ...] = ("pope", "heldout", "compositional")
    """Parts of the suite to run: pope, heldout (CHAIR and task accuracy), compositional."""
    split: str = "test"
    """Shapes world: the held-out split."""
    compositional_split: str = "compositional"
    """Shapes world: the split of unseen shape-colour combinations ('' to skip)."""
    compositional_data: str = ""
    """Custom suite: a second prompts file reported as the compositional split ('' for none)."""
    pope: dict[str, str] = field(default_factory=dict)
    """Custom suite: POPE files by mode ({random: file, popular: file, adversarial: file})."""
    vocabulary: str = ""
    """Object vocabulary JSON ({object: [phrases]}); '' uses the shapes world's manifest.json."""
    pope_questions: int = 300
    """POPE questions per mode (whole scenes, the same scenes in every mode; 0: all)."""
    describe: int = 100
    """Held-out descriptions scored by CHAIR (0: all)."""
    questions_per_task: int = 100
    """Held-out short-answer questions per task (0: all)."""
    compositional_describe: int = 60
    """Compositional-split descriptions (0: all)."""
    compositional_questions_per_task: int = 60
    """Compositional-split questions per task (0: all)."""
    kl_prompts: int = 48
    """Held-out prompts whose sampled completions measure the KL from a reference (0: skip KL)."""
    max_new_tokens: int = 48
    """Longest generated answer in tokens."""
    batch_size: int = 32
    """Prompts per generation batch."""
    seed: int = 0
    """Seed of which samples are drawn (and of the KL rollouts)."""


@dataclass
class Suite:
    """The prompts of an evaluation, with their ground truth in ``meta``."""

    name: str
    pope: dict[str, list[PromptSample]]
    heldout: list[PromptSample]
    compositional: list[PromptSample]
    vocabulary: ObjectVocabulary | None
    max_new_tokens: int = 48
    batch_size: int = 32
    kl_prompts: int = 48
    seed: int = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self.pope.values()) + len(self.heldout) + len(self.compositional)


@dataclass
class EvalResult:
    """Metrics of one model on a suite, with every answer it gave (``records``)."""

    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)

    def outputs(self, part: str = "heldout") -> dict[str, str]:
        """Sample id -> the model's answer, for one part of the suite."""
        return {r["id"]: r["output"] for r in self.records if r["part"] == part}


# ----------------------------------------------------------------------------- building


def _subsample(samples: list[PromptSample], per_task: int, describe: int, seed: str) -> list[PromptSample]:
    """Up to ``describe`` descriptions and ``per_task`` questions of every other task (0: all)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(task_of(s), []).append(i)
    keep: list[int] = []
    for task, idx in sorted(groups.items()):
        cap = describe if task == DESCRIBE else per_task
        keep += idx if cap <= 0 or cap >= len(idx) else random.Random(f"{seed}/{task}").sample(idx, cap)
    return [samples[i] for i in sorted(keep)]


def _scene(sample: PromptSample) -> str:
    meta = sample.meta or {}
    return str(
        meta.get("scene_id") or (sample.images[0] if sample.images and isinstance(sample.images[0], str) else sample.id)
    )


def _pope_subsample(by_mode: dict[str, list[PromptSample]], cap: int, seed: int) -> dict[str, list[PromptSample]]:
    """Whole scenes, the same in every mode, until each mode has about ``cap`` questions."""
    if cap <= 0:
        return by_mode
    scenes = sorted({_scene(s) for rows in by_mode.values() for s in rows})
    random.Random(f"pope/{seed}").shuffle(scenes)
    out: dict[str, list[PromptSample]] = {}
    for mode, rows in by_mode.items():
        per_scene: dict[str, list[PromptSample]] = {}
        for s in rows:
            per_scene.setdefault(_scene(s), []).append(s)
        chosen: list[PromptSample] = []
        for scene in scenes:
            if len(chosen) >= cap:
                break
            chosen += per_scene.get(scene, [])
        out[mode] = chosen
    return out


def _resolve_folder(data: str) -> Path:
    """``data`` as a path; a named source (``shapes:``) is the folder of its manifest."""
    for prefix in registered_sources():
        if data.startswith(prefix):
            return Path(resolve(prefix + "manifest.json")).parent
    return Path(data)


def _pope_rows(path: Path, samples: list[PromptSample]) -> list[PromptSample]:
    """``samples`` of a POPE file, each checked to have an ``answer`` Yes or No (before any model is loaded)."""
    for row, sample in enumerate(samples, start=1):
        meta = sample.meta or {}
        where = f"{path}, row {row} (id {sample.id!r}), column 'answer'"
        if "answer" not in meta:
            hint = " (a published POPE file? run it with vlalign eval --bench=pope)" if "label" in meta else ""
            raise data_error("missing column", f"{where}: missing, POPE rows need answer Yes or No{hint}")
        try:
            pope_label(meta["answer"])
        except ValueError as exc:
            raise data_error("invalid value", f"{where}: {exc}") from None
    return samples


def build_suite(cfg: SuiteConfig) -> Suite:
    """Load the suite ``cfg`` describes (see the module doc)."""
    root = _resolve_folder(cfg.data)
    if root.is_dir() and (root / "manifest.json").is_file():
        name = f"shapes:{root}"
        pope_files = {m: root / f"pope_{cfg.split}_{m}.jsonl" for m in POPE_MODES}
        pope_files = {m: p for m, p in pope_files.items() if p.is_file()}
        heldout_path: Path | None = root / f"{cfg.split}_prompts.jsonl"
        comp = root / f"{cfg.compositional_split}_prompts.jsonl" if cfg.compositional_split else None
        vocab = load_vocabulary(cfg.vocabulary or root)
    else:
        if not root.exists():
            raise FileNotFoundError(
                f"evaluation data {cfg.data!r} not found: give a shapes-world folder or a prompts file"
            )
        name = f"custom:{root}"
        pope_files = {m: Path(p) for m, p in cfg.pope.items()}
        heldout_path = root
        comp = Path(cfg.compositional_data) if cfg.compositional_data else None
        vocab = load_vocabulary(cfg.vocabulary) if cfg.vocabulary else None
    unknown = set(cfg.parts) - {"pope", "heldout", "compositional"}
    if unknown:
        raise ValueError(f"suite.parts: unknown part(s) {sorted(unknown)}; choose from pope, heldout, compositional")
    pope = {m: _pope_rows(p, load_samples(p, "prompt")) for m, p in pope_files.items()} if "pope" in cfg.parts else {}
    heldout = load_samples(heldout_path, "prompt") if "heldout" in cfg.parts and heldout_path is not None else []
    use_comp = "compositional" in cfg.parts and comp is not None and comp.exists()
    compositional = load_samples(comp, "prompt") if use_comp else []
    for part in (heldout, compositional):
        if any(task_of(s) == DESCRIBE for s in part) and vocab is None:
            raise DataError(f"suite {name}: descriptions need an object vocabulary for CHAIR; set suite.vocabulary")
    return Suite(
        name=name,
        pope=_pope_subsample(pope, cfg.pope_questions, cfg.seed),
        heldout=_subsample(heldout, cfg.questions_per_task, cfg.describe, f"{cfg.seed}/heldout"),
        compositional=_subsample(
            compositional, cfg.compositional_questions_per_task, cfg.compositional_describe, f"{cfg.seed}/compositional"
        ),
        vocabulary=vocab,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        kl_prompts=cfg.kl_prompts,
        seed=cfg.seed,
    )


# ----------------------------------------------------------------------------- evaluating


def _question(sample: PromptSample) -> str:
    return " ".join(p["text"] for m in sample.prompt for p in m["content"] if p.get("type") == "text")


def _key(sample: PromptSample) -> tuple[str, ...]:
    images = tuple(str(im) if isinstance(im, (str, Path)) else f"<{id(im)}>" for im in sample.images)
    return (*images, _question(sample))


def _parts(suite: Suite) -> list[tuple[str, PromptSample]]:
    rows = [(f"pope/{m}", s) for m, samples in suite.pope.items() for s in samples]
    return rows + [("heldout", s) for s in suite.heldout] + [("compositional", s) for s in suite.compositional]


def answer_all(model: nn.Module, processor: Any, suite: Suite, *, progress: bool = False) -> tuple[list[str], Any]:
    """The model's greedy answer to every row of :func:`_parts` (each distinct prompt asked once)."""
    rows = _parts(suite)
    unique: dict[tuple[str, ...], int] = {}
    order: list[PromptSample] = []
    for _, s in sorted(rows, key=lambda r: task_of(r[1]) == DESCRIBE):  # short answers batch together
        if _key(s) not in unique:
            unique[_key(s)] = len(order)
            order.append(s)
    gens = generate_answers(
        model,
        processor,
        order,
        max_new_tokens=suite.max_new_tokens,
        batch_size=suite.batch_size,
        progress=progress,
        desc="eval",
    )
    return [gens.texts[unique[_key(s)]][0] for _, s in rows], gens


def _split_metrics(
    prefix: str, texts: list[str], samples: list[PromptSample], vocab: ObjectVocabulary | None
) -> dict[str, float]:
    out: dict[str, float] = {}
    desc = [(t, s) for t, s in zip(texts, samples) if task_of(s) == DESCRIBE]
    if desc and vocab is not None:
        truth = [sorted(annotations_of(s, required_by="CHAIR").objects) for _, s in desc]
        res = chair([t for t, _ in desc], truth, vocab)
        out.update({f"{prefix}chair/{k}": v for k, v in res.metrics().items()})
    out.update({f"{prefix}task/{k}": v for k, v in task_accuracy(texts, samples).items()})
    return out


def _record(part: str, sample: PromptSample, text: str, vocab: ObjectVocabulary | None) -> dict[str, Any]:
    meta = sample.meta or {}
    rec: dict[str, Any] = {
        "part": part,
        "id": sample.id,
        "task": task_of(sample),
        "question": _question(sample),
        "image": str(sample.images[0]) if sample.images and isinstance(sample.images[0], (str, Path)) else None,
        "output": text,
    }
    if "answer" in meta:
        rec["answer"] = meta["answer"]
    if part.startswith("pope/"):
        rec["said_yes"] = pope_says_yes(text)
    elif rec["task"] == DESCRIBE and vocab is not None and meta.get("objects") is not None:
        report = caption_report(text, meta["objects"], vocab)
        rec.update(
            {
                "objects": list(meta["objects"]),
                "mentions": len(report.mentions),
                "hallucinated": report.hallucinated,
                "recalled": report.recalled,
            }
        )
    elif "answer" in meta:
        rec["correct"] = answer_correct(text, sample)
    return rec


def evaluate(
    model: nn.Module,
    processor: Any,
    suite: Suite,
    *,
    reference: nn.Module | None = None,
    baseline: EvalResult | None = None,
    scorer: BatchScorer | None = None,
    progress: bool = False,
) -> EvalResult:
    """Run ``suite`` on a model in memory; see the module doc for the metrics.

    ``reference``: a reference policy (same processor) for the KL metric. ``baseline`` +
    ``scorer``: the win rate of this model's held-out descriptions over the baseline's.
    """
    start = time.perf_counter()
    rows = _parts(suite)
    texts, gens = answer_all(model, processor, suite, progress=progress)
    metrics: dict[str, float] = {}
    for mode in suite.pope:
        picked = [(t, s) for (part, s), t in zip(rows, texts) if part == f"pope/{mode}"]
        if picked:
            m = pope_metrics([t for t, _ in picked], [s.meta["answer"] for _, s in picked])
            metrics.update({f"pope/{mode}/{k}": v for k, v in m.items()})
    for part, prefix in (("heldout", ""), ("compositional", "compositional/")):
        picked = [(t, s) for (p, s), t in zip(rows, texts) if p == part]
        if picked:
            metrics.update(_split_metrics(prefix, [t for t, _ in picked], [s for _, s in picked], suite.vocabulary))
    records = [_record(part, s, t, suite.vocabulary) for (part, s), t in zip(rows, texts)]
    if reference is not None and suite.kl_prompts > 0 and suite.heldout:
        prompts = random.Random(f"kl/{suite.seed}").sample(suite.heldout, min(suite.kl_prompts, len(suite.heldout)))
        kl = kl_divergence(
            model,
            reference,
            processor,
            prompts,
            max_new_tokens=suite.max_new_tokens,
            seed=suite.seed,
            batch_size=suite.batch_size,
            progress=progress,
        )
        metrics.update({"kl/seq": kl["kl"], "kl/token_k3": kl["kl_token_k3"], "kl/n": kl["kl_n"]})
    if baseline is not None and scorer is not None:
        metrics.update(_win_rate(records, baseline, scorer, suite))
    metrics["perf/seconds"] = time.perf_counter() - start
    metrics["perf/tokens_per_s"] = gens.tokens_per_s
    return EvalResult(metrics=metrics, records=records)


def _win_rate(
    records: list[dict[str, Any]], baseline: EvalResult, scorer: BatchScorer, suite: Suite
) -> dict[str, float]:
    theirs = baseline.outputs("heldout")
    samples = [s for s in suite.heldout if task_of(s) == DESCRIBE and s.id in theirs]
    if not samples:
        return {}
    ours = {r["id"]: r["output"] for r in records if r["part"] == "heldout"}
    res = scored_win_rate(scorer, samples, [ours[s.id] for s in samples], [theirs[s.id] for s in samples])
    return {
        "win_rate": res["win_rate"],
        "win_rate/score": res["score_a"],
        "win_rate/baseline_score": res["score_b"],
        "win_rate/same": res["same"],
    }


def compare(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """``a - b`` for every metric both have."""
    return {k: a[k] - b[k] for k in a if k in b}


__all__: Sequence[str] = ("EvalResult", "POPE_MODES", "Suite", "SuiteConfig", "build_suite", "compare", "evaluate")
