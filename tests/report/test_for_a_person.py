"""The report read by a person (issue 20): a headline table and the rest folded away, "About this
run" as a table, no one-point curves, KL never a negative bar, a gallery of the descriptions that
changed, the quick demo's smoke-test banner. The folder is ``small_demo`` (tests/report/conftest.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

from vlalign.report.gallery import GalleryColumn, changed_rows
from vlalign.report.html import SMOKE_TEST_NOTE, write_report
from vlalign.report.plots import bar_heights
from vlalign.report.tables import about_table, headline_keys, is_count_or_timing


class Tables(HTMLParser):
    """Row keys (``th.metric``) per table class, whether inside a ``<details>``; gallery row ids."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[tuple[str, bool], list[str]] = {}
        self.gallery: list[tuple[str, bool]] = []
        self._table: list[str] = []
        self._details = 0
        self._th: str | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._table.append(a.get("class", ""))
        elif tag == "details":
            self._details += 1
        elif tag == "th" and a.get("class") == "metric":
            self._th = ""
        elif tag == "div" and a.get("class") == "id":
            self._id = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table.pop()
        elif tag == "details":
            self._details -= 1
        elif tag == "th" and self._th is not None:
            self.rows.setdefault((self._table[-1], self._details > 0), []).append(self._th)
            self._th = None
        elif tag == "div" and self._id is not None:
            self.gallery.append((self._id, self._details > 0))
            self._id = None

    def handle_data(self, data: str) -> None:
        if self._th is not None:
            self._th += data
        if self._id is not None:
            self._id += data


def _tables(path: Path) -> Tables:
    parser = Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_headline_table_and_the_rest_folded(small_demo: Callable[..., Path]) -> None:
    """Headline (in the bars' order): CHAIR_i, CHAIR_s, POPE F1, counting, the two KLs; folded:
    the yes-ratio, then the counts and timings, which get no difference (no "1236")."""
    out = write_report(small_demo())
    rows = _tables(out).rows
    assert rows["metrics headline", False] == [
        "chair/chair_i",
        "chair/chair_s",
        "pope/adversarial/f1",
        "task/counting",
        "kl/seq",
        "kl/token_k3",
    ]
    assert rows["metrics", True] == ["pope/adversarial/yes_ratio", "chair/n", "seconds/train"]
    page = out.read_text(encoding="utf-8")
    assert "1236" not in page  # seconds/train dpo - base = 1236.25: not a metric's difference
    assert "CHAIR_i (hallucinated object mentions)" in page and "lower is better" in page


def test_about_this_run_is_a_table(small_demo: Callable[..., Path]) -> None:
    """Nested wall times are indented sub-rows, numbers to 4 significant digits (0.5925293900000952
    -> 0.5925, 1359.3425 -> 1359), booleans as yes/no; the intervals stay in the metric tables."""
    page = write_report(small_demo()).read_text(encoding="utf-8")
    about = page[page.index('<section id="about"') : page.index("</section>", page.index('<section id="about"'))]
    assert '<tr class="group"><th class="about-key">stage_seconds</th><td></td></tr>' in about
    assert '<th class="about-key" style="padding-left:2.0em">world</th><td class="num">0.5925</td>' in about
    assert '<th class="about-key">total_seconds</th><td class="num">1359</td>' in about
    assert '<th class="about-key">quick</th><td class="num">no</td>' in about
    assert "tiny:gemma3:tiny" in about and "intervals" not in about and "{" not in about


def test_about_table_nesting() -> None:
    table = about_table({"a": {"b": {"c": 1 / 3}}, "d": [1, 2.5]})
    assert re.findall(r"padding-left:([0-9.]+)em", table) == ["2.0", "3.4"]  # 0.6 + 1.4 * depth
    assert '<td class="num">0.3333</td>' in table and '<td class="num">1, 2.5</td>' in table


def test_one_point_is_a_number_not_a_curve(small_demo: Callable[..., Path]) -> None:
    """DPO logged one step: no curve of it, its values in a folded table; SFT's three steps are drawn."""
    root = small_demo()
    out = write_report(root)
    pngs = {p.stem for p in (root / "report").glob("*.png")}
    assert "base-loss" in pngs and not any(p.startswith("dpo-") for p in pngs)
    page = out.read_text(encoding="utf-8")
    assert "2 metric(s) logged at one step only" in page
    assert '<th class="about-key">rewards/margin</th><td class="num">4</td><td class="num">0.25</td>' in page


def test_negative_kl_is_a_value_with_its_estimator(small_demo: Callable[..., Path]) -> None:
    """k1 = -0.02 is shown as the number, with what k1 is and why it can be negative; a bar of a
    quantity that cannot be negative is never drawn below 0."""
    page = write_report(small_demo()).read_text(encoding="utf-8")
    assert 'data-value="-0.02">-0.02</td>' in page
    assert "it can come out negative on a small sample" in page and "that sampling noise" in page
    assert "KL from the reference, per completion (k1)" in page and "KL from the reference, per token (k3)" in page
    assert bar_heights([0.5, -0.02, None], nonnegative=True) == [0.5, 0.0, 0.0]
    assert bar_heights([0.5, -0.02, None]) == [0.5, -0.02, 0.0]


def test_gallery_shows_what_changed(small_demo: Callable[..., Path]) -> None:
    """s0 (one fewer hallucinated object) and s1 (one more) changed and are shown; s2 did not
    (white space aside) and is folded away; the count above says so."""
    page = write_report(small_demo()).read_text(encoding="utf-8")
    assert "<b>2 of 3</b> held-out descriptions changed between base and dpo: 1 with fewer" in page
    assert "1 with more, 0 with as many" in page
    gallery = [row for row in _tables_from(page).gallery]
    assert gallery == [("s0-describe", False), ("s1-describe", False), ("s2-describe", True)]
    assert page.count("<mark>") == 2  # base s0's green triangle, dpo s1's red circle


def _tables_from(page: str) -> Tables:
    parser = Tables()
    parser.feed(page)
    return parser


def test_changed_rows_without_change() -> None:
    rows = [{"task": "describe", "id": "a", "output": "x"}]
    first, last = GalleryColumn("base", rows), GalleryColumn("final", [dict(rows[0], output=" x ")])
    assert changed_rows(first, last) == ([], rows)


def test_quick_demo_says_it_is_a_smoke_test(small_demo: Callable[..., Path]) -> None:
    quick = write_report(small_demo(quick=True)).read_text(encoding="utf-8")
    full = write_report(small_demo(quick=False)).read_text(encoding="utf-8")
    assert SMOKE_TEST_NOTE in quick and "vlalign quick demo report" in quick
    assert SMOKE_TEST_NOTE not in full and "quick demo" not in full


def test_headline_and_count_rules() -> None:
    keys = ["suite/chair/chair_s", "pope/random/yes_ratio", "compositional/task/counting", "task/colour_n", "kl/n"]
    assert headline_keys([*keys, "eval/task/colour", "win_rate"]) == [
        "suite/chair/chair_s",
        "eval/task/colour",
        "win_rate",
    ]
    assert [k for k in keys if is_count_or_timing(k)] == ["task/colour_n", "kl/n"]
    assert not is_count_or_timing("chair/chair_s") and is_count_or_timing("perf/step_s")
