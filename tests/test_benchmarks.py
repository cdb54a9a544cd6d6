"""`benchmarks/run.py` runs as a user runs it and prints its table: one ratio per row, the machine,
the fair baseline. No timing is asserted (the numbers depend on the machine and its load)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROWS = {  # row number -> the names it prints
    "1": ["Mask 50%, audit off"],
    "3": ["Symmetric()"],
    "9": ["48 small masked, audit off", "48 small masked, default audit"],
}


def test_quick_run_prints_a_ratio_per_row(tmp_path):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--threads",
            "1",
            "--rows",
            ",".join(ROWS),
            "--json",
            str(out_json),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout
    assert "library / fair baseline" in out
    assert f"torch {__import__('torch').__version__}" in out
    assert "SAME projected" in out  # the caption explains the baseline
    for row, names in ROWS.items():
        for name in names:
            line = re.search(rf"^.*\b{row} .*{re.escape(name)}.*$", out, re.MULTILINE)
            assert line, f"row {row} {name!r} not in the table:\n{out}"
            assert re.search(r"\d+\.\d\dx", line.group(0)), (
                f"no ratio on the line of {name!r}:\n{line.group(0)}"
            )
            assert re.search(r"PASS|MISS|info", line.group(0))
    for other in ("Fixed centre", "ResNet-18", "GPT-2", "peak memory: "):
        assert other not in out  # --rows selects

    results = json.loads(out_json.read_text())
    assert {r["row"] for r in results["rows"]} == set(ROWS)
    assert all(isinstance(r["ratio"], float) and r["ratio"] > 0 for r in results["rows"])
    assert results["machine"]["cores"] and results["machine"]["cpu"]
