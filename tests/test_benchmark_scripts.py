"""Helper scripts of benchmarks/ that feed measured runs: benchmarks/other_image_pairs.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_other_image_pairs_gives_each_pair_another_scenes_image(tmp_path: Path) -> None:
    rows = [{"id": f"p{i}", "images": [f"img/s{i % 3}.png"], "chosen": "a", "rejected": "b"} for i in range(30)]
    rows.append({"id": "two", "images": ["img/s0.png", "img/s1.png"], "chosen": "a", "rejected": "b"})
    src = tmp_path / "pairs" / "train.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out: str, seed: int) -> list[dict]:
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / "other_image_pairs.py"), str(src), str(tmp_path / out), f"--seed={seed}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "30 of 31 pairs" in done.stdout
        return [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]

    first = run("a.jsonl", 0)
    folder = src.parent.resolve()
    for row, new in zip(rows[:30], first):
        assert new["images"] == [str(folder / row["images"][0])]  # relative paths made absolute
        assert new["rejected_images"][0] != new["images"][0]
        assert new["rejected_images"][0] in {str(folder / f"img/s{k}.png") for k in range(3)}
    assert first[30] == rows[30]  # two images: copied unchanged
    assert len({r["rejected_images"][0] for r in first[:30]}) == 3
    assert run("b.jsonl", 0) == first  # deterministic in the seed
    assert run("c.jsonl", 1) != first
