"""What happens when a constrained parameter is off its set: the tolerance and ``on_violation``.

After every step a parameter holding NaN or inf is reported by name (a WARNING log record, and
a warning or, under ``"raise"``, `ConstraintViolation`). On audited steps a residual (distance
after projection) above the tolerance triggers ``on_violation``: ``"warn"``, ``"raise"`` or
``"ignore"``. The default tolerance is a few float eps of the parameter's scale.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from types import FrameType

import torch

from .errors import ConstraintError, ConstraintViolation

log = logging.getLogger("constrained_optim")

ON_VIOLATION = ("warn", "raise", "ignore")


def default_atol(param_norm: float, param: torch.Tensor) -> float:
    """A few float eps relative to the parameter's scale.

    The scale is its norm, times ``sqrt(min(m, k))`` of its ``(m, k)`` matrix view: rounding in
    an SVD-based projection (`Orthogonal`, `LowRank`) grows with the matrix's size, while exact
    projections leave 0 whatever the size."""
    rows = param.shape[0] if param.dim() >= 2 else 1
    side = min(rows, param.numel() // max(rows, 1)) if param.numel() else 1
    return 16 * torch.finfo(param.dtype).eps * max(1.0, param_norm) * math.sqrt(max(side, 1))


class ViolationPolicy:
    """``tolerance`` (None: `default_atol`) and ``on_violation``, checked at construction."""

    def __init__(self, tolerance: float | None = None, on_violation: str = "warn"):
        if tolerance is not None and (
            isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0
        ):
            raise ConstraintError(f"tolerance must be None or a number >= 0, got {tolerance!r}")
        if on_violation not in ON_VIOLATION:
            raise ConstraintError(f"on_violation must be one of {ON_VIOLATION}, got {on_violation!r}")
        self.tolerance = tolerance
        self.on_violation = on_violation

    def nonfinite(self, step: int, names: list[str]) -> None:
        """Parameters that hold NaN or inf after the step: always reported."""
        message = (
            f"step {step}: non-finite values in constrained parameter"
            f"{'s' if len(names) > 1 else ''} {', '.join(names)}"
        )
        log.warning(message)  # whatever on_violation says: NaN is never silent
        self._violate(message)

    def residuals(self, step: int, records, params, param_norms) -> None:
        """Residuals above the tolerance, on an audited step."""
        if self.on_violation == "ignore":
            return
        off = []
        for r, p, n in zip(records, params, param_norms):
            limit = self.tolerance if self.tolerance is not None else default_atol(n, p)
            if math.isfinite(n) and not r.residual <= limit:
                off.append(f"{r.name} (residual {r.residual:.3g} > tolerance {limit:.3g}, {r.constraint})")
        if off:
            self._violate(f"step {step}: off the set after projection: {'; '.join(off)}")

    def _violate(self, message: str) -> None:
        if self.on_violation == "raise":
            raise ConstraintViolation(message)
        warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line calling ``step``, past this
    package and torch's step and ``no_grad`` wrappers."""
    frame: FrameType | None
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level
