"""Re-capture what the four question examples and the demo print, for the pages that show it.

    .venv/bin/python docs/capture_outputs.py

Runs each example as a user would (default arguments, 80 columns, no terminal), drops the
progress-bar lines (their timings change from run to run) and writes
docs/questions/output/<example>.txt; the demo (``python -m constrained_optim demo``) goes to
docs/guides/output/demo.txt. The pages include these files. The documentation build itself
never runs the examples; run this after a change to an example or to what the library prints,
and review the diff.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: a rich progress bar: "label ━━━━ 100% 0:00:05"
PROGRESS = re.compile(r"━+\s+\d+%\s+\d+:\d\d:\d\d\s*$")
EXAMPLES = ["tied_kernel", "transpose_flip_symmetry", "filter_transform", "frozen_centre"]


def capture(args: list[str]) -> str:
    env = dict(os.environ, COLUMNS="80", NO_COLOR="1", TERM="dumb")
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    lines = [line.rstrip() for line in result.stdout.splitlines() if not PROGRESS.search(line)]
    return "\n".join(lines).strip("\n") + "\n"


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{os.path.relpath(path, ROOT)}: {len(text.splitlines())} lines")


def main() -> None:
    for name in EXAMPLES:
        write(
            os.path.join(HERE, "questions", "output", f"{name}.txt"),
            capture([os.path.join("examples", f"{name}.py")]),
        )
    write(os.path.join(HERE, "guides", "output", "demo.txt"), capture(["-m", "constrained_optim", "demo"]))


if __name__ == "__main__":
    main()
