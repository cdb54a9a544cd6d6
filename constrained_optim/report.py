"""Rendering audits for people: the training-log block, rich tables and the plot.

The only module that imports rich (matplotlib is imported by `plot` alone, as an optional extra).
Nothing here measures; it formats `AuditRecord`s and `ParamSummary`s.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import sys

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["log_step", "plot", "print_renderable", "records_table", "run_table", "summary_table"]


def _num(x: float) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.3g}"


def _step(s) -> str:
    return "-" if s is None else str(s)


# -- the training log --------------------------------------------------------------------------------
def log_line(r) -> str:
    """One record on one line: ``step 100 conv.weight Fixed((..., 1, 1), 0.0) drift=1.2e-05
    drift_max=... residual=0 grad_blocked=0.11`` (the name has no spaces; the constraint runs to
    `` drift=``)."""
    return (
        f"step {r.step} {r.name} {r.constraint} drift={_num(r.drift)} "
        f"drift_max={_num(r.drift_max)} residual={_num(r.residual)} "
        f"grad_blocked={_num(r.grad_blocked)}"
    )


def _handlers(logger: logging.Logger):
    """The handlers a record from ``logger`` reaches, following propagation as logging does."""
    found = []
    node: logging.Logger | None = logger
    while node is not None:
        found.extend(node.handlers)
        if not node.propagate:
            break
        node = node.parent
    return found


def _terminal_width(logger: logging.Logger) -> int | None:
    """A width for a rich table when every handler the record reaches writes to a terminal
    (a ``StreamHandler`` on a tty, or rich's ``RichHandler``); None when any goes elsewhere
    (a file, pytest's capture, a socket), which gets one plain line per parameter. A handler
    that cannot say (a closed stream, an ``isatty`` that raises) counts as not a terminal."""
    handlers = [h for h in _handlers(logger) if h.level <= logging.INFO]
    if not handlers:
        return None
    width = shutil.get_terminal_size((120, 24)).columns
    for h in handlers:
        try:
            console = getattr(h, "console", None)  # rich.logging.RichHandler
            if isinstance(console, Console):
                width = min(width, max(60, console.width - 40))  # its time/level/path columns
                continue
            stream = getattr(h, "stream", None)
            isatty = getattr(stream, "isatty", None)
            if not (isinstance(h, logging.StreamHandler) and callable(isatty) and isatty()):
                return None
        except Exception:
            return None
    return width


def _info(logger: logging.Logger, *args, **kwargs) -> None:
    """``logger.info`` that a failing handler cannot turn into an exception in the caller (the
    logging module's own handlers already swallow their errors; a third-party one may not)."""
    try:
        logger.info(*args, **kwargs)
    except Exception:
        _report_logging_error()


def _report_logging_error() -> None:
    """What `logging.Handler.handleError` does: note it on stderr while
    ``logging.raiseExceptions`` is set, never raise."""
    if not logging.raiseExceptions:
        return
    try:
        err = sys.exc_info()[1]
        sys.stderr.write(
            f"constrained_optim: the audit log failed and was skipped ({type(err).__name__}: {err})\n"
        )
    except Exception:
        pass


def log_step(logger: logging.Logger, step: int, records) -> None:
    """The audit of a step at INFO. Where every handler the log reaches is a terminal: one record,
    a rich table. Otherwise (files, capture, log shippers): one record per parameter, each a
    single `log_line`, so every line carries the handler's own prefix and parses alone. Each
    log record carries the `AuditRecord` s it reports as ``record.audit``.

    Never raises: logging must not stop training. A handler that cannot tell whether it is a
    terminal gets the plain lines; a table that fails to render falls back to them; a handler
    that raises is noted on stderr (as `logging.Handler.handleError` does) and skipped."""
    try:
        records = list(records)
        if not records:
            return
        width = _terminal_width(logger)
    except Exception:
        _report_logging_error()
        return
    if width is not None:
        try:
            head, table = _table_block(step, records, width)
        except Exception:  # rendering failed: the plain lines still say everything
            width = None
        else:
            _info(logger, "%s\n%s", head, table, extra={"audit": records})
            return
    for r in records:
        try:
            line = log_line(r)
        except Exception:
            _report_logging_error()
            continue
        _info(logger, "%s", line, extra={"audit": [r]})


def _table_block(step: int, records, width: int) -> tuple[str, str]:
    """The heading line and the rendered table of `log_step` on a terminal."""
    measured = records[0].step
    worst = max(records, key=lambda r: r.drift if math.isfinite(r.drift) else math.inf)
    head = f"constraint audit, step {step}"
    if measured != step:
        head += f" (measured at step {measured})"
    head += (
        f": max drift {_num(worst.drift)} ({worst.name}), "
        f"max residual {_num(max(r.residual for r in records))}"
    )
    table = render_text(records_table(records, title=None, show_step=False), width)
    return head, table.rstrip("\n")


def render_text(renderable, width: int = 120) -> str:
    """``renderable`` as plain text (box drawing, no colour codes)."""
    buf = io.StringIO()
    Console(
        file=buf,
        width=width,
        color_system=None,
        force_terminal=False,
        highlight=False,
        soft_wrap=False,
        legacy_windows=False,
    ).print(renderable)
    return buf.getvalue()


# -- tables ------------------------------------------------------------------------------------------
def _table(title, number_columns) -> Table:
    """A compact table that fits an 80-column terminal: the parameter's name (never truncated, it
    is how a user finds it) with its constraint beneath, then numbers, which never wrap (their
    headers do). ``number_columns``: ``(header, width)``; 8 fits any ``%.3g`` of a non-negative
    float (``1.23e-05``)."""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        title_justify="left",
    )
    table.add_column("parameter\n[dim]constraint[/dim]", overflow="fold", min_width=14, ratio=1)
    for name, width in number_columns:
        table.add_column(name, justify="right", min_width=width, max_width=width)
    return table


def _who(name: str, constraint: str) -> str:
    return f"{escape(name)}\n[dim]{escape(constraint)}[/dim]"


def records_table(records, title: str | None = "constraint audit", show_step: bool = True) -> Table:
    """One row per `AuditRecord`."""
    numbers = (("drift", 8), ("drift max", 8), ("residual", 8), ("grad blocked", 8))
    table = _table(title, ((("step", 7),) if show_step else ()) + numbers)
    for r in records:
        cells = [_who(r.name, r.constraint)] + ([str(r.step)] if show_step else [])
        cells += [_num(r.drift), _num(r.drift_max), _num(r.residual), _num(r.grad_blocked)]
        table.add_row(*cells)
    return table


def summary_table(summaries, title: str | None = "constraint audit: whole run") -> Table:
    """One row per `ParamSummary`: the run, not just the kept history."""
    table = _table(
        title,
        (
            ("audited", 7),
            ("drift mean", 8),
            ("drift max", 8),
            ("at step", 7),
            ("residual max", 8),
            ("grad blocked mean", 8),
            ("non- finite", 6),
        ),
    )
    for s in summaries:
        table.add_row(
            _who(s.name, s.constraint),
            str(s.audited),
            _num(s.drift_mean),
            _num(s.drift_max),
            _step(s.worst_step),
            _num(s.residual_max),
            _num(s.grad_blocked_mean),
            str(s.nonfinite),
            style="red" if s.nonfinite else None,
        )
    return table


def run_table(audit, title: str | None = None) -> Table:
    """One row per parameter: its latest audited step, then the worst of the whole run (the step
    of the worst drift is in `summary_table`)."""
    last = {r.name: r for r in audit.last}
    if title is None:
        latest = audit.last[0].step if audit.last else None
        title = f"constraint audit, latest step {_step(latest)}"
    table = _table(
        title,
        (
            ("drift", 8),
            ("residual", 8),
            ("grad blocked", 8),
            ("run: max drift", 8),
            ("max residual", 8),
            ("non- finite", 6),
        ),
    )
    for name, s in audit.summaries.items():
        r = last.get(name)
        now = [_num(r.drift), _num(r.residual), _num(r.grad_blocked)] if r else ["-"] * 3
        table.add_row(
            _who(name, s.constraint),
            *now,
            _num(s.drift_max),
            _num(s.residual_max),
            str(s.nonfinite),
            style="red" if s.nonfinite else None,
        )
    return table


def print_renderable(renderable, console: Console | None = None) -> None:
    (console or Console()).print(renderable)


# -- the plot ------------------------------------------------------------------------------------------
def plot(records, path) -> None:
    """A PNG at ``path``: drift (top) and residual (bottom) per parameter over steps, log scale.

    Zeros cannot sit on a log axis: a parameter whose values are all zero is named in the legend
    as such, and single zeros leave gaps in its line."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plotting an audit needs matplotlib: pip install 'constrained-optim[plot]'"
        ) from None
    series: dict[str, list] = {}
    for r in records:
        series.setdefault(r.name, []).append(r)
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: the user's backend and global state stay untouched
    axes = fig.subplots(2, 1, sharex=True)
    steps_seen = [r.step for r in records]
    for ax, field, label in (
        (axes[0], "drift", "drift  ||x - P(x)|| before projection"),
        (axes[1], "residual", "residual  after projection"),
    ):
        plotted = False
        for name, rs in series.items():
            steps = [r.step for r in rs]
            values = [getattr(r, field) for r in rs]
            shown = [v if (math.isfinite(v) and v > 0) else math.nan for v in values]
            if all(math.isnan(v) for v in shown):
                tag = "0 throughout" if all(v == 0 for v in values) else "no positive value"
                ax.plot([], [], label=f"{name} ({tag})")
                continue
            ax.plot(steps, shown, label=name, marker="." if len(rs) < 50 else None, linewidth=1)
            plotted = True
        if plotted:
            ax.set_yscale("log")
        else:  # nothing to draw on a log axis: say so rather than show an empty frame
            ax.set_yticks([])
            ax.text(
                0.5, 0.5, f"{field} 0 at every audited step", transform=ax.transAxes, ha="center", va="center"
            )
        if steps_seen and min(steps_seen) < max(steps_seen):
            ax.set_xlim(min(steps_seen), max(steps_seen))
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize="small", loc="best")
    axes[1].set_xlabel("step")
    fig.suptitle("constraint audit")
    fig.savefig(path, format="png", dpi=100)
