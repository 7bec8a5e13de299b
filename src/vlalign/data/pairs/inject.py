"""Hallucination injection (as in POVID and HA-DPO): a faithful response and a corrupted copy.

From a faithful response (the dataset's completion) and the image's object annotations, the
rejected response makes exactly one false statement of one of three kinds:

- ``add``: mention an object that is absent, preferring the absent object that co-occurs most
  with the objects present (co-occurrence counted over the input dataset's images), which is the
  hallucination a language prior produces;
- ``attribute``: change the attribute of a mentioned object into an absent variant with the same
  noun (``"red circle"`` -> ``"green circle"``: object names of the form ``"<attribute> <noun>"``);
- ``count``: state a wrong number for a mentioned object (needs a count in the text);
- ``noun``: change the noun of a mentioned object into an absent object with the same attribute
  (``"purple square"`` -> ``"purple circle"``): the error of a model that sees colours but
  confuses shapes, which is what the shapes world's demo model does.

Descriptions in a registered canonical phrasing (:func:`register_caption_style`; the shapes
world's captions, :mod:`vlalign.shapes.vocabulary`, when :mod:`vlalign.shapes` is imported) are
rewritten canonically, so the rejected caption reads exactly like a model's caption
(``"The image shows a red circle and a blue square."`` with an added co-occurring object
becomes ``"The image shows a red circle, a blue square and a green triangle."``); any other text
is edited in place (a phrase inserted after the last mention, an attribute or a count word
replaced). Short answers become wrong answers of the same kind: existence ``No`` -> ``Yes``
(an absent object affirmed) and, with ``balance_existence``, ``Yes`` -> ``No`` (a present
object denied; without it questions about present objects are skipped), a count off by one,
another colour whose object is absent.

``probes_per_image`` adds, per distinct image, existence questions about the absent objects that
co-occur most with those present (chosen ``No``, rejected ``Yes``): POPE's adversarial setting,
as training pairs; with ``balance_existence``, as many about present objects (chosen ``Yes``).

Everything needs object annotations (``meta["objects"]``) and an object vocabulary with
synonyms (:class:`~vlalign.data.annotations.ObjectVocabulary`), given as an argument; a row without annotations is a
:class:`~vlalign.data.schema.DataError` naming it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlalign.config import StrictFields
from vlalign.data.annotations import (
    DESCRIBE,
    NUMBER_WORDS,
    Annotations,
    Mention,
    ObjectVocabulary,
    annotations_of,
    task_of,
)
from vlalign.data.pairs import PairStats, pair_meta
from vlalign.data.pairs.rank import claim_score
from vlalign.data.schema import PreferenceSample, SupervisedSample, user_prompt

INJECTION_KINDS: tuple[str, ...] = ("add", "attribute", "count", "noun")

CaptionStyle = Callable[[list[tuple[int, str, str]]], str]
"""``render([(count, attribute, noun), ...]) -> caption``: a canonical way of describing objects."""

_CAPTION_STYLES: dict[str, CaptionStyle] = {}


def register_caption_style(name: str, render: CaptionStyle) -> None:
    """Rewrite descriptions written in ``render``'s canonical phrasing canonically (see the module
    doc); the shapes world registers its captions when :mod:`vlalign.shapes` is imported."""
    _CAPTION_STYLES[name] = render


@dataclass
class InjectConfig(StrictFields):
    """Hallucination injection options."""

    kinds: tuple[str, ...] = ("add", "attribute", "count")
    """Kinds of injected error to use (any of add, attribute, count, noun); each pair gets one,
    drawn at random among those that apply. ``noun`` is not in the default: in the demo (mDPO
    from the base model, 150 steps) adding it gave CHAIR_i 0.415 instead of 0.426 and POPE
    adversarial F1 0.872 instead of 0.869, within the noise of 300 descriptions."""
    pairs_per_sample: int = 1
    """Pairs made from each faithful response (each with a different rejected response)."""
    tasks: tuple[str, ...] = ("describe", "existence", "counting", "colour")
    """Tasks (meta 'task') whose rows are used; rows without a task are descriptions."""
    prefer_cooccurring: bool = True
    """Added objects (and new attributes) are the absent ones that co-occur most with those present;
    false draws them uniformly."""
    probes_per_image: int = 0
    """Extra existence-question pairs per distinct image about co-occurring absent objects (chosen No, rejected Yes)."""
    balance_existence: bool = True
    """Existence pairs about present objects too (chosen Yes, rejected No: a present object denied),
    and as many present-object probes as absent ones, so that the pairs do not teach "always No"
    (false: only absent objects, the POVID / HA-DPO setting)."""
    probe_question: str = "Is there {article} {object} in the image?"
    """Question template of the probes ({article} is a/an, {object} the object name)."""
    yes: str = "Yes"
    """Answer text for yes (probes)."""
    no: str = "No"
    """Answer text for no (probes)."""
    seed: int = 0
    """Seed of the random choices (the output is a pure function of the inputs and this seed)."""


@dataclass
class ObjectStats:
    """Per object, the images holding it; per pair, the images holding both (over distinct images)."""

    frequency: dict[str, int] = field(default_factory=dict)
    cooccurrence: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, samples: Sequence[Any]) -> ObjectStats:
        """Count over the distinct images of ``samples`` (by ``meta["scene_id"]`` or first image)."""
        seen: dict[str, frozenset[str]] = {}
        for s in samples:
            ann = annotations_of(s, required_by="hallucination injection")
            assert ann is not None
            seen.setdefault(image_key(s), ann.objects)
        out = cls()
        for objects in seen.values():
            for a in objects:
                out.frequency[a] = out.frequency.get(a, 0) + 1
                row = out.cooccurrence.setdefault(a, {})
                for b in objects:
                    if b != a:
                        row[b] = row.get(b, 0) + 1
        return out

    def rank_absent(
        self, present: Sequence[str], candidates: Sequence[str], rng: random.Random, prefer: bool
    ) -> list[str]:
        """``candidates`` best first: most co-occurring with ``present`` (then most frequent) when
        ``prefer``, else shuffled; ties keep a seeded random order."""
        pool = list(candidates)
        rng.shuffle(pool)
        if not prefer:
            return pool

        def key(name: str) -> tuple[int, int]:
            return (-sum(self.cooccurrence.get(p, {}).get(name, 0) for p in present), -self.frequency.get(name, 0))

        return sorted(pool, key=key)


def image_key(sample: Any) -> str:
    """What identifies a sample's image: ``meta["scene_id"]``, else its first image path, else its id."""
    meta = getattr(sample, "meta", None) or {}
    if meta.get("scene_id") is not None:
        return str(meta["scene_id"])
    if sample.images and isinstance(sample.images[0], str):
        return sample.images[0]
    return str(sample.id)


