"""Rendering audits for people: the training-log block and rich tables. The only module that
imports rich."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.table import Table


def log_step(log: logging.Logger, step: int, records) -> None:
    """One INFO line per constrained parameter, parseable in a plain log file."""
    for r in records:
        log.info(
            "step %d %s %s drift=%.3g drift_max=%.3g residual=%.3g grad_blocked=%.3g",
            step, r.name, r.constraint, r.drift, r.drift_max, r.residual, r.grad_blocked,
        )


def records_table(records, title: str = "constraint audit") -> Table:
    table = Table(title=title)
    for column in ("step", "parameter", "constraint", "drift", "drift max", "residual", "grad blocked"):
        table.add_column(column, justify="left" if column in ("parameter", "constraint") else "right")
    for r in records:
        table.add_row(str(r.step), r.name, r.constraint, f"{r.drift:.3g}", f"{r.drift_max:.3g}",
                      f"{r.residual:.3g}", f"{r.grad_blocked:.3g}")
    return table


def print_table(table: Table, console: Console | None = None) -> None:
    (console or Console()).print(table)
