"""The gallery of ``vlalign report``: held-out images with two models' descriptions side by side.

Each row is one held-out image (the ``describe`` records that ``vlalign eval`` and the end-of-run
suite write, see :func:`vlalign.eval.suite.evaluate`) with the description each column's model
gave, the hallucinated objects inside ``<mark>``, and the per-image CHAIR counts.

:func:`changes_html` is the view of what alignment changed: with a first (base) and a last
(aligned) column, the rows are the images whose description changed between the two, the first
:data:`GALLERY_SIZE` in the suite's own (seeded) order (not picked for effect), above them a
count of the changed ones (fewer, more, as many hallucinated objects) and, folded away, a few
of the unchanged ones. :func:`gallery_html` is the plain view: the first descriptions.

Hallucinated words are found with the object vocabulary when there is one (every synonym and
plural of an object name, as CHAIR counts them; a negated mention such as "no red circle" is not
marked), else by the object names themselves, case-insensitively. Every piece of text from the
data is HTML-escaped; images are re-encoded as PNG (shrunk to :data:`THUMBNAIL` px at most) and
embedded as ``data:`` URIs, so the page needs no other file.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlalign.data.annotations import ObjectVocabulary

GALLERY_SIZE = 12
THUMBNAIL = 256


@dataclass
class GalleryColumn:
    """One model's descriptions."""

    label: str
    """Column heading (a stage, ``baseline``, ``model``)."""
    records: list[dict[str, Any]]
    """Its evaluation records (any part; the held-out descriptions are picked out)."""
    vocabulary: ObjectVocabulary | None = None
    """Object phrases for finding the hallucinated words (None: the object names only)."""
    search: list[Path] = field(default_factory=list)
    """Folders that relative image paths are tried against, in order."""


def description_records(records: Iterable[Any]) -> list[dict[str, Any]]:
    """The held-out ``describe`` records (the compositional split's when there are none)."""
    rows = [r for r in records if isinstance(r, dict) and r.get("task") == "describe"]
    heldout = [r for r in rows if r.get("part", "heldout") == "heldout"]
    return heldout or rows


# ----------------------------------------------------------------------------- highlighting


def _name_pattern(name: str) -> re.Pattern[str]:
    words = r"\s+".join(re.escape(w) for w in name.split())
    return re.compile(rf"(?<![A-Za-z0-9]){words}(?:e?s)?(?![A-Za-z0-9])", re.IGNORECASE)


def hallucination_spans(
    text: str, hallucinated: Iterable[str], vocabulary: ObjectVocabulary | None
) -> list[tuple[int, int]]:
    """(start, end) of every affirmed mention of a hallucinated object in ``text``, sorted, disjoint.

    With a vocabulary, its mentions of the hallucinated names count (negated ones excepted); names
    it does not find (another vocabulary, none at all) are looked up as words, plural ``s`` allowed.
    """
    names = {str(n) for n in hallucinated if n}
    spans: list[tuple[int, int]] = []
    found: set[str] = set()
    if vocabulary is not None and len(text.lower()) == len(text):  # offsets of the lower-cased text hold
        for m in vocabulary.find(text):
            if m.name in names and not m.negated:
                spans.append((m.start, m.end))
                found.add(m.name)
    for name in sorted(names - found):
        spans += [(m.start(), m.end()) for m in _name_pattern(name).finditer(text)]
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def highlight(text: str, hallucinated: Iterable[str], vocabulary: ObjectVocabulary | None = None) -> str:
    """``text`` as HTML (escaped), each hallucinated mention inside ``<mark>``."""
    out: list[str] = []
    pos = 0
    for start, end in hallucination_spans(text, hallucinated, vocabulary):
        out += [html.escape(text[pos:start]), "<mark>", html.escape(text[start:end]), "</mark>"]
        pos = end
    out.append(html.escape(text[pos:]))
    return "".join(out)


# ----------------------------------------------------------------------------- images


def find_image(image: Any, search: Sequence[Path]) -> Path | None:
    """The image file a record names: as written, else under each search folder (for an absolute
    path of a moved folder, its last one or two components are tried there too)."""
    if not isinstance(image, str) or not image:
        return None
    path = Path(image)
    candidates = [path] if path.is_absolute() else [*(root / path for root in search), path]
    if path.is_absolute():
        for root in search:
            candidates += [root / path.parent.name / path.name, root / path.name]
    return next((p for p in candidates if p.is_file()), None)


