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
  (``gap_entries``/``grad_gap_entries``: cheaper forms the audit uses where a family has them);
- ``residual(x)``: what is left off the set at ``x`` (a tensor whose norm is the distance), measured
  after projection: ``gap(x)`` unless the projection is approximate (an intersection reports its
  distance to every member set, so an empty intersection shows).

Half-precision parameters (``bfloat16``, ``float16``) are bound and projected in ``float32`` and
written back rounded once (`LowPrecisionBound`), for every family alike: tied entries round to
the same value and held entries to exactly their value.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import ConstraintError, describe


class Constraint:
    """A set of allowed values for a parameter. Subclasses implement `_bind`.

    A constraint is a description, reusable across parameters; ``bind(param, name)`` checks it
    against one parameter and resolves it into a `Bound` (what the step uses). ``a & b`` is the
    intersection of two sets.

    >>> import torch, constrained_optim as co
    >>> both = co.Mask(torch.tensor([True, True, False])) & co.Box(-1.0, 1.0)
    >>> w = torch.nn.Parameter(torch.tensor([3.0, -0.5, 2.0]))
    >>> with torch.no_grad():
    ...     both.bind(w, "w").project_(w)
    >>> w.data
    tensor([ 1.0000, -0.5000,  0.0000])
    >>> co.Symmetric().bind(torch.nn.Parameter(torch.zeros(2, 3)), "w")
    Traceback (most recent call last):
    ...
    constrained_optim.errors.ConstraintError: w (shape (2, 3), torch.float32): Symmetric swaps dims (0, 1), which need equal sizes (got 2 and 3)
    """

    #: True for linear and affine sets: the gradient projection is exact and the optimizer's
    #: update of a point of the set stays in the set (for element-wise optimizers).
    linear: ClassVar[bool] = False

    def bind(self, param: torch.Tensor, name: str) -> Bound:
        """Validate against ``param`` and resolve; raises `ConstraintError`, changes nothing."""
        if not torch.is_floating_point(param):
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} needs a floating-point parameter"
            )
        if param.dtype in LOW_PRECISION:
            # resolve against a float32 copy (masks chosen by magnitude see the same values)
            proxy = param.detach().to(torch.float32)
            try:
                inner = self._bind(proxy, name)
            except ConstraintError as err:
                raise ConstraintError(
                    str(err).replace(describe(name, proxy), describe(name, param))
                ) from None
            return LowPrecisionBound.wrap(inner, param)
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
    #: the set is a product of per-entry intervals (held entries, boxes): projections onto such
    #: sets compose exactly, in any order, into the projection onto their intersection
    coordinatewise: ClassVar[bool] = False

    def __init__(self, constraint: Constraint, name: str, param: torch.Tensor):
        self.constraint = constraint
        self.name = name
        self.shape = tuple(param.shape)

    @property
    def linear(self) -> bool:
        """The set is linear or affine: ``P`` is an affine map and the tangent projection exact."""
        return self.constraint.linear

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
        saves an allocation. Overriding this tells the audit the family has a form cheaper than
        projecting; otherwise it measures the drift as the change the projection makes."""
        if out is None or type(self).gap is not Bound.gap:
            return self.gap(x)
        out.copy_(x)
        self.project_(out)
        return torch.sub(x, out, out=out)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """What is left off the set at a projected ``x``: its norm is the residual the audit
        reports. ``gap(x)``, unless the projection is approximate."""
        return self.gap(x)

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


LOW_PRECISION = (torch.bfloat16, torch.float16)


class LowPrecisionBound(Bound):
    """A bound resolved in float32 for a half-precision parameter: every tensor is projected in
    float32 and written back, rounded once."""

    def __init__(self, inner: Bound, param: torch.Tensor):
        super().__init__(inner.constraint, inner.name, param)
        self.inner = inner

    @staticmethod
    def wrap(inner: Bound, param: torch.Tensor) -> LowPrecisionBound:
        kind = LowPrecisionGradBound if inner.projects_grad else LowPrecisionBound
        return kind(inner, param)

    @property
    def linear(self) -> bool:
        return self.inner.linear

    def project_(self, x):
        y = x.float()
        self.inner.project_(y)
        x.copy_(y)

    def gap(self, x):
        return self.inner.gap(x.float())

    def residual(self, x):
        return self.inner.residual(x.float())

    def project_grad_(self, g, x):
        y = g.float()
        self.inner.project_grad_(y, x.float())
        g.copy_(y)

    def project_moment_(self, m, x):
        y = m.float()
        self.inner.project_moment_(y, x.float())
        m.copy_(y)

    def project_scale_(self, v):
        y = v.float()
        self.inner.project_scale_(y)
        v.copy_(y)

    def project_point_(self, x):
        y = x.float()
        self.inner.project_point_(y)
        x.copy_(y)

    def state_tensors(self):
        return self.inner.state_tensors()

    def load_state_tensors(self, tensors):
        self.inner.load_state_tensors(tensors)

    @classmethod
    def project_all_(cls, bounds, xs):
        by_kind: dict[type, tuple[list, list]] = {}
        for b, x in zip(bounds, xs):
            inner, ys = by_kind.setdefault(type(b.inner), ([], []))
            inner.append(b.inner)
            ys.append(x)
        for kind, (inner, group) in by_kind.items():
            ys = [x.float() for x in group]
            kind.project_all_(inner, ys)
            torch._foreach_copy_(group, ys)


class LowPrecisionGradBound(LowPrecisionBound):
    projects_grad = True