# ----------------------------------------------------------------------------- text edits


def article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def _noun(name: str) -> str:
    return name.rsplit(" ", 1)[-1]


def _attribute(name: str) -> str:
    return name.rsplit(" ", 1)[0] if " " in name else ""


def attribute_variants(name: str, vocab: ObjectVocabulary) -> list[str]:
    """Objects of the vocabulary with the same noun and another attribute (``red circle`` -> ``green circle``...)."""
    noun = _noun(name)
    return [n for n in vocab.names if n != name and " " in n and _noun(n) == noun]


def noun_variants(name: str, vocab: ObjectVocabulary) -> list[str]:
    """Objects with the same attribute and another noun (``purple square`` -> ``purple circle``...)."""
    attribute = _attribute(name)
    return [n for n in vocab.names if n != name and " " in n and _attribute(n) == attribute and attribute]


def canonical_groups(text: str, vocab: ObjectVocabulary) -> tuple[list[tuple[int, str]], CaptionStyle] | None:
    """``([(count, name), ...], style)`` if ``text`` is a caption in a registered canonical style, else None."""
    mentions = vocab.find(text)
    if not mentions or any(m.negated or m.count is None or " " not in m.name for m in mentions):
        return None
    groups = [(int(m.count), m.name) for m in mentions]
    for style in _CAPTION_STYLES.values():
        if render_groups(groups, vocab, style) == text.strip():
            return groups, style
    return None


def render_groups(groups: Sequence[tuple[int, str]], vocab: ObjectVocabulary, style: CaptionStyle) -> str:
    """The caption of ``(count, name)`` groups in ``style``, put in the vocabulary's (canonical) order."""
    order = {n: i for i, n in enumerate(vocab.names)}
    ordered = sorted(groups, key=lambda g: order.get(g[1], len(order)))
    return style([(c, _attribute(n), _noun(n)) for c, n in ordered])