def png_data_uri(path: Path, *, max_side: int = THUMBNAIL) -> str | None:
    """The image as a ``data:image/png;base64,...`` URI (shrunk to ``max_side``), None if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            im.thumbnail((max_side, max_side))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- the table


def _counts(record: dict[str, Any], vocabulary: ObjectVocabulary | None) -> str:
    hallucinated = record.get("hallucinated") or []
    objects = record.get("objects") or []
    recalled = record.get("recalled") or []
    parts = []
    if vocabulary is not None:
        mentions = len(vocabulary.mentioned(str(record.get("output") or "")))
        ratio = f" (CHAIR_i {len(hallucinated) / mentions:.2f})" if mentions else ""
        parts.append(f"hallucinated {len(hallucinated)} of {mentions} object mentions{ratio}")
    else:
        parts.append(f"hallucinated {len(hallucinated)} object mention(s)")
    if objects:
        parts.append(f"recalled {len(recalled)} of {len(objects)} objects")
    if hallucinated:
        parts.append("not in the image: " + ", ".join(sorted({str(h) for h in hallucinated})))
    return html.escape(" · ".join(parts))


def _cell(record: dict[str, Any] | None, column: GalleryColumn) -> str:
    if record is None:
        return '<td class="desc"><em>no description of this image</em></td>'
    text = str(record.get("output") or "")
    marked = highlight(text, record.get("hallucinated") or [], column.vocabulary)
    return f'<td class="desc"><p>{marked}</p><p class="counts">{_counts(record, column.vocabulary)}</p></td>'


def _lookup(column: GalleryColumn) -> dict[tuple[Any, Any], dict[str, Any]]:
    return {(r.get("part"), r.get("id")): r for r in description_records(column.records)}


def gallery_html(
    columns: Sequence[GalleryColumn], *, size: int = GALLERY_SIZE, rows: list[dict[str, Any]] | None = None
) -> str:
    """A table: one row per image (``rows``, default the first column's first ``size``
    descriptions), one cell per column; '' when there are no rows."""
    if not columns:
        return ""
    rows = description_records(columns[0].records)[:size] if rows is None else rows
    if not rows:
        return ""
    lookup = [_lookup(c) for c in columns]
    head = "".join(f"<th>{html.escape(c.label)}</th>" for c in columns)
    body = []
    for row in rows:
        key = (row.get("part"), row.get("id"))
        records = [table.get(key) for table in lookup]
        uri = None
        for record, column in zip(records, columns):
            path = find_image(record.get("image"), column.search) if record else None
            uri = png_data_uri(path) if path else None
            if uri:
                break
        picture = (
            f'<img src="{uri}" alt="{html.escape(str(row.get("id")))}">'
            if uri
            else '<span class="missing">image not found</span>'
        )
        objects = ", ".join(str(o) for o in row.get("objects") or []) or "?"
        info = (
            f'<div class="id">{html.escape(str(row.get("id")))}</div>'
            f'<div class="objects">in the image: {html.escape(objects)}</div>'
        )
        cells = "".join(_cell(r, c) for r, c in zip(records, columns))
        body.append(f'<tr><td class="pic">{picture}{info}</td>{cells}</tr>')
    return f'<table class="gallery"><thead><tr><th>image</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


# ----------------------------------------------------------------------------- what changed


def _text(record: dict[str, Any] | None) -> str:
    return " ".join(str((record or {}).get("output") or "").split())


def changed_rows(first: GalleryColumn, last: GalleryColumn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first column's descriptions whose text the last column changed (white space aside),
    and those it left as they were, each in the suite's order; images the last column did not
    describe are in neither."""
    after = _lookup(last)
    changed, same = [], []
    for row in description_records(first.records):
        other = after.get((row.get("part"), row.get("id")))
        if other is not None:
            (changed if _text(other) != _text(row) else same).append(row)
    return changed, same


def _hallucinated(record: dict[str, Any] | None) -> int:
    return len((record or {}).get("hallucinated") or [])


def changes_html(columns: Sequence[GalleryColumn], *, size: int = GALLERY_SIZE, unchanged: int = 4) -> str:
    """The descriptions that changed between the first and the last column (see the module doc);
    with fewer than two columns, the plain gallery."""
    if len(columns) < 2:
        return gallery_html(columns, size=size)
    first, last = columns[0], columns[-1]
    changed, same = changed_rows(first, last)
    if not changed and not same:
        return gallery_html(columns, size=size)
    after = _lookup(last)
    deltas = [_hallucinated(after[(r.get("part"), r.get("id"))]) - _hallucinated(r) for r in changed]
    fewer, more = sum(d < 0 for d in deltas), sum(d > 0 for d in deltas)
    total = len(changed) + len(same)
    names = f"{html.escape(first.label)} and {html.escape(last.label)}"
    if changed:
        shown = min(size, len(changed))
        text = (
            f"<b>{len(changed)} of {total}</b> held-out descriptions changed between {names}: "
            f"{fewer} with fewer hallucinated objects, {more} with more, {len(changed) - fewer - more} with as "
            f"many. {'The first ' + str(shown) if shown < len(changed) else 'All of them'}, in the suite's order "
            "(not picked), hallucinated objects "
            '<span class="marked">marked</span>:'
        )
    else:
        text = f"<b>None</b> of the {total} held-out descriptions changed between {names}: every one reads the same."
    parts = [f'<p class="changes">{text}</p>', gallery_html(columns, rows=changed[:size]) if changed else ""]
    if same and unchanged:
        parts.append(
            f"<details><summary>{len(same)} unchanged description(s)"
            f"{f': the first {unchanged}' if unchanged < len(same) else ''}</summary>{gallery_html(columns, rows=same[:unchanged])}</details>"
        )
    return "".join(parts)


