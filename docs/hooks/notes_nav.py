"""MkDocs hook: every page under ``docs/notes/`` appears in the "Notes" section of the navigation.

Notes are added (and renamed) by whoever measures or designs something; a list kept by hand in
``mkdocs.yml`` would fall behind (a page left out of the nav only earns an INFO line, and a
listed page that was renamed fails the strict build). So ``mkdocs.yml`` does not list them: this
hook fills the "Notes" section with every ``notes/*.md`` present, in file-name order, each titled
by its first ``# `` heading. The section goes before "API reference" (or last); pages that
``mkdocs.yml`` already lists under "Notes" keep their place and title.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SECTION = "Notes"
BEFORE = "API reference"


def _title(page: Path) -> str:
    """The page's first ``# `` heading up to a colon ("Tiny models: measurements" -> "Tiny models")."""
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].split(":")[0].replace("`", "").strip()
    return page.stem.replace("-", " ").capitalize()


def _listed(entries: list[Any]) -> set[str]:
    paths: set[str] = set()
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, str):
            paths.add(value)
    return paths


def on_config(config: Any, **kwargs: Any) -> Any:
    """Append the unlisted ``notes/*.md`` pages to the nav's Notes section (created if missing)."""
    nav = config.get("nav")
    notes_dir = Path(config["docs_dir"]) / "notes"
    if nav is None or not notes_dir.is_dir():
        return config
    section = next((e for e in nav if isinstance(e, dict) and SECTION in e), None)
    if section is None:
        section = {SECTION: []}
        before = next((i for i, e in enumerate(nav) if isinstance(e, dict) and BEFORE in e), len(nav))
        nav.insert(before, section)
    entries = section[SECTION]
    listed = _listed(entries)
    for page in sorted(notes_dir.glob("*.md")):
        rel = f"notes/{page.name}"
        if rel not in listed:
            entries.append({_title(page): rel})
    return config
