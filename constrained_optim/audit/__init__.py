"""What the optimizer did to each constrained parameter, step by step. Records; never prints.

An audited step yields one `AuditRecord` per constrained parameter, measured on the real tensors
(`constrained_optim.audit.measure`). `Audit` keeps the last ``max_history`` records and, for the
whole run, a `ParamSummary` per parameter, so a long run's memory stays bounded while its worst
moments are still known. Rendering (tables, the log block, the plot) lives in `report`, which is
imported only when asked for; ``python -m constrained_optim.audit report run.jsonl`` reads a saved
audit back.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported by report alone, when something is rendered
    from ..report import Console, Table

__all__ = ["Audit", "AuditRecord", "ParamSummary", "read_jsonl"]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One constrained parameter at one audited step.

    - ``drift``: Frobenius distance of the parameter from its set after the wrapped step, before
      projection (how hard the optimizer pushed it off the set); ``drift_max``: the largest
      entry of ``x - P(x)`` in magnitude.
    - ``residual``: the distance after projection, ``||P(x) - P(P(x))||`` or the set's own
      distance (0 for exact projections).
    - ``grad_blocked``: ``||g - P_T(g)|| / ||g||`` with ``P_T`` the tangent projection: the share
      of the gradient's norm that the projection removed (``nan`` where there was no gradient,
      a zero gradient, or no gradient projection).
    """

    step: int
    name: str
    constraint: str
    drift: float
    drift_max: float
    residual: float
    grad_blocked: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class ParamSummary:
    """One parameter over the whole run (every audited step, not only the kept history).

    Means and maxima are over finite values; ``nonfinite`` counts the steps (audited or not)
    after which the parameter held a non-finite value.
    """

    name: str
    constraint: str
    audited: int = 0  # audited steps
    drift_max: float = 0.0  # largest drift of the run
    worst_step: int | None = None  # the step of drift_max
    drift_sum: float = 0.0
    drift_count: int = 0
    residual_max: float = 0.0
    residual_step: int | None = None
    blocked_sum: float = 0.0
    blocked_count: int = 0
    nonfinite: int = 0
    last_step: int | None = None

    @property
    def drift_mean(self) -> float:
        return self.drift_sum / self.drift_count if self.drift_count else math.nan

    @property
    def grad_blocked_mean(self) -> float:
        return self.blocked_sum / self.blocked_count if self.blocked_count else math.nan

    def add(self, r: AuditRecord) -> None:
        self.constraint = r.constraint
        self.audited += 1
        self.last_step = r.step
        if math.isfinite(r.drift):
            self.drift_sum += r.drift
            self.drift_count += 1
            if self.worst_step is None or r.drift > self.drift_max:
                self.drift_max, self.worst_step = r.drift, r.step
        if math.isfinite(r.residual) and (self.residual_step is None or r.residual > self.residual_max):
            self.residual_max, self.residual_step = r.residual, r.step
        if math.isfinite(r.grad_blocked):
            self.blocked_sum += r.grad_blocked
            self.blocked_count += 1

    def to_dict(self) -> dict:
        return asdict(self)