def _count_word(old: str, value: int) -> str:
    if old.isdigit():
        return str(value)
    word = NUMBER_WORDS[value] if value < len(NUMBER_WORDS) else str(value)
    return word.capitalize() if old[:1].isupper() else word


def _plural_phrase(m: Mention, vocab: ObjectVocabulary) -> str | None:
    phrases = set(vocab.to_dict()[m.name])
    low = m.phrase.lower()
    for suffix in ("s", "es"):
        if low + suffix in phrases:
            return m.phrase + suffix
    return None


def _swap_phrase(phrase: str, old: str, new: str, kind: str) -> str | None:
    """``phrase`` (a mention of ``old``) naming ``new`` instead; None if its wording is not
    ``<attribute> <noun>``-like enough to edit (e.g. a plural noun swapped)."""
    if kind == "attribute":
        old_attr, new_attr = _attribute(old), _attribute(new)
        if phrase.lower().startswith(old_attr + " "):
            return new_attr + phrase[len(old_attr) :]
        return new_attr + " " + phrase.split(" ", 1)[-1]
    old_noun = _noun(old)
    if phrase.lower().endswith(old_noun):
        return phrase[: len(phrase) - len(old_noun)] + _noun(new)
    return None


@dataclass(frozen=True)
class Injection:
    """One rejected text and what was injected."""

    text: str
    kind: str
    detail: str


