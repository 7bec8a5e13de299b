"""AMBER from its published files (``vlalign eval --bench=amber``).

Files (junyangwang0410/AMBER): ``data/annotations.json``, a query file of ``data/query/``
(``query_all.json`` for everything; ``query_generative.json``, ``query_discriminative*.json`` for
a part) and the image folder. Generative queries (``Describe this image.``) are answered with up
to ``max_new_tokens`` (512) tokens, the yes/no queries with up to ``answer_max_new_tokens``.

AMBER's script compares a discriminative response with exactly ``"Yes"`` / ``"No"`` (its README
asks for responses in that form); ``answer_rule=yes_no`` (default) turns each answer into that
form with POPE's official reading (*No* when the first sentence has the word ``No``, ``no`` or
``not``), ``exact`` passes the raw text (then ``"Yes."`` is wrong whatever the truth). Both the raw
answer (``output``) and the response scored (``response``) are in each record, and the responses
are written in AMBER's format (``amber_responses.json``) for ``inference.py``.

Metrics (fractions, from exact counts): ``amber/<group>/{accuracy, precision, recall, f1}`` for
the groups discriminative, existence, attribute, state, number, action, relation (*No* is the
positive class), and ``amber/generative/{chair, cover, hal, cog}``; ``official`` holds the
numbers as ``inference.py`` prints them (percent, rounded to 0.1, its +0.001 guards included).
The generative part's noun extraction differs from the script's (no POS tagger, ``lemminflect``
instead of WordNet, no spaCy similarity): see :mod:`vlalign.eval.benchmarks.amber`;
``nouns`` and ``similar`` take the user's own functions (``file.py:name``) to reproduce it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal

import numpy as np

from vlalign.config import ConfigError, StrictFields
from vlalign.eval.benchmarks import (
    AmberAnnotation,
    BenchmarkFileError,
    amber_discriminative_metrics,
    amber_generative_metrics,
    amber_nouns,
    pope_answer_official,
    read_amber_annotations,
    read_amber_queries,
)
from vlalign.eval.benchmarks.amber import DIMENSIONS, GENERATIVE
from vlalign.eval.official.common import (
    BenchItem,
    BenchScore,
    PreparedBench,
    base_record,
    check_images,
    image_folder,
    join_prompt,
    make_item,
    sha256_of,
)
from vlalign.eval.paired import metrics_from_counts, record_counts
from vlalign.rewards.user import load_user_function


@dataclass
class AmberBenchConfig(StrictFields):
    """AMBER read from its published files."""

    annotations: str = ""
    """AMBER's data/annotations.json (required)."""
    queries: str = ""
    """A query file of AMBER's data/query/ (query_all.json: every task) (required)."""
    questions: int = 0
    """Queries asked, the first in file order (0: all)."""
    answer_rule: Literal["yes_no", "exact"] = "yes_no"
    """Yes/no answers: yes_no (read with POPE's rule, scored as 'Yes'/'No') or exact (the raw text, as inference.py compares it)."""
    prompt_suffix: str = ""
    """Text added after every yes/no query, after a space."""
    nouns: str = ""
    """Noun extraction of the generative part, file.py:name of (text) -> nouns ('' : vlalign's, without POS tagger)."""
    similar: str = ""
    """Near-synonym test of the generative part, file.py:name of (word, word) -> bool ('' : none; the script uses spaCy > 0.8)."""
    max_new_tokens: int = 512
    """Longest description (generative queries) in tokens."""
    answer_max_new_tokens: int = 128
    """Longest yes/no answer in tokens."""
    batch_size: int = 8
    """Prompts per generation batch."""


