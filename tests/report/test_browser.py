"""The report in a real headless browser: chromium renders the small demo folder's report
(tests/report/conftest.py) to a PNG screenshot, which must be a picture (not one colour, not
blank) of a page that has the headline table.

Needs a chromium binary (Debian: ``apt-get install chromium``); skipped without one. The
screenshot is kept under pytest's temporary folder (``report.png``) for a person to look at.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from vlalign.report.html import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@pytest.mark.skipif(_browser() is None, reason="no chromium binary on PATH (Debian/Ubuntu: apt-get install chromium)")
def test_report_renders_in_a_headless_browser(small_demo: Callable[..., Path], tmp_path: Path) -> None:
    """1200 x 3000 px screenshot: written, far from one colour (the standard deviation of its
    grey levels is above 20 of 255: a white page with black text and coloured plots), and the
    top of the page is not blank; the HTML it rendered has the headline table."""
    out = write_report(small_demo(quick=True))
    shot = tmp_path / "report.png"
    command = [
        _browser(),
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        "--window-size=1200,3000",
        out.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        grey = image.convert("L")
        assert ImageStat.Stat(grey).stddev[0] > 20
        top = grey.crop((0, 0, 1200, 400))
        assert top.getextrema()[0] < 100  # dark text in the first 400 px (the title, the banner)
    assert '<table class="metrics headline">' in out.read_text(encoding="utf-8")
