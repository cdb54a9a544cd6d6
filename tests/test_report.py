"""Reporting: the training-log block, rich tables, jsonl, the plot and the reader for saved audits."""

from __future__ import annotations

import io
import json
import logging
import math
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from torch import nn

import constrained_optim as co
from constrained_optim import report
from constrained_optim.audit import Audit, AuditRecord, read_jsonl
from constrained_optim.audit.__main__ import main as cli_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = pathlib.Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.dilated = nn.Conv2d(2, 3, 3, bias=False)
        self.mixer = nn.Linear(4, 4)


def trained(steps=4, **kwargs):
    torch.manual_seed(0)
    net = Net()
    opt = co.ConstrainedOptimizer(torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.2),
                                  net, **kwargs)
    opt.attach("dilated", co.Fixed((..., 1, 1), 0.5))
    opt.attach("mixer.weight", co.Mask(torch.rand(4, 4) > 0.4))
    opt.attach("mixer.bias", co.Tied(torch.tensor([0, 0, 1, 1])))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        h = net.dilated(torch.randn(2, 2, 4, 4, generator=gen)).flatten(1)[:, :4]
        net.mixer(h).pow(2).sum().backward()
        opt.step()
    return net, opt


NAMES = ("dilated.weight", "mixer.weight", "mixer.bias")


LINE = re.compile(r"^step (\d+) (\S+) (.+) drift=(\S+) drift_max=(\S+) residual=(\S+) grad_blocked=(\S+)$")


def parse_line(line: str) -> dict:
    """A plain log line back into its fields."""
    m = LINE.match(line)
    assert m, line
    keys = ("step", "param", "constraint", "drift", "drift_max", "residual", "grad_blocked")
    return dict(zip(keys, m.groups()))


# -- the training log ---------------------------------------------------------------------------
def test_log_every_writes_one_line_per_parameter_every_n_steps(caplog):
    caplog.set_level(logging.INFO, logger="constrained_optim")
    _, opt = trained(steps=5, log_every=2)
    logged = [r for r in caplog.records if r.name == "constrained_optim"]
    assert [r.levelno for r in logged] == [logging.INFO] * 6
    fields = [parse_line(r.getMessage()) for r in logged]
    assert [(int(f["step"]), f["param"]) for f in fields] == [(s, n) for s in (2, 4) for n in NAMES]
    for f, record in zip(fields, logged):  # the numbers are the records' own
        (r,) = record.audit
        assert (int(f["step"]), f["param"], f["constraint"]) == (r.step, r.name, r.constraint)
        for key in ("drift", "drift_max", "residual", "grad_blocked"):
            assert float(f[key]) == pytest.approx(getattr(r, key), rel=5e-3), key
    assert float(fields[-3]["drift"]) > 0 and float(fields[-2]["drift"]) == 0.0  # Fixed, Mask


def test_log_reports_the_latest_audited_step(caplog):
    caplog.set_level(logging.INFO, logger="constrained_optim")
    _, opt = trained(steps=4, audit_every=3, log_every=4)
    logged = [parse_line(r.getMessage()) for r in caplog.records if r.name == "constrained_optim"]
    assert [f["step"] for f in logged] == ["3"] * 3
    tty = TtyStream()
    logger = terminal_logger(tty)
    report.log_step(logger, 4, opt.audit.last)
    assert "constraint audit, step 4 (measured at step 3)" in tty.getvalue()


def test_the_library_configures_no_logging():
    logger = logging.getLogger("constrained_optim")
    root_handlers = list(logging.getLogger().handlers)
    trained(steps=2, log_every=1)
    assert logger.handlers == [] and logger.propagate and logger.level == logging.NOTSET
    assert logging.getLogger().handlers == root_handlers


def test_no_info_rendering_when_info_is_off(monkeypatch):
    logger = logging.getLogger("constrained_optim")
    monkeypatch.setattr(logger, "level", logging.WARNING)
    monkeypatch.setattr(report, "log_step", lambda *a: pytest.fail("rendered a disabled log"))
    trained(steps=2, log_every=1)


class TtyStream(io.StringIO):
    def isatty(self):
        return True


def terminal_logger(*streams_or_handlers):
    logger = logging.getLogger(f"test_report.{id(streams_or_handlers)}")
    logger.propagate, logger.level, logger.handlers = False, logging.INFO, []
    for h in streams_or_handlers:
        logger.addHandler(h if isinstance(h, logging.Handler) else logging.StreamHandler(h))
    return logger