def prepare_amber(cfg: AmberBenchConfig, images: str) -> PreparedBench:
    """Read and check the annotations, the queries and every image; nothing is generated."""
    if not cfg.annotations or not cfg.queries:
        raise ConfigError(
            "--bench=amber needs --amber.annotations=data/annotations.json and --amber.queries=data/query/query_all.json"
        )
    root = image_folder(images, "amber", "AMBER's image folder")
    annotations = read_amber_annotations(cfg.annotations)
    queries = read_amber_queries(cfg.queries)
    if cfg.questions > 0:
        queries = queries[: cfg.questions]
    if not queries:
        raise BenchmarkFileError(cfg.queries, "no queries")
    for q in queries:
        if q.id not in annotations:
            raise BenchmarkFileError(q.source, f"id {q.id} is not in {cfg.annotations}", line=q.line, column="id")
    check_images(((q.image, q.source, q.line, "image") for q in queries), root)
    nouns = load_user_function(cfg.nouns) if cfg.nouns else amber_nouns
    similar = load_user_function(cfg.similar) if cfg.similar else None
    items = []
    for q in queries:
        ann = annotations[q.id]
        info: dict[str, Any] = {"id": str(q.id), "image": q.image, "question": q.query, "type": ann.type}
        if ann.type == GENERATIVE:
            items.append(make_item("amber/generative", str(q.id), root / q.image, q.query, info, cfg.max_new_tokens))
        else:
            info["label"] = ann.truth
            part = f"amber/{DIMENSIONS[ann.type]}"
            text = join_prompt(q.query, cfg.prompt_suffix)
            items.append(make_item(part, str(q.id), root / q.image, text, info, cfg.answer_max_new_tokens))
    settings = {
        "answer_rule": cfg.answer_rule,
        "queries": len(items),
        "prompt_suffix": cfg.prompt_suffix,
        "nouns": cfg.nouns or "vlalign (lemminflect, no POS tagger)",
        "similar": cfg.similar or None,
        "generation": {
            "greedy": True,
            "max_new_tokens": cfg.max_new_tokens,
            "answer_max_new_tokens": cfg.answer_max_new_tokens,
            "batch_size": cfg.batch_size,
        },
        "images": str(root),
    }
    hashes = {cfg.annotations: sha256_of(cfg.annotations), cfg.queries: sha256_of(cfg.queries)}
    scorer = partial(score_amber, items, annotations, rule=cfg.answer_rule, nouns=nouns, similar=similar)
    return PreparedBench("amber", items, hashes, settings, scorer, cfg.batch_size)


def amber_response(text: str, rule: str) -> str:
    """The response scored for a yes/no answer: ``"Yes"``/``"No"`` (``yes_no``) or the raw text (``exact``)."""
    if rule == "exact":
        return text
    if rule == "yes_no":
        return "No" if pope_answer_official(text) == "no" else "Yes"
    raise ValueError(f"unknown AMBER answer rule {rule!r}; choose yes_no or exact")


def score_amber(
    items: Sequence[BenchItem],
    annotations: Mapping[int, AmberAnnotation],
    texts: Sequence[str],
    *,
    rule: str,
    nouns: Callable[[str], list[str]] = amber_nouns,
    similar: Callable[[str, str], bool] | None = None,
) -> BenchScore:
    """AMBER's discriminative and generative metrics of the answers ``texts`` to ``items``."""
    records = []
    responses: dict[int, str] = {}
    for item, text in zip(items, texts):
        rec = base_record(item, text)
        ident = int(item.info["id"])
        if item.part == "amber/generative":
            rec["response"] = text
            one = amber_generative_metrics(annotations, {ident: text}, nouns=nouns, similar=similar)
            rec.update({k: getattr(one, k) for k in GENERATIVE_COUNTS})
        else:
            rec["response"] = amber_response(text, rule)
        responses[ident] = rec["response"]
        records.append(rec)
    summed: dict[str, float] = {}
    for rec in records:
        for key, value in record_counts(rec).items():
            summed[key] = summed.get(key, 0.0) + value
    metrics = {k: float(v) for k, v in metrics_from_counts({k: np.array(v) for k, v in summed.items()}).items()}
    official: dict[str, Any] = {"answer_rule": rule}
    lines = []
    disc = amber_discriminative_metrics(annotations, responses)
    if disc:
        official["discriminative"] = {group: asdict(m) for group, m in disc.items()}
        lines += ["| Group | Accuracy | Precision | Recall | F1 |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {g} | {m.accuracy} | {m.precision} | {m.recall} | {m.f1} |" for g, m in disc.items()]
    if any(item.part == "amber/generative" for item in items):
        gen = amber_generative_metrics(annotations, responses, nouns=nouns, similar=similar)
        official["generative"] = asdict(gen)
        lines = [
            "| CHAIR | Cover | Hal | Cog |",
            "|---:|---:|---:|---:|",
            f"| {gen.chair} | {gen.cover} | {gen.hal} | {gen.cog} |",
        ] + ([""] + lines if lines else [])
    answers = [{"id": int(r["id"]), "response": r["response"]} for r in records]
    return BenchScore(metrics, records, official, "\n".join(lines), {"amber_responses.json": answers})


GENERATIVE_COUNTS = (
    "nouns",
    "hallucinated_nouns",
    "truth_objects",
    "covered_objects",
    "targets",
    "covered_targets",
)
"""Per-response counts of the generative part kept in its record (what :mod:`vlalign.eval.paired` sums)."""
