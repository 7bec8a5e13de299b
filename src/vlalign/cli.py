"""The `vlalign` command: one subcommand per recipe, plus eval, pairs, demo and report."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    print("vlalign: no subcommands yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