def test_log_is_a_table_on_a_terminal_and_lines_in_a_file(tmp_path):
    _, opt = trained(steps=2)
    tty, path = TtyStream(), tmp_path / "train.log"
    for handlers in ([tty], [logging.FileHandler(path)], [TtyStream(), logging.FileHandler(path)]):
        logger = terminal_logger(*handlers)
        report.log_step(logger, 2, opt.audit.last)
        for h in logger.handlers:
            h.close()
    table = tty.getvalue()
    assert table.startswith("constraint audit, step 2: max drift")
    assert "─" in table and "drift" in table and "\x1b[" not in table
    for name in NAMES:
        assert name in table
    lines = path.read_text().splitlines()  # plain for the file alone and for file + terminal
    assert [parse_line(line)["param"] for line in lines] == list(NAMES) * 2


# -- tables -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [80, 140])
def test_print_and_summary_show_every_parameter_and_its_numbers(width):
    _, opt = trained(steps=4)
    console = Console(record=True, width=width)
    opt.audit.print(console)
    console.print(opt.audit.summary())
    console.print(opt.audit.table(opt.audit.history[-3:]))
    text = console.export_text()
    assert all(len(line) <= width for line in text.splitlines())
    for name in NAMES:
        assert text.count(name) == 3
    fixed = opt.audit.summaries["dilated.weight"]
    assert f"{fixed.drift_max:.3g}" in text and f"{fixed.drift_mean:.3g}" in text
    assert f"{opt.audit.last[0].grad_blocked:.3g}" in text
    assert "latest step 4" in text and "whole run" in text


def test_nonfinite_parameter_shows_in_the_summary():
    audit = Audit()
    audit.add(1, ["w"], ["Mask(1/2 free)"], [(math.nan, math.nan, 0.0, math.nan)])
    audit.note_nonfinite(1, ["w"], ["Mask(1/2 free)"])
    console = Console(record=True, width=100)
    console.print(audit.summary())
    row = [line for line in console.export_text().splitlines() if line.startswith("w ")]
    assert row and row[0].split()[-1] == "1"


# -- files ----------------------------------------------------------------------------------------------
def test_jsonl_round_trips_and_is_strict_json(tmp_path):
    _, opt = trained(steps=3)
    audit = opt.audit
    audit.add(4, ["odd"], ["C"], [(math.inf, -math.inf, 0.0, math.nan)])
    path = tmp_path / "audit.jsonl"
    audit.to_jsonl(path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(audit.history) == 3 * 3 + 1

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    for line in lines:
        d = json.loads(line, parse_constant=no_constants)
        assert set(d) == {"step", "name", "constraint", "drift", "drift_max", "residual", "grad_blocked"}
    back = read_jsonl(path)
    for a, b in zip(back, audit.history, strict=True):
        for key, va in a.to_dict().items():
            vb = getattr(b, key)
            assert va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb)), key
    loaded = Audit.from_jsonl(path)
    assert loaded.summaries["dilated.weight"] == audit.summaries["dilated.weight"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(bad)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    _, opt = trained(steps=6)
    path = tmp_path / "audit.png"
    opt.audit.plot(path)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    Audit().plot(tmp_path / "empty.png")  # an empty audit still writes a (blank) figure
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises
    _, opt = trained(steps=1)
    with pytest.raises(ImportError, match=re.escape("constrained-optim[plot]")):
        opt.audit.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# -- the reader for saved audits -------------------------------------------------------------------------
def test_cli_report_prints_the_summary_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, opt = trained(steps=3)
    path, png = tmp_path / "run.jsonl", tmp_path / "run.png"
    opt.audit.to_jsonl(path)
    assert cli_main(["report", str(path), "--plot", str(png), "--records", "3"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out
    assert "steps 1..3, 9 records" in out and png.read_bytes()[:8] == PNG_SIGNATURE
    assert cli_main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "error" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    _, opt = trained(steps=2)
    path = tmp_path / "run.jsonl"
    opt.audit.to_jsonl(path)
    # -W error: running a module the package already imported would warn (runpy)
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "constrained_optim.audit",
                           "report", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mixer.weight" in done.stdout and done.stderr == ""


def test_only_report_imports_rich():
    importers = [p.relative_to(ROOT).as_posix() for p in (ROOT / "constrained_optim").rglob("*.py")
                 if re.search(r"^\s*(import rich|from rich)", p.read_text(), re.M)]
    assert importers == ["constrained_optim/report.py"]
    code = "import sys, constrained_optim; assert 'rich' not in sys.modules, 'rich imported eagerly'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_records_table_of_explicit_records():
    records = [AuditRecord(7, "a.weight", "Mask(1/4 free)", 0.0, 0.0, 0.0, 0.25)]
    console = Console(record=True, width=90)
    console.print(report.records_table(records))
    text = console.export_text()
    assert "a.weight" in text and "0.25" in text and " 7 " in text
