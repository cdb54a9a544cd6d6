"""``python -m constrained_optim demo [--steps N]``: a short constrained training run, audited."""

from __future__ import annotations

import sys

USAGE = "usage: python -m constrained_optim demo [--steps N] [--seed S]"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main as demo

        return demo(argv[1:])
    print(f"unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # not on import (pytest's doctest collection imports this module)
    sys.exit(main())