class Audit:
    """The audited steps of a run.

    - ``history``: the last ``max_history`` records (a bounded buffer; oldest dropped first);
    - ``last``: the records of the latest audited step;
    - ``summaries``: a `ParamSummary` per parameter name over the whole run.

    ``table()``, ``summary()``, ``print()``, ``to_jsonl()`` and ``plot()`` render it (rich and
    matplotlib are imported only there).
    """

    def __init__(self, max_history: int = 10_000) -> None:
        self._check_max_history(max_history)
        self._records: deque[AuditRecord] = deque(maxlen=max_history)
        self.last: list[AuditRecord] = []
        self.summaries: dict[str, ParamSummary] = {}

    # -- recording -------------------------------------------------------------------------------
    @property
    def max_history(self) -> int:
        return self._records.maxlen or 0  # never None: the deque is always built with a maxlen

    @max_history.setter
    def max_history(self, n: int) -> None:
        self._check_max_history(n)
        self._records = deque(self._records, maxlen=n)

    @staticmethod
    def _check_max_history(n) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"max_history must be an int >= 0, got {n!r}")

    @property
    def history(self) -> list[AuditRecord]:
        return list(self._records)

    def add(
        self, step: int, names: Sequence[str], constraints: Sequence[str], rows: Iterable[Sequence[float]]
    ) -> list[AuditRecord]:
        """Records of one audited step; ``rows`` holds ``[drift, drift_max, residual, grad_blocked]``
        per parameter as Python numbers (converted from the device once for the whole step)."""
        self.last = [
            AuditRecord(step, name, constraint, *map(float, row[:4]))
            for name, constraint, row in zip(names, constraints, rows)
        ]
        self._records.extend(self.last)
        for r in self.last:
            self._summary(r.name, r.constraint).add(r)
        return self.last

    def note_nonfinite(self, step: int, names: Iterable[str], constraints: Iterable[str]) -> None:
        """Count a step after which these parameters held non-finite values."""
        for name, constraint in zip(names, constraints):
            self._summary(name, constraint).nonfinite += 1

    def _summary(self, name: str, constraint: str) -> ParamSummary:
        s = self.summaries.get(name)
        if s is None:
            s = self.summaries[name] = ParamSummary(name, constraint)
        return s

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint keeps of the audit: plain Python data (loads with ``weights_only``)."""
        return {
            "max_history": self.max_history,
            "history": [r.to_dict() for r in self._records],
            "last": [r.to_dict() for r in self.last],
            "summaries": [s.to_dict() for s in self.summaries.values()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict` (the run's summaries continue where they stopped)."""
        try:
            history = [AuditRecord(**r) for r in state["history"]]
            last = [AuditRecord(**r) for r in state["last"]]
            max_history = state.get("max_history", self.max_history)
            summaries = state.get("summaries")
            if summaries is None:  # a checkpoint from before summaries: rebuild from what it kept
                rebuilt = Audit()
                for r in history:
                    rebuilt._summary(r.name, r.constraint).add(r)
                summaries = [s.to_dict() for s in rebuilt.summaries.values()]
            names = {f.name for f in fields(ParamSummary)}
            summaries = {
                s["name"]: ParamSummary(**{k: v for k, v in s.items() if k in names}) for s in summaries
            }
        except (KeyError, TypeError) as err:
            raise ValueError(f"not an audit state_dict: {err}") from None
        self._check_max_history(max_history)
        self._records = deque(history, maxlen=max_history)
        self.last = last
        self.summaries = summaries

    # -- files -------------------------------------------------------------------------------------
    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write the kept history, one JSON object per record (strict JSON: ``nan`` is ``null``,
        infinities are the strings ``"inf"`` / ``"-inf"``)."""
        with open(path, "w", encoding="utf-8") as f:
            for r in self._records:
                f.write(json.dumps(_encode(r.to_dict()), allow_nan=False) + "\n")

    @classmethod
    def from_records(cls, records: Iterable[AuditRecord], max_history: int | None = None) -> Audit:
        """An `Audit` holding ``records`` (summaries rebuilt from them), e.g. a saved run's."""
        records = list(records)
        strangers = {type(r).__name__ for r in records if not isinstance(r, AuditRecord)}
        if strangers:
            raise TypeError(f"from_records takes AuditRecords, got {', '.join(sorted(strangers))}")
        audit = cls(max(len(records), 1) if max_history is None else max_history)
        for r in records:
            audit._records.append(r)
            audit._summary(r.name, r.constraint).add(r)
        if records:
            audit.last = [r for r in records if r.step == records[-1].step]
        return audit

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> Audit:
        return cls.from_records(read_jsonl(path))

    # -- rendering (report.py) ---------------------------------------------------------------------
    def table(self, records: Iterable[AuditRecord] | None = None) -> Table:
        """A ``rich.table.Table``: one row per parameter with its latest audited step and the run
        (``records`` given: one row per record instead)."""
        from .. import report

        if records is not None:
            return report.records_table(records)
        return report.run_table(self)

    def summary(self) -> Table:
        """The whole-run summary, one row per parameter, as a ``rich.table.Table``."""
        from .. import report

        return report.summary_table(self.summaries.values())

    def print(self, console: Console | None = None) -> None:
        """Print `table` with ``console`` (default: a new ``rich.console.Console`` on stdout)."""
        from .. import report

        report.print_renderable(self.table(), console)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """A PNG of drift and residual per parameter over the kept steps (log scale). Needs
        matplotlib: ``pip install constrained-optim[plot]``."""
        from .. import report

        report.plot(self.history, path)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (
            f"Audit({len(self._records)} records kept of max {self.max_history}, "
            f"{len(self.summaries)} parameters)"
        )


def _encode(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        out[k] = v
    return out


_FLOATS = ("drift", "drift_max", "residual", "grad_blocked")


def read_jsonl(path: str | os.PathLike[str]) -> list[AuditRecord]:
    """The records `Audit.to_jsonl` wrote, validated: one JSON object per line with ``step`` (an
    int >= 0), ``name`` and ``constraint`` (strings) and the four measures (numbers; ``null`` is
    nan, ``"inf"`` / ``"-inf"`` the infinities). Blank lines are skipped. Anything else raises
    `ValueError` naming ``path:line`` and what is wrong (`OSError` if the file cannot be read)."""
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                records.append(_record(_json(line)))
            except ValueError as err:
                raise ValueError(f"{path}:{n}: {err}") from None
    return records


_FIELDS = ("step", "name", "constraint", *_FLOATS)


def _json(line: str):
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError("not an audit record (JSON nested too deeply)") from None
    except ValueError as err:
        raise ValueError(f"not JSON ({err})") from None


def _record(d) -> AuditRecord:
    """An `AuditRecord` from one decoded line; `ValueError` saying what is wrong."""
    if not isinstance(d, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(d), "a number"
        )
        raise ValueError(f"not an audit record (expected a JSON object, got {kind})")
    missing = [k for k in _FIELDS if k not in d]
    unknown = [k for k in d if k not in _FIELDS]
    if missing or unknown:
        what = [f"missing {', '.join(missing)}"] if missing else []
        what += [f"unknown field {', '.join(map(repr, unknown))}"] if unknown else []
        raise ValueError(f"not an audit record ({'; '.join(what)})")
    step = d["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {_show(step)}")
    for k in ("name", "constraint"):
        if not isinstance(d[k], str):
            raise ValueError(f"{k} must be a string, got {_show(d[k])}")
    values = [_measure(k, d[k]) for k in _FLOATS]
    return AuditRecord(step, d["name"], d["constraint"], *values)


def _measure(key: str, v) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str) and v in ("inf", "-inf"):
        return float(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            return float(v)
        except OverflowError:
            raise ValueError(f"{key} is out of range for a float: {_show(v)}") from None
    raise ValueError(f'{key} must be a number, null, "inf" or "-inf", got {_show(v)}')


def _show(v) -> str:
    """A short rendering of a JSON value for an error message."""
    try:
        text = json.dumps(v) if not isinstance(v, int) or isinstance(v, bool) else str(v)
    except (ValueError, RecursionError):
        text = type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."
