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
    opt = co.ConstrainedOptimizer(
        torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.2), net, **kwargs
    )
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


# -- logging never breaks training -----------------------------------------------------------------
RECORDS = [
    AuditRecord(3, "a.weight", "Mask(1/2 free)", 0.0, 0.0, 0.0, 0.5),
    AuditRecord(3, "b.weight", "MaxNorm(1)", 0.125, 0.0625, 0.0, math.nan),
]


class BrokenTty(io.StringIO):
    def isatty(self):
        raise OSError("the terminal went away")


class RaisingHandler(logging.Handler):
    """A third-party handler that lets its errors out of ``emit``."""

    def emit(self, record):
        raise RuntimeError("log shipper down")


@pytest.fixture
def library_logger():
    """The library's own logger at INFO, its handlers restored afterwards."""
    logger = logging.getLogger("constrained_optim")
    handlers, level = list(logger.handlers), logger.level
    logger.setLevel(logging.INFO)
    yield logger
    for h in [h for h in logger.handlers if h not in handlers]:
        logger.removeHandler(h)
    logger.setLevel(level)


def test_a_closed_stream_does_not_break_logging(library_logger, capsys):
    closed, good = io.StringIO(), io.StringIO()
    closed.close()
    library_logger.addHandler(logging.StreamHandler(closed))
    library_logger.addHandler(logging.StreamHandler(good))
    report.log_step(library_logger, 3, RECORDS)  # does not raise
    lines = good.getvalue().splitlines()
    assert [parse_line(line)["param"] for line in lines] == ["a.weight", "b.weight"]
    assert parse_line(lines[1])["drift"] == "0.125"
    capsys.readouterr()  # logging's own note of the closed stream (Handler.handleError)


def test_a_closed_stream_does_not_break_a_training_step(library_logger, capsys):
    closed = io.StringIO()
    closed.close()
    library_logger.addHandler(logging.StreamHandler(closed))
    _, opt = trained(steps=3, log_every=1)  # each step logs to the closed stream
    assert opt.steps_taken == 3
    capsys.readouterr()


def test_a_handler_whose_isatty_raises_gets_plain_lines():
    tty, broken = TtyStream(), BrokenTty()
    logger = terminal_logger(broken, tty)
    report.log_step(logger, 3, RECORDS)  # cannot tell it is a terminal: plain lines to both
    for stream in (broken, tty):
        assert [parse_line(line)["param"] for line in stream.getvalue().splitlines()] == [
            "a.weight",
            "b.weight",
        ]
    alone = BrokenTty()
    report.log_step(terminal_logger(alone), 3, RECORDS)
    assert len(alone.getvalue().splitlines()) == 2


