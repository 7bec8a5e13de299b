"""The package as `pip install .` / `pip install -e .` builds it for an environment a user already has.

The wheel is built from this checkout without build isolation (no download) and read back: every
module of ``src/vlalign`` and every data file the code reads at run time must be inside, the
``vlalign`` command must be declared, and torch must be a range (users bring their own CUDA
build), never a pin.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = out.glob("vlalign-*.whl")
    return zipfile.ZipFile(path)


def test_every_module_and_data_file_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    src = ROOT / "src"
    modules = {p.relative_to(src).as_posix() for p in (src / "vlalign").rglob("*.py")}
    assert modules and not modules - names, sorted(modules - names)[:10]
    data = {p.relative_to(src).as_posix() for p in (src / "vlalign/eval/benchmarks/data").iterdir() if p.is_file()}
    assert "vlalign/eval/benchmarks/data/coco_synonyms.txt" in data
    assert not data - names, sorted(data - names)


def test_the_command_and_the_dependency_ranges_are_declared(wheel: zipfile.ZipFile) -> None:
    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "vlalign = vlalign.cli:main" in wheel.read(info).decode()
    meta = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    torch = [r for r in requires if re.match(r"torch\b", r)]
    assert torch and not any("==" in r for r in torch), torch
    version = re.search(r"^Version: (.+)$", meta, re.M).group(1)
    shown = subprocess.run([sys.executable, "-m", "vlalign.cli", "--version"], capture_output=True, text=True)
    assert version in shown.stdout, (version, shown.stdout, shown.stderr)
