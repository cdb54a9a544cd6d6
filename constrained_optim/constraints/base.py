"""What every constraint is: a user-facing spec (`Constraint`) and its per-parameter form (`Bound`).

A `Constraint` describes a set (``Mask(mask)``, ``MaxNorm(3.0)``); it can be attached to many
parameters at once. `Constraint.bind(param, name)` validates it against one parameter and
resolves everything the step needs (masks, index tensors, orthonormal bases) into a `Bound`,
so the step path does arithmetic only.

A `Bound` works in place on tensors shaped like its parameter, always under ``torch.no_grad()``:

- ``project_(x)``: move ``x`` onto the set (the nearest point);
- ``project_grad_(g, x)``: move a gradient onto the tangent space of the set at ``x``
  (only where ``projects_grad``; exact for linear sets);
- ``project_moment_(m, x)``: the same for first-moment optimizer state (momentum, ``exp_avg``);
- ``project_scale_(v)``: keep non-negative second-moment state (``exp_avg_sq``) consistent
  with the set without breaking its sign: zero on held entries, averaged within tied groups;
- ``project_point_(x)``: optimizer state that is itself a point (ASGD's average ``ax``);
- ``gap(x)``: ``x - P(x)`` as a new tensor, the audit's measure of how far ``x`` is off the set
  (``gap_entries``/``grad_gap_entries``: cheaper forms the audit uses where a family has them).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import ConstraintError, describe


class Constraint:
    """A set of allowed values for a parameter. Subclasses implement `_bind`."""

    #: True for linear and affine sets: the gradient projection is exact and the optimizer's
    #: update of a point of the set stays in the set (for element-wise optimizers).
    linear: ClassVar[bool] = False

    def bind(self, param: torch.Tensor, name: str) -> Bound:
        """Validate against ``param`` and resolve; raises `ConstraintError`, changes nothing."""
        if not torch.is_floating_point(param):
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} needs a floating-point parameter"
            )
        return self._bind(param, name)

    def _bind(self, param: torch.Tensor, name: str) -> Bound:
        raise NotImplementedError

    def __and__(self, other: Constraint) -> Constraint:
        from .composite import Intersection

        return Intersection(self, other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Bound:
    """One constraint resolved for one parameter."""

    #: whether `project_grad_` does anything (False: the set is enforced by projection alone)
    projects_grad: ClassVar[bool] = False

    def __init__(self, constraint: Constraint, name: str, param: torch.Tensor):
        self.constraint = constraint
        self.name = name
        self.shape = tuple(param.shape)

    # -- the set -------------------------------------------------------------------------------
    def project_(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def gap(self, x: torch.Tensor) -> torch.Tensor:
        """``x - P(x)``; its norm is the distance from ``x`` to the set for exact projections."""
        y = x.clone()
        self.project_(y)
        return x - y

    def gap_entries(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The entries of ``gap(x)`` that can be non-zero, in any shape; the audit reads only their
        norm and largest magnitude, so a family whose off-set entries are few (`Fixed`) returns
        just those. ``out`` (shaped like ``x``) may be used for the result, so a reused buffer
        saves an allocation. Overriding `gap` or this tells the audit the family has a direct
        form; otherwise it measures the change the projection makes."""
        if out is None or type(self).gap is not Bound.gap:
            return self.gap(x)
        out.copy_(x)
        self.project_(out)
        return torch.sub(x, out, out=out)

    # -- gradients and optimizer state -----------------------------------------------------------
    def project_grad_(self, g: torch.Tensor, x: torch.Tensor) -> None:
        """Tangent-space projection; a no-op for sets enforced by projection alone."""

    def grad_gap_entries(self, g: torch.Tensor, x: torch.Tensor, out=None) -> torch.Tensor:
        """The entries of ``g - project_grad_(g)`` that can be non-zero, without changing ``g``
        (``out`` as in `gap_entries`).

        Only families with a direct form override this; by default the audit measures the
        change `project_grad_` makes."""
        raise NotImplementedError

    def project_moment_(self, m: torch.Tensor, x: torch.Tensor) -> None:
        self.project_grad_(m, x)

    def project_scale_(self, v: torch.Tensor) -> None:
        """Non-negative second-moment state; left as it is unless the set says otherwise."""

    def project_point_(self, x: torch.Tensor) -> None:
        self.project_(x)

    # -- many parameters at once ----------------------------------------------------------------------
    # The step calls these once per group of same-type bounds on one device and dtype. The
    # defaults loop; a family whose maths is element-wise overrides them with ``torch._foreach_*``
    # (tested to agree with the loop).
    @classmethod
    def project_all_(cls, bounds: list[Bound], xs: list[torch.Tensor]) -> None:
        for b, x in zip(bounds, xs):
            b.project_(x)

    @classmethod
    def project_grad_all_(cls, bounds: list[Bound], gs: list[torch.Tensor], xs) -> None:
        for b, g, x in zip(bounds, gs, xs):
            b.project_grad_(g, x)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The constraint's own data for this parameter (masks, bases, values), for checkpoints."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        mine = self.state_tensors()
        if set(mine) != set(tensors):
            raise ConstraintError(
                f"{self.name}: checkpoint holds {sorted(tensors)} for {self.constraint!r}, "
                f"expected {sorted(mine)}"
            )
        for key, value in tensors.items():
            if value.shape != mine[key].shape:
                raise ConstraintError(
                    f"{self.name}: checkpoint's {key} has shape {tuple(value.shape)}, "
                    f"expected {tuple(mine[key].shape)}"
                )
        with torch.no_grad():
            for key, value in tensors.items():
                mine[key].copy_(value)

    def __repr__(self) -> str:
        return f"{self.constraint!r} on {self.name}"


def normalize_dims(dims, ndim: int, name: str, param, what: str) -> tuple[int, ...]:
    """Dims as non-negative ints, checked against ``ndim``; raises `ConstraintError`."""
    if dims is None:
        return ()
    if isinstance(dims, int):
        dims = (dims,)
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ConstraintError(
                f"{describe(name, param)}: {what} dim {d} is out of range for {ndim} dims"
            )
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ConstraintError(f"{describe(name, param)}: {what} dims {tuple(dims)} repeat")
    return tuple(out)


def trailing_or_full(shape: tuple[int, ...], pattern: tuple[int, ...]) -> int:
    """How many leading dims a pattern of shape ``pattern`` repeats over, or -1 if it doesn't fit."""
    k = len(pattern)
    if k <= len(shape) and tuple(shape[len(shape) - k :]) == tuple(pattern):
        return len(shape) - k
    return -1
