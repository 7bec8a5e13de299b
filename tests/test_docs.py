"""The README and the docs site stay true to the code: the commands, the Python API example, the
demo table, the links. (The site itself is built with ``mkdocs build --strict`` by ``make docs``.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _table_rows(text: str, header_start: str) -> list[str]:
    """The rows of the Markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line.strip())
    return rows


def test_readme_is_short_and_names_the_two_commands():
    text = _readme()
    assert "make demo" in text and "make test" in text
    assert len(text.splitlines()) <= 160, "the README is for users: move details to docs/"


def test_readme_lists_every_command_of_the_cli():
    from vlalign.cli import COMMANDS

    listed = set(re.findall(r"^\| `vlalign ([a-z-]+)` \|", _readme(), flags=re.MULTILINE))
    available = {name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module) is not None}
    assert listed == available


def test_readme_python_example_uses_real_config_fields():
    """Every ``cfg.a.b = ...`` of the README's example names an existing field (an assignment to a
    missing field of a dataclass would silently add an attribute)."""
    block = re.search(r"```python\n(.*?)```", _readme(), flags=re.DOTALL)
    assert block is not None
    code = block.group(1)
    module = re.search(r"from vlalign\.recipes import (\w+)", code).group(1)
    recipe = pytest.importorskip(f"vlalign.recipes.{module}")
    cfg = recipe.Config()
    paths = re.findall(r"^cfg\.([\w.]+)\s*=", code, flags=re.MULTILINE)
    assert paths
    for path in paths:
        node = cfg
        for name in path.split("."):
            assert hasattr(node, name), f"README example: {module}.Config has no field {path}"
            node = getattr(node, name)
    assert f"{module}.run(cfg)" in code and callable(recipe.run)


def test_demo_table_is_the_same_in_readme_and_results():
    header = "| metric | base (SFT) |"
    assert _table_rows(_readme(), header) == _table_rows((DOCS / "results.md").read_text(encoding="utf-8"), header)


def test_readme_links_point_to_files():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", _readme()):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"


def test_license_is_the_apache_license_that_pyproject_declares():
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
