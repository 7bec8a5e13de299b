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


def test_the_wheel_installs_into_an_environment_that_has_the_dependencies(
    wheel: zipfile.ZipFile, tmp_path: Path
) -> None:
    """`pip install` of the wheel into a folder of its own (the dependencies come from the running
    environment, as a user's own CUDA torch would): the installed package, not this checkout,
    answers `python -m vlalign.cli`, finds its data files and lists the commands."""
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target)]
    done = subprocess.run([*cmd, wheel.filename], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = (
        "import vlalign, vlalign.eval.benchmarks.chair_coco as c, pathlib; "
        "print(pathlib.Path(vlalign.__file__).parent); "
        "print((pathlib.Path(c.__file__).parent / 'data' / 'coco_synonyms.txt').is_file())"
    )
    env = {"PYTHONPATH": str(target), "PATH": "", "HF_HUB_OFFLINE": "1"}
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert shown.stdout.split() == [str(target / "vlalign"), "True"], shown.stderr[-2000:]
    listed = subprocess.run(
        [sys.executable, "-m", "vlalign.cli", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert listed.returncode == 0 and "dpo" in listed.stdout and "report" in listed.stdout