def test_a_table_that_fails_to_render_falls_back_to_lines(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("rich broke")

    monkeypatch.setattr(report, "render_text", broken)
    tty = TtyStream()
    report.log_step(terminal_logger(tty), 3, RECORDS)
    assert [parse_line(line)["param"] for line in tty.getvalue().splitlines()] == ["a.weight", "b.weight"]


def test_a_handler_that_raises_is_noted_and_skipped(capsys):
    good = io.StringIO()
    logger = terminal_logger(good, RaisingHandler())
    report.log_step(logger, 3, RECORDS)
    assert len(good.getvalue().splitlines()) == 2  # it got each record before the raising one
    assert "audit log failed" in capsys.readouterr().err
    tty = TtyStream()
    report.log_step(terminal_logger(tty, RaisingHandler()), 3, RECORDS)  # no terminal-only set
    assert len(tty.getvalue().splitlines()) == 2


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
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "constrained_optim.audit", "report", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "mixer.weight" in done.stdout and done.stderr == ""


GOOD = {
    "step": 1,
    "name": "w",
    "constraint": "Mask(1/2 free)",
    "drift": 0.5,
    "drift_max": None,
    "residual": "inf",
    "grad_blocked": 0,
}
MALFORMED = {  # name: (the bad line, what the error says)
    "string step": (json.dumps({**GOOD, "step": "x"}), 'step must be an integer >= 0, got "x"'),
    "negative step": (json.dumps({**GOOD, "step": -1}), "step must be an integer >= 0, got -1"),
    "boolean step": (json.dumps({**GOOD, "step": True}), "step must be an integer >= 0, got true"),
    "deep nesting": ('{"step": 1, "name": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply"),
    "array": ("[1, 2, 3]", "expected a JSON object, got an array"),
    "number": ("17", "expected a JSON object, got a number"),
    "missing fields": (
        '{"step": 1, "name": "w"}',
        "missing constraint, drift, drift_max, residual, grad_blocked",
    ),
    "unknown field": (json.dumps({**GOOD, "extra": 1}), "unknown field 'extra'"),
    "name not a string": (json.dumps({**GOOD, "name": 3}), "name must be a string, got 3"),
    "measure a string": (
        json.dumps({**GOOD, "drift": "big"}),
        'drift must be a number, null, "inf" or "-inf", got "big"',
    ),
    "measure out of range": (
        json.dumps(GOOD).replace('"drift": 0.5', '"drift": ' + "9" * 400),
        "drift is out of range",
    ),
    "not JSON": ('{"step": 1,', "not JSON"),
}


def write_run(tmp_path, bad_line: bytes | str, name="run.jsonl"):
    """A file whose first and third lines are good records and whose second is ``bad_line``."""
    path = tmp_path / name
    bad = bad_line.encode() if isinstance(bad_line, str) else bad_line
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + bad + b"\n\n" + json.dumps(GOOD).encode() + b"\n")
    return path


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "constrained_optim.audit", "report", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def assert_one_error_line(done, *expected):
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for text in expected:
        assert text in lines[0], (text, lines[0])


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_read_jsonl_names_the_line_and_what_is_wrong(tmp_path, kind):
    line, what = MALFORMED[kind]
    path = write_run(tmp_path, line)
    with pytest.raises(ValueError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and what in str(err.value)


def test_read_jsonl_takes_what_to_jsonl_writes_and_standard_json_numbers(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(
        "\ufeff"
        + json.dumps(GOOD)
        + "\n\n"
        + json.dumps({**GOOD, "residual": "-inf", "step": 2})
        + "\n"
        + json.dumps({**GOOD, "drift": math.inf})
        + "\n",
        encoding="utf-8",
    )
    a, b, c = read_jsonl(path)
    assert (a.step, a.name, a.drift, a.residual, a.grad_blocked) == (1, "w", 0.5, math.inf, 0.0)
    assert math.isnan(a.drift_max) and b.residual == -math.inf and c.drift == math.inf
    assert isinstance(a.grad_blocked, float)
    with pytest.raises(TypeError, match="AuditRecords"):
        Audit.from_records([GOOD])


@pytest.mark.parametrize(
    "kind", ["string step", "deep nesting", "array", "missing fields", "measure a string", "not JSON"]
)
def test_cli_report_on_a_malformed_record_prints_one_error_line(tmp_path, kind):
    line, what = MALFORMED[kind]
    path = write_run(tmp_path, line)
    assert_one_error_line(run_cli(path), f"{path}:2:", what)


def test_cli_report_on_a_file_that_is_not_utf8(tmp_path):
    path = write_run(tmp_path, b'{"step": 1, "name": "\xff\xfe"}')
    assert_one_error_line(run_cli(path), f"{path}:2:", "not UTF-8", "0xff")


def test_cli_report_on_a_missing_file_or_a_directory(tmp_path):
    assert_one_error_line(run_cli(tmp_path / "missing.jsonl"), "missing.jsonl", "No such file")
    assert cli_main(["report", str(tmp_path)]) == 2  # a directory: in-process, same path


def test_cli_report_in_process_errors_are_one_line(tmp_path, capsys):
    for kind, (line, what) in MALFORMED.items():
        path = write_run(tmp_path, line, name=f"{len(kind)}.jsonl")
        assert cli_main(["report", str(path)]) == 2, kind
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {path}:2: ") and what in err, kind


def test_only_report_imports_rich():
    importers = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "constrained_optim").rglob("*.py")
        if re.search(r"^\s*(import rich|from rich)", p.read_text(), re.M)
    ]
    assert importers == ["constrained_optim/report.py"]
    code = "import sys, constrained_optim; assert 'rich' not in sys.modules, 'rich imported eagerly'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


def test_records_table_of_explicit_records():
    records = [AuditRecord(7, "a.weight", "Mask(1/4 free)", 0.0, 0.0, 0.0, 0.25)]
    console = Console(record=True, width=90)
    console.print(report.records_table(records))
    text = console.export_text()
    assert "a.weight" in text and "0.25" in text and " 7 " in text