class Injector:
    """Makes rejected responses for one dataset (vocabulary + co-occurrence statistics)."""

    def __init__(
        self,
        vocab: ObjectVocabulary,
        stats: ObjectStats,
        *,
        prefer_cooccurring: bool = True,
        deny_present: bool = False,
    ) -> None:
        self.vocab = vocab
        self.stats = stats
        self.prefer = prefer_cooccurring
        self.deny_present = deny_present

    # descriptions ---------------------------------------------------------------------------

    def describe(self, text: str, ann: Annotations, kind: str, rng: random.Random) -> Injection | str:
        """A rejected description of ``kind``, or the reason none can be made."""
        mentions = [m for m in self.vocab.find(text) if not m.negated]
        canonical = canonical_groups(text, self.vocab)
        groups, style = canonical if canonical is not None else (None, None)
        if kind == "add":
            said = {m.name for m in mentions}
            absent = [n for n in self.vocab.names if n not in ann.objects and n not in said]
            if not absent:
                return "no absent object to add"
            new = self.stats.rank_absent(sorted(ann.objects), absent, rng, self.prefer)[0]
            if groups is not None:
                return Injection(render_groups([*groups, (1, new)], self.vocab, style), kind, new)
            if not mentions:
                return Injection(f"{text.rstrip()} There is also {article(new)} {new}.", kind, new)
            end = mentions[-1].end
            return Injection(f"{text[:end]} and {article(new)} {new}{text[end:]}", kind, new)
        if kind in ("attribute", "noun"):
            variants_of = attribute_variants if kind == "attribute" else noun_variants
            options = [
                (m, v)
                for m in mentions
                for v in variants_of(m.name, self.vocab)
                if v not in ann.objects and v not in {x.name for x in mentions}
            ]
            if not options:
                return f"no absent {kind} variant"
            targets = self.stats.rank_absent(sorted(ann.objects), sorted({v for _, v in options}), rng, self.prefer)
            new = targets[0]
            m = rng.choice([m for m, v in options if v == new])
            if groups is not None:
                changed = [(c, new if n == m.name else n) for c, n in groups]
                return Injection(render_groups(changed, self.vocab, style), kind, f"{m.name} -> {new}")
            replaced = _swap_phrase(m.phrase, m.name, new, kind)
            if replaced is None:
                return f"no {kind} to swap in {m.phrase!r}"
            return Injection(text[: m.start] + replaced + text[m.end :], kind, f"{m.name} -> {new}")
        if kind == "count":
            counted = [m for m in mentions if m.count is not None and m.count > 0 and m.name in ann.objects]
            if not counted:
                return "no count to change"
            m = rng.choice(counted)
            new_count = m.count + 1 if m.count == 1 else m.count + rng.choice((-1, 1))
            if groups is not None:
                changed = [(new_count if n == m.name else c, n) for c, n in groups]
                return Injection(render_groups(changed, self.vocab, style), kind, f"{m.name}: {m.count} -> {new_count}")
            return self._recount_text(text, m, new_count)
        raise ValueError(f"unknown injection kind {kind!r}; choose from {INJECTION_KINDS}")

    def _recount_text(self, text: str, m: Mention, new_count: int) -> Injection | str:
        before = text[: m.start].rstrip()
        word_start = max(before.rfind(" "), before.rfind("\n")) + 1
        old = before[word_start:]
        if old.lower() in ("a", "an", "single", "one"):
            plural = _plural_phrase(m, self.vocab)
            if plural is None:
                return "no plural form to miscount"
            number = _count_word("Two" if old[:1].isupper() else "two", new_count)
            return Injection(
                text[:word_start] + number + " " + plural + text[m.end :],
                "count",
                f"{m.name}: {m.count} -> {new_count}",
            )
        return Injection(
            text[:word_start] + _count_word(old, new_count) + text[len(before) :],
            "count",
            f"{m.name}: {m.count} -> {new_count}",
        )

    # short answers --------------------------------------------------------------------------

    def short_answer(self, sample: Any, answer: str, ann: Annotations, rng: random.Random) -> Injection | str:
        """A wrong answer of the same kind for an existence, counting or colour question."""
        task = task_of(sample)
        meta = sample.meta
        if task == "existence":
            said = answer.strip().lower().rstrip(".")
            if said == "no":
                flipped = ("Yes" if answer.strip()[0].isupper() else "yes") + answer.strip()[2:]
                return Injection(flipped, "add", str(meta.get("question_object", "")))
            if said != "yes" or not self.deny_present:
                return "asks about a present object"
            denied = ("No" if answer.strip()[0].isupper() else "no") + answer.strip()[3:]
            return Injection(denied, "deny", str(meta.get("question_object", "")))
        if task == "counting":
            stripped = answer.strip().rstrip(".")
            words = {w: i for i, w in enumerate(NUMBER_WORDS)}
            value = int(stripped) if stripped.isdigit() else words.get(stripped.lower())
            if value is None:
                return "count answer is not a number"
            new = value + 1 if value == 0 else value + rng.choice((-1, 1))
            return Injection(_count_word(stripped, new), "count", f"{value} -> {new}")
        if task == "colour":
            shape = meta.get("question_shape")
            colour = answer.strip().rstrip(".").lower()
            if not shape:
                return "colour question without question_shape"
            name = f"{colour} {shape}"
            variants = [v for v in attribute_variants(name, self.vocab) if v not in ann.objects]
            if not variants:
                return "no absent attribute variant"
            new = self.stats.rank_absent(sorted(ann.objects), variants, rng, self.prefer)[0]
            word = _attribute(new)
            said = word.capitalize() if answer.strip()[:1].isupper() else word
            return Injection(said, "attribute", f"{name} -> {new}")
        return f"task {task!r} has no short-answer injection"


# ----------------------------------------------------------------------------- building pairs


def _margin(sample: Any, chosen: str, rejected: str, ann: Annotations, vocab: ObjectVocabulary) -> float:
    if task_of(sample) != DESCRIBE:
        return 1.0
    return claim_score(chosen, ann, vocab) - claim_score(rejected, ann, vocab)


def _injections(
    injector: Injector,
    sample: SupervisedSample,
    ann: Annotations,
    cfg: InjectConfig,
    rng: random.Random,
    stats: PairStats,
) -> list[Injection]:
    """Up to ``cfg.pairs_per_sample`` distinct injections for one sample (drop reasons counted)."""
    if task_of(sample) != DESCRIBE:
        made = injector.short_answer(sample, sample.completion, ann, rng)
        if isinstance(made, str):
            stats.drop(made)
            return []
        return [made]
    out: list[Injection] = []
    kinds = list(cfg.kinds)
    rng.shuffle(kinds)
    reasons: list[str] = []
    for attempt in range(len(kinds) * cfg.pairs_per_sample):
        if len(out) >= cfg.pairs_per_sample:
            break
        made = injector.describe(sample.completion, ann, kinds[attempt % len(kinds)], rng)
        if isinstance(made, str):
            reasons.append(made)
        elif made.text != sample.completion and all(made.text != o.text for o in out):
            out.append(made)
    if not out:
        stats.drop(reasons[0] if reasons else "no injection applies")
    return out