# ----------------------------------------------------------------------------- a benchmark's wrong answers


def _yes_no(value: Any) -> bool | None:
    text = str(value).strip().lower().rstrip(".") if value is not None else ""
    return {"yes": True, "no": False}.get(text)


def _hallucinated_words(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(word as written, object) of each hallucinated mention: CHAIR's ``[word, object]`` pairs or plain names."""
    out = []
    for item in record.get("hallucinated") or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            out.append((str(item[0]), str(item[1])))
        elif isinstance(item, str):
            out.append((item, item))
    return out


def wrong_answer(record: dict[str, Any]) -> str | None:
    """What is wrong with one answer of a published benchmark (plain text), None when it is right.

    POPE (``pope/<mode>``): the answer as the run's rule read it (``said_yes``) is not the label;
    CHAIR (``chair``): the description mentions an object not in the image; AMBER's descriptions
    (``amber/generative``): hallucinated nouns; AMBER's yes/no questions: the response scored is not
    the truth (as AMBER counts it: ``Yes`` or ``No`` exactly). Other records: None.
    """
    part = str(record.get("part") or "")
    if part.startswith("pope/"):
        truth, said = _yes_no(record.get("label", record.get("answer"))), record.get("said_yes")
        if truth is None or not isinstance(said, bool) or said == truth:
            return None
        return f"read as {'yes' if said else 'no'}; the label is {'yes' if truth else 'no'}"
    if part == "chair":
        words = _hallucinated_words(record)
        return "not in the image: " + ", ".join(sorted({obj for _, obj in words})) if words else None
    if part == "amber/generative":
        count = record.get("hallucinated_nouns")
        if not isinstance(count, (int, float)) or count <= 0:
            return None
        names = sorted({obj for _, obj in _hallucinated_words(record)})
        return f"{count:.0f} of {record.get('nouns', '?')} nouns hallucinated" + (
            ": " + ", ".join(names) if names else ""
        )
    if part.startswith("amber/"):
        truth, response = _yes_no(record.get("label")), record.get("response")
        if truth is None or response == ("Yes" if truth else "No"):
            return None
        return f"response {response!r}; the truth is {'yes' if truth else 'no'}"
    return None


def _judged(record: dict[str, Any]) -> bool:
    part = str(record.get("part") or "")
    return part == "chair" or part.startswith(("pope/", "amber/"))


def _answer_cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return '<td class="desc"><em>not answered</em></td>'
    text = str(record.get("output") or "")
    words = [w for w, _ in _hallucinated_words(record)]
    why = wrong_answer(record)
    verdict = f'<p class="why">{html.escape(why)}</p>' if why else '<p class="why">right</p>'
    return f'<td class="desc"><p>{highlight(text, words)}</p>{verdict}</td>'


def wrong_answers_html(
    records: Sequence[dict[str, Any]],
    search: Sequence[Path],
    *,
    baseline: Sequence[dict[str, Any]] | None = None,
    size: int = GALLERY_SIZE,
) -> str:
    """A published benchmark's wrong answers (:func:`wrong_answer`): how many of the answers are
    wrong, then the first ``size`` in the benchmark's order (not picked) with the image (when its
    path resolves under ``search``), the question, the answer (hallucinated words marked), what is
    wrong with it and, given the ``baseline``'s records, its answer to the same question. ''
    when no record is a benchmark's."""
    judged = [r for r in records if isinstance(r, dict) and _judged(r)]
    if not judged:
        return ""
    wrong = [r for r in judged if wrong_answer(r) is not None]
    if not wrong:
        return f'<p class="changes"><b>None</b> of the {len(judged)} answers is wrong.</p>'
    shown = wrong[:size]
    lead = f"the first {len(shown)}" if len(shown) < len(wrong) else "all of them"
    text = (
        f'<p class="changes"><b>{len(wrong)} of {len(judged)}</b> answers wrong; {lead}, in the benchmark\'s '
        'order (not picked), hallucinated words <span class="marked">marked</span>:</p>'
    )
    other = {(r.get("part"), r.get("id")): r for r in baseline or [] if isinstance(r, dict)}
    head = "<th>image</th><th>question</th><th>model</th>" + ("<th>baseline</th>" if baseline else "")
    body = []
    for row in shown:
        path = find_image(row.get("image"), search)
        uri = png_data_uri(path) if path else None
        picture = (
            f'<img src="{uri}" alt="{html.escape(str(row.get("image")))}">'
            if uri
            else f'<span class="missing">image not found: {html.escape(str(row.get("image")))}</span>'
        )
        question = (
            f'<div class="id">{html.escape(str(row.get("part")))} · {html.escape(str(row.get("id")))}</div>'
            f"<p>{html.escape(str(row.get('question') or ''))}</p>"
        )
        cells = _answer_cell(row) + (_answer_cell(other.get((row.get("part"), row.get("id")))) if baseline else "")
        body.append(f'<tr class="wrong"><td class="pic">{picture}</td><td>{question}</td>{cells}</tr>')
    return (
        f'{text}<table class="gallery wrong-answers"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
