"""Every example and the demo, run as a user runs them (a subprocess, small ``--steps``), with the
claims they print checked, so none of them can rot."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import constrained_optim as co
from constrained_optim.__main__ import main as cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the optional [plot] extra


def commands(plot: Path) -> dict[str, list[str]]:
    """What each test runs, with a small ``--steps``."""
    return {
        "tied_kernel": [str(EXAMPLES / "tied_kernel.py"), "--steps", "10"],
        "transpose_flip_symmetry": [
            str(EXAMPLES / "transpose_flip_symmetry.py"),
            "--steps",
            "10",
            "--nf",
            "4",
            "--ks",
            "3",
        ],
        "filter_transform": [str(EXAMPLES / "filter_transform.py"), "--steps", "10"],
        "frozen_centre": [str(EXAMPLES / "frozen_centre.py"), "--steps", "5", "--resume-steps", "2"],
        "pruning_nm": [str(EXAMPLES / "pruning_nm.py"), "--steps", "30"]
        + (["--plot", str(plot)] if HAS_MATPLOTLIB else []),
        "demo": ["-m", "constrained_optim", "demo", "--steps", "8"],
    }


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root, as a user runs it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"  # rich tables unwrapped, so the lines below can be matched
    env["OMP_NUM_THREADS"] = "1"  # the runs go two at a time; tiny models gain nothing from threads
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every command's result, run two at a time (most of each run is starting Python and torch)."""
    plot = tmp_path_factory.mktemp("plot") / "audit.png"
    todo = commands(plot)
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(todo, pool.map(run, todo.values())))
    return done, plot


def stdout(outputs, name: str) -> str:
    """The stdout of command ``name``, failing on a non-zero exit."""
    proc = outputs[0][name]
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