def inject_pairs(
    samples: Sequence[SupervisedSample], vocab: ObjectVocabulary, cfg: InjectConfig | None = None
) -> tuple[list[PreferenceSample], PairStats]:
    """Hallucination-injection pairs from faithful ``samples`` (completion = chosen).

    Raises :class:`~vlalign.data.schema.DataError` naming the first sample without object
    annotations. Rows of tasks not in ``cfg.tasks`` are skipped (counted).
    """
    cfg = cfg or InjectConfig()
    bad = [k for k in cfg.kinds if k not in INJECTION_KINDS]
    if bad or not cfg.kinds:
        raise ValueError(f"inject kinds {bad or '()'}: choose from {INJECTION_KINDS}")
    object_stats = ObjectStats.from_samples(samples)
    injector = Injector(
        vocab, object_stats, prefer_cooccurring=cfg.prefer_cooccurring, deny_present=cfg.balance_existence
    )
    stats = PairStats(method="hallucination injection")
    pairs: list[PreferenceSample] = []
    for sample in samples:
        stats.inputs += 1
        if task_of(sample) not in cfg.tasks:
            stats.drop("task not selected")
            continue
        ann = annotations_of(sample, required_by="hallucination injection")
        assert ann is not None
        rng = random.Random(f"vlalign-inject/{cfg.seed}/{sample.id}")
        for k, inj in enumerate(_injections(injector, sample, ann, cfg, rng, stats)):
            margin = _margin(sample, sample.completion, inj.text, ann, vocab)
            source = f"inject-{inj.kind}"
            meta = pair_meta(sample.meta, source=source, injected=inj.detail, margin=margin)
            pairs.append(
                PreferenceSample(
                    f"{sample.id}/{source}/{k}", list(sample.images), sample.prompt, sample.completion, inj.text, meta
                )
            )
            stats.add(source, margin)
    if cfg.probes_per_image > 0:
        pairs.extend(probe_pairs(samples, object_stats, vocab, cfg, stats))
    return pairs, stats


def probe_pairs(
    samples: Sequence[Any], object_stats: ObjectStats, vocab: ObjectVocabulary, cfg: InjectConfig, stats: PairStats
) -> list[PreferenceSample]:
    """Existence questions about co-occurring absent objects, one image at a time (chosen: no);
    with ``cfg.balance_existence`` as many about present objects (chosen: yes)."""
    out: list[PreferenceSample] = []
    done: set[str] = set()
    for sample in samples:
        key = image_key(sample)
        if key in done:
            continue
        done.add(key)
        ann = annotations_of(sample, required_by="hallucination probes")
        assert ann is not None
        rng = random.Random(f"vlalign-probe/{cfg.seed}/{key}")
        absent = [n for n in vocab.names if n not in ann.objects]
        ranked = object_stats.rank_absent(sorted(ann.objects), absent, rng, cfg.prefer_cooccurring)
        for k, name in enumerate(ranked[: cfg.probes_per_image]):
            question = cfg.probe_question.format(article=article(name), object=name)
            meta = pair_meta(
                sample.meta,
                source="inject-probe",
                task="existence",
                answer=cfg.no,
                question_object=name,
                injected=name,
                margin=1.0,
            )
            meta.pop("question_shape", None)
            prompt = user_prompt(question, len(sample.images))
            out.append(PreferenceSample(f"{key}/probe/{k}", list(sample.images), prompt, cfg.no, cfg.yes, meta))
            stats.add("inject-probe", 1.0)
        if not cfg.balance_existence:
            continue
        present = sorted(ann.objects)
        rng.shuffle(present)
        for k, name in enumerate(present[: min(cfg.probes_per_image, len(ranked))]):
            question = cfg.probe_question.format(article=article(name), object=name)
            meta = pair_meta(
                sample.meta,
                source="inject-probe-present",
                task="existence",
                answer=cfg.yes,
                question_object=name,
                injected=f"{name} denied",
                margin=1.0,
            )
            meta.pop("question_shape", None)
            prompt = user_prompt(question, len(sample.images))
            out.append(PreferenceSample(f"{key}/probe-present/{k}", list(sample.images), prompt, cfg.yes, cfg.no, meta))
            stats.add("inject-probe-present", 1.0)
    return out
