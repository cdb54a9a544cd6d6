"""What the optimizer did to each constrained parameter, step by step. Measures; never prints."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class AuditRecord:
    """One constrained parameter at one audited step.

    - ``drift``: Frobenius distance of the parameter from its set after the wrapped step, before
      projection (how hard the optimizer pushed it off the set); ``drift_max``: its largest entry.
    - ``residual``: the distance after projection (0 for exact projections).
    - ``grad_blocked``: ``||g - P(g)|| / ||g||``, the share of the gradient's norm that the tangent
      projection removed (``nan`` where there was no gradient or no gradient projection).
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


class Audit:
    """The audited steps of a run: the last ``max_history`` records and the latest step's."""

    def __init__(self, max_history: int = 10_000):
        self._records: deque[AuditRecord] = deque(maxlen=max_history)
        self.last: list[AuditRecord] = []

    @property
    def history(self) -> list[AuditRecord]:
        return list(self._records)

    def add(self, step: int, names, constraints, table: list[list[float]]) -> list[AuditRecord]:
        """Records from one audited step; ``table`` holds ``[drift, drift_max, residual, blocked]``
        per parameter, already converted to Python numbers once."""
        self.last = [
            AuditRecord(step, name, constraint, *row)
            for name, constraint, row in zip(names, constraints, table)
        ]
        self._records.extend(self.last)
        return self.last

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the audit (plain Python data)."""
        return {"history": [r.to_dict() for r in self._records], "last": [r.to_dict() for r in self.last]}

    def load_state_dict(self, state: dict) -> None:
        self._records.clear()
        self._records.extend(AuditRecord(**r) for r in state["history"])
        self.last = [AuditRecord(**r) for r in state["last"]]

    def table(self, records=None):
        """A ``rich.table.Table`` of ``records`` (default: the whole history)."""
        from .report import records_table

        return records_table(self.history if records is None else records)

    def print(self, console=None) -> None:
        from .report import print_table

        print_table(self.table(), console)


def gap_stats(gaps: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[||gap||, max|gap|]`` per tensor, as 0-d tensors (no host sync)."""
    if not gaps:
        return []
    norms = torch._foreach_norm(gaps)
    maxes = torch._foreach_norm(gaps, math.inf)
    return [torch.stack([n, m]) for n, m in zip(norms, maxes)]
