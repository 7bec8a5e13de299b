"""Give every preference pair another scene's image as mDPO's "corrupted" image (an experiment).

mDPO's image-conditioned term compares the chosen response under the pair's image with the same
response under a corrupted image m'. This writes a copy of a pairs file where m' is the image of
another row (a different image file, drawn uniformly with ``random.Random(seed)``), in the
``rejected_images`` column that ``vlalign dpo`` reads in place of the on-the-fly corruption::

    python benchmarks/other_image_pairs.py runs/demo/pairs/train.jsonl runs/final/pairs/train_other_image.jsonl

Rows without images, or with more than one, are copied unchanged (the DPO recipe then corrupts
their image as configured). Relative image paths are written as absolute ones.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def _image_path(image: object, folder: Path) -> str | None:
    if not isinstance(image, str):
        return None
    path = Path(image)
    return str(path if path.is_absolute() else (folder / path).resolve())


def other_images(rows: list[dict], folder: Path, seed: int) -> tuple[list[dict], int]:
    """The rows with ``rejected_images`` set to another row's image; also how many were given one."""
    pool = sorted({p for r in rows if len(r.get("images") or []) == 1 and (p := _image_path(r["images"][0], folder))})
    if len(pool) < 2:
        raise SystemExit("other_image_pairs: fewer than two distinct images among rows with one image")
    rng = random.Random(seed)
    out, given = [], 0
    for row in rows:
        images = row.get("images") or []
        own = _image_path(images[0], folder) if len(images) == 1 else None
        if own is None:
            out.append(row)
            continue
        other = own
        while other == own:
            other = pool[rng.randrange(len(pool))]
        out.append({**row, "images": [own], "rejected_images": [other]})
        given += 1
    return out, given


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "pairs", type=Path, help="a preference JSONL file (vlalign pairs / the demo's pairs/train.jsonl)"
    )
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    args = parser.parse_args()
    if not args.pairs.is_file():
        raise SystemExit(f"other_image_pairs: {args.pairs} not found")
    rows = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    out, given = other_images(rows, args.pairs.parent, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"wrote {args.out}: {given} of {len(rows)} pairs with another scene's image as rejected_images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