def test_every_example_is_run():
    run_here = {Path(args[0]).stem for args in commands(Path("audit.png")).values() if args[0] != "-m"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == run_here


def test_tied_kernel(outputs):
    out = stdout(outputs, "tied_kernel")
    assert "question's code reproduces the numbers it printed: True" in out
    assert "[[a+b, a-b], [a-b, a+b]] bitwise: True" in out
    assert number(r"Tied and Subspace give the same kernels: max \|difference\| (\S+)", out) < 1e-6
    assert number(r"Tied at lr x group size \(2\): max \|difference\| (\S+)", out) < 1e-6
    assert number(r"Tied at the same lr: max \|difference\| (\S+)", out) > 0.1  # the factor matters
    assert number(r"Subspace at lr x 4 \(\|B_k\|\^2\): max \|difference\| (\S+)", out) < 1e-6
    assert "learning-rate relation holds (projected lr = group size x reparametrized lr): True" in out
    assert "conv.weight" in out  # the audit table


def test_transpose_flip_symmetry(outputs):
    out = stdout(outputs, "transpose_flip_symmetry")
    assert "W == T(W) exactly (torch.equal) after training: True" in out
    assert "W[i, j, a, b] == W[j, i, ks-1-a, ks-1-b] for every index: True" in out
    # (nf^2 ks^2 + nf) / 2 = (144 + 4) / 2 for nf = 4, ks = 3
    assert "74 orbits, closed form (nf^2 ks^2 + nf [ks odd]) / 2 = 74, rank of the projection = 74" in out
    assert "free-parameter counts agree: True" in out
    assert number(r"symmetrise-in-forward model: max \|difference\| (\S+)", out) < 1e-5
    first, last = (float(v) for v in re.search(r"loss (\S+) -> (\S+) after", out).groups())
    assert last < first
    assert "check(): every constrained parameter is on its set" in out


@pytest.mark.parametrize("nf, ks", [(1, 1), (3, 2), (2, 3), (4, 4), (3, 5)])
def test_free_parameter_count_of_the_transpose_flip_set(nf, ks):
    """Orbit count by enumeration, the closed form and the rank of the library's projection."""
    path = EXAMPLES / "transpose_flip_symmetry.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    closed_form = (nf * nf * ks * ks + nf * (ks % 2)) // 2
    assert example.orbit_count(nf, ks) == closed_form == example.projector_rank(nf, ks)


def test_filter_transform(outputs):
    out = stdout(outputs, "filter_transform")
    assert "question's .data assignment: the transformation's gradient is None: True" in out
    # the per-step table (4 columns; the audit table has 7)
    rows = re.findall(r"^│\s+(\d+) │\s+(\S+) │\s+(\S+) │\s+(\S+) │$", out, re.M)
    assert len(rows) >= 5, out
    assert all(float(grad) > 0 for _, _, grad, _ in rows)  # the gradient reaches the map
    assert all(float(res) < 1e-5 for _, _, _, res in rows)  # orthogonal after every shown step
    assert float(rows[-1][1]) < float(rows[0][1])  # and it learns
    assert number(r"orthogonality residual \|\|M M\^T - I\|\| = (\S+)", out) < 1e-5
    assert "filter norms preserved: True" in out
    assert "check(): every constrained parameter is on its set" in out


def test_frozen_centre(outputs):
    out = stdout(outputs, "frozen_centre")
    for name in ("SGD-momentum", "Adam", "AdamW"):
        line = re.search(rf"^{name} +centre max \|w\|: (.*)$", out, re.M)
        assert line, out
        hook = number(r"gradient hook (\S+)", line.group(1))
        assert hook > 1e-3, line.group(1)  # the forum's answer drifts under momentum/Adam
        assert "constrained_optim 0.0 (largest after any step: 0.0)" in line.group(1)
    assert "model state_dict keys unchanged: True" in out
    assert "resumed centre max |w| 0.0;" in out
    assert "resumed run equals uninterrupted run: True" in out
    assert "cnn4_dialation.weight" in out  # the audit table
    assert "check(): every constrained parameter is on its set" in out


def test_pruning_nm(outputs):
    out, plot = stdout(outputs, "pruning_nm"), outputs[1]
    assert "every group of 4 holds at most 2 non-zeros: True; zero fraction 0.500" in out
    assert "pattern is the one chosen at attach (fixed=True): True" in out
    assert "fc1.weight" in out and "fc3.weight" in out  # the audit table
    assert "check(): every constrained parameter is on its set" in out
    if HAS_MATPLOTLIB:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo(outputs):
    out = stdout(outputs, "demo")
    listed = re.findall(r"^  (\S+)\.weight \(", out, re.M)
    assert len(listed) >= 3 + hasattr(co, "Orthogonal") + hasattr(co, "MaxNorm"), out
    assert f"check(): all {len(listed)} constrained parameters are on their sets" in out
    assert "FAIL" not in out and len(re.findall(r"^ok ", out, re.M)) == len(listed)
    assert "ok   dilated centre max |w|: 0.0" in out
    assert "mix.weight" in out and "dilated.weight" in out  # the audit table


@pytest.mark.parametrize("argv, code", [([], 2), (["--help"], 0), (["nope"], 2)])
def test_cli_without_a_known_command(argv, code, capsys):
    assert cli(argv) == code
    captured = capsys.readouterr()
    assert "python -m constrained_optim demo" in captured.out + captured.err


def readme_block(after: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"```{lang}\n", text.index(after)) + len(lang) + 4
    return text[start : text.index("```", start)]


def test_readme_quick_start_is_the_two_commands():
    assert readme_block("## Quick start", "bash").splitlines() == [
        'python3 -m venv .venv && .venv/bin/pip install "torch==2.13.0" -e ".[test]" '
        "&& .venv/bin/python -m constrained_optim demo",
        ".venv/bin/python -m pytest -q",
    ]


def test_readme_usage_example_runs(capsys):
    namespace: dict = {}
    exec(compile(readme_block("## Usage", "python"), "README.md (usage example)", "exec"), namespace)
    model = namespace["model"]
    assert float(model[2].weight.detach()[..., 1, 1].abs().max()) == 0.0
    assert float(model[4].weight.detach().norm(dim=1).max()) <= 3.0 * (1 + 1e-6)
