"""Named data sources: paths of the form ``<prefix>:<name>`` that a registered resolver turns into files.

data/ knows no source by name: the registry starts empty, and a package that ships datasets
registers its prefix when it is imported. The shapes world is the one vlalign ships::

    # in vlalign/shapes (run when the package is imported)
    from vlalign.data.sources import register_source
    from vlalign.shapes.embedded import resolve_data

    register_source("shapes:", resolve_data)   # "shapes:train.jsonl" -> <cache>/shapes-default/train.jsonl

after which any layer resolves a path without importing the package that serves it::

    from vlalign.data.sources import resolve

    resolve("shapes:train.jsonl")   # the file, written on first use
    resolve("data/mine.jsonl")      # any other path comes back as it is

A resolver receives the whole path, prefix included, and returns a local path (building the
files if it must); it raises ``FileNotFoundError`` for a name its source does not have.
"""

from __future__ import annotations

from collections.abc import Callable

Resolver = Callable[[str], str]
"""``resolver(path) -> local path``; ``path`` starts with the prefix it was registered under."""

_SOURCES: dict[str, Resolver] = {}


def register_source(prefix: str, resolver: Resolver) -> None:
    """Resolve every path that starts with ``prefix`` (``"shapes:"``: a name and a colon) with ``resolver``.

    Registering a prefix again replaces its resolver (so re-importing a package is harmless).
    """
    if not prefix.endswith(":") or len(prefix) < 2 or ":" in prefix[:-1]:
        raise ValueError(f"a source prefix is a name and a colon, like 'shapes:'; got {prefix!r}")
    _SOURCES[prefix] = resolver


def resolve(path: str) -> str:
    """The local path of ``path``: its source's resolver for a registered prefix, else ``path`` itself."""
    for prefix, resolver in _SOURCES.items():
        if path.startswith(prefix):
            return resolver(path)
    return path


def registered_sources() -> tuple[str, ...]:
    """The prefixes registered so far, in registration order."""
    return tuple(_SOURCES)
