"""What every constraint is: a user-facing spec (`Constraint`) and its per-parameter form (`Bound`).

A `Constraint` describes a set (``Mask(mask)``, ``MaxNorm(3.0)``); it can be attached to many
parameters at once. `Constraint.bind` (``bind(param, name, owner)``) validates it against one parameter and
resolves everything the step needs (masks, index tensors, orthonormal bases) into a `Bound`, so the
step path does arithmetic only.

Adding a family
---------------
A family is a `Constraint` subclass with ``_bind`` and a `Bound` subclass. The bound states what it
is once, at bind time, as `Traits` (data, never inferred from which methods a class overrides); the
engine, the audit, intersection planning and sharded training dispatch on those traits alone.
`Bound.__init__` checks that the traits and the methods agree (a bound that says it projects
gradients must implement ``project_grad_``, one that has a cheap gap must implement
``gap_entries``), so a family cannot be half-declared. A bound that states nothing gets the
default `Traits()`: a set that is neither linear nor convex, couples every entry and projects no
gradient, so nothing is assumed of it and it is enforced by the projection after each step.

A `Bound` works in place on tensors shaped like its parameter, always under ``torch.no_grad()``:

- ``project_(x)``: move ``x`` onto the set (the nearest point). **Written back once**: compute the
  result, then store it with a single in-place op, so an exception or Ctrl-C mid-projection leaves
  ``x`` either as it was or projected, never half-written;
- ``project_grad_(g, x)``: move a gradient onto the tangent space of the set at ``x`` (only where
  ``traits.projects_grad``; exact for linear sets);
- ``project_moment_(m, x)``: the same for first-moment optimizer state (momentum, ``exp_avg``);
- ``project_scale_(v)``: keep non-negative second-moment state (``exp_avg_sq``) consistent with
  the set without breaking its sign: zero on held entries, averaged within tied groups;
- ``project_point_(x)``: optimizer state that is itself a point (ASGD's average ``ax``);
- ``repair_(t)``: zero the entries the set holds at zero in any tensor shaped like the parameter,
  whatever they hold (NaN and inf too: a multiply by a 0/1 mask leaves ``inf * 0 = NaN``);
- ``gap(x)``: ``x - P(x)`` as a new tensor; ``gap_entries`` a cheaper form (``traits.cheap_gap``):
  the entries that can be non-zero, or the gap's norm and largest magnitude as a `GapSize` where
  the family knows them without forming the gap (an L2 ball's from its units' norms);
- ``project_measured_(x)``: ``project_(x)`` returning the gap it closed
  (``traits.measured_projection``), so an audited step needs no pass of its own for the drift;
- ``residual(x)``: what is left off the set at a projected ``x`` (a tensor whose norm is the
  distance): ``gap(x)`` unless the family measures it otherwise (an intersection reports its
  distance to every member set, so an empty intersection shows);
- ``partition(like)``: the set as held and (sign-)tied entries, if it is one (intersections of
  such sets are joined exactly); None otherwise;
- ``held_zeros()``: the entries the set holds at exactly 0 where ``project_grad_`` leaves exactly 0
  too, as `HeldZeros` (a free-entry mask or an index), or None (the default: none known). The
  engine keeps CPU second-moment state positive there (``constrained_optim.filler``);
- ``state_tensors()`` / ``check_state(tensors)`` / ``with_state(tensors)``: the bound's own data
  for checkpoints, validated (``(ok, reason)``) before a new bound is built from it; a bound is
  never changed in place by a load.

Half-precision parameters (``bfloat16``, ``float16``) are bound and projected in ``float32`` and
written back rounded once (``LowPrecisionBound``), for every family alike: tied entries round to the
same value and held entries to exactly their value.
"""

from __future__ import annotations

import copy
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..errors import ConstraintError, describe

#: tensor data a constraint's constructor takes: a tensor, or nested lists of numbers
#: (``torch.as_tensor`` converts them)
TensorLike = torch.Tensor | Sequence[Any]
#: one dim or several
Dims = int | Sequence[int]


@dataclass(frozen=True)
class Traits:
    """What a bound's set is, for everything that dispatches on it.

    - ``linear``: a linear or affine set: ``P`` is an affine orthogonal projection, the tangent
      projection is exact, and an element-wise optimizer's update of a point stays in the set.
    - ``convex``: a convex set (projections are non-expansive; Dykstra's algorithm applies).
    - ``projects_grad``: ``project_grad_`` changes gradients (the tangent projection); False: the
      set is enforced by the projection after the step alone.
    - ``exact``: ``project_`` lands in the set bitwise (held entries exactly their value, tied
      entries bitwise equal), not just to rounding.
    - ``reduces``: the dims one unit of the projection spans: ``()`` element-wise (each entry on
      its own), ``(1, 2, 3)`` one unit per index of dim 0 (`MaxNorm` on a conv weight), None: the
      projection couples entries anywhere in the tensor (a whole-tensor ball, `Orthogonal`,
      `Symmetric`, `Tied`, `Subspace`).
    - ``via_norms``: the entries of a unit are coupled only through the unit's norm (L2 balls and
      spheres), so a unit split across shards needs only an all-reduce of partial sums.
    - ``cheap_gap`` / ``cheap_grad_gap``: ``gap_entries`` / ``grad_gap_entries`` read fewer
      entries than a projection does (the audit measures with them).
    - ``measured_projection``: ``project_measured_`` projects exactly as ``project_`` does and
      returns the gap it closed from what the projection computes anyway (an L2 ball's unit
      norms, an N:M pattern), so an audited step measures the drift in the projection's pass.
    """

    linear: bool = False
    convex: bool = False
    projects_grad: bool = False
    exact: bool = False
    reduces: tuple[int, ...] | None = None
    via_norms: bool = False
    cheap_gap: bool = False
    cheap_grad_gap: bool = False
    measured_projection: bool = False

    @property
    def elementwise(self) -> bool:
        """Whether each entry is projected on its own (a product of per-entry sets)."""
        return self.reduces == ()


class GapSize(NamedTuple):
    """``(||x - P(x)||, max |x - P(x)|)`` as 0-d tensors, measured without forming the gap."""

    norm: torch.Tensor
    max: torch.Tensor


def distance(residual: torch.Tensor) -> torch.Tensor:
    """The distance a `Bound.residual` tensor stands for (its norm), as a 0-d float tensor."""
    low = residual.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(residual, dtype=torch.float32 if low else None)


@dataclass(frozen=True)
class Partition:
    """A set ``{x : x_i = w_i c_group(i)}`` over the flattened parameter, with ``w_i`` in {-1, 0, 1};
    entries with ``w_i = 0`` are held at ``held_value[i]``. Mask, Fixed, Tied, Symmetric and
    signed-permutation `Invariant` sets are of this form; ``composite.join_partitions`` intersects
    them exactly."""

    group: torch.Tensor  # int64, one group id per entry
    weight: torch.Tensor  # float64 in {-1, 0, 1}
    held_value: torch.Tensor  # float64


class HeldZeros:
    """Entries of a parameter a set holds at exactly 0, whose projected gradient is exactly 0 too:
    ``free``, a bool tensor broadcastable to the parameter (False on held entries; a `Mask`'s own
    bytes, not a copy), or ``index``, an index expression of the held entries (a strided store for
    ``Fixed((..., 1, 1), 0.0)``). Exactly one of the two is given."""

    __slots__ = ("free", "index")

    def __init__(self, free: torch.Tensor | None = None, index: tuple | None = None):
        if (free is None) == (index is None):
            raise ValueError("HeldZeros takes free or index, not both")
        self.free = free
        self.index = index

    def put_(self, t: torch.Tensor, value: float) -> None:
        """``t[held] = value`` in place, one pass."""
        if self.free is not None:
            torch.where(self.free, t, torch.tensor(value, dtype=t.dtype), out=t)
        else:
            t[self.index] = value

    def zeroed(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` with 0 on the held entries."""
        if self.free is not None:
            return torch.where(self.free, t, torch.zeros((), dtype=t.dtype))
        out = t.clone()
        out[self.index] = 0
        return out

    def all_zero(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is exactly 0 on every held entry (NaN is not)."""
        if self.free is not None:
            return not bool(torch.where(self.free, torch.zeros((), dtype=t.dtype), t).any())
        return not bool(t[self.index].any())

    def free_mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The free entries as a new bool tensor of ``shape`` (CPU)."""
        if self.free is not None:
            return self.free.expand(shape).clone()
        out = torch.ones(shape, dtype=torch.bool)
        out[self.index] = False
        return out


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
    """  # noqa: E501 - a doctest's expected error message is one line

    #: True for linear and affine sets (gradient projection exact).
    linear: bool = False
    #: whether the family's ``_bind`` takes ``owner`` (set per subclass)
    _bind_takes_owner: ClassVar[bool] = True

    def bind(self, param: torch.Tensor, name: str, owner: nn.Module | None = None) -> Bound:
        """Validate against ``param`` and resolve; raises `ConstraintError`, changes nothing.

        ``owner`` is the module holding the parameter, when known: families whose default
        dims follow the layer's layout (`MaxNorm`'s output unit, `NMSparsity`'s input dim) read
        it (`constrained_optim.constraints.layout`)."""
        if not torch.is_floating_point(param):
            raise ConstraintError(f"{describe(name, param)}: {self!r} needs a floating-point parameter")
        if param.dtype in LOW_PRECISION:
            # resolve against a float32 copy (masks chosen by magnitude see the same values)
            proxy = param.detach().to(torch.float32)
            try:
                inner = self._resolve(proxy, name, owner)
            except ConstraintError as err:
                raise ConstraintError(
                    str(err).replace(describe(name, proxy), describe(name, param))
                ) from None
            return LowPrecisionBound(inner, param)
        return self._resolve(param, name, owner)

    def _resolve(self, param, name, owner) -> Bound:
        # a family written as ``_bind(self, param, name)`` (before owners existed) still binds
        if self._bind_takes_owner:
            return self._bind(param, name, owner)
        return self._bind(param, name)  # type: ignore[call-arg]  # a family's two-argument _bind

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._bind_takes_owner = len(inspect.signature(cls._bind).parameters) >= 4

    def _bind(self, param: torch.Tensor, name: str, owner) -> Bound:
        raise NotImplementedError

    def __and__(self, other: Constraint) -> Constraint:
        from .composite import Intersection

        return Intersection(self, other)

    def same_as(self, other: object) -> bool:
        """Of one type with equal arguments (tensors compared by value, callables by identity):
        attaching a constraint the same as one already attached changes nothing."""
        return type(other) is type(self) and _same(vars(self), vars(other))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an argument without a usable ==: compare identity
        return a is b


class Bound(ABC):
    """One constraint resolved for one parameter; see the module docstring for the protocol."""

    #: state keys whose entries may be +-inf (a `Box` bound entry that is no bound); NaN never is
    infinite_ok: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, constraint: Constraint, name: str, param: torch.Tensor, traits: Traits = Traits()):
        self.constraint = constraint
        self.name = name
        self.shape = tuple(param.shape)
        self.traits = traits
        kind = type(self)
        for flag, method in (
            ("projects_grad", "project_grad_"),
            ("cheap_gap", "gap_entries"),
            ("cheap_grad_gap", "grad_gap_entries"),
            ("measured_projection", "project_measured_"),
        ):
            if getattr(traits, flag) and getattr(kind, method) is getattr(Bound, method):
                raise TypeError(f"{kind.__name__} declares {flag} but does not implement {method}")

    @property
    def linear(self) -> bool:
        return self.traits.linear

    # -- the set -------------------------------------------------------------------------------
    @abstractmethod
    def project_(self, x: torch.Tensor) -> None:
        """``x <- P(x)`` in place, written back once."""

    def project_measured_(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | GapSize:
        """``project_(x)``, bit for bit, returning the gap it closed (``x - P(x)`` of the ``x``
        it was given) as `gap_entries` does: the entries that can be non-zero (``out``, shaped like
        ``x``, may hold them) or their `GapSize` (only where ``traits.measured_projection``)."""
        raise NotImplementedError

    def gap(self, x: torch.Tensor) -> torch.Tensor:
        """``x - P(x)``; its norm is the distance from ``x`` to the set for exact projections."""
        y = x.clone()
        self.project_(y)
        return x - y

    def gap_entries(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | GapSize:
        """The entries of ``gap(x)`` that can be non-zero, in any shape, or directly their
        `GapSize` (only where ``traits.cheap_gap``); the audit reads their norm and largest
        magnitude. ``out`` (shaped like ``x``) may hold the result, so a reused buffer saves an
        allocation."""
        raise NotImplementedError

    def residual(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """What is left off the set at a projected ``x``: a tensor whose norm is the residual the
        audit reports (``gap`` in its cheapest form, unless the family measures it otherwise)."""
        if self.traits.cheap_gap:
            entries = self.gap_entries(x, out)
            return entries.norm.reshape(1) if isinstance(entries, GapSize) else entries
        return self.gap(x)

    # -- gradients and optimizer state -----------------------------------------------------------
    def project_grad_(self, g: torch.Tensor, x: torch.Tensor) -> None:
        """Tangent-space projection (only where ``traits.projects_grad``)."""

    def grad_gap_entries(self, g: torch.Tensor, x: torch.Tensor, out=None) -> torch.Tensor:
        """The entries of ``g - P_T(g)`` that can be non-zero, without changing ``g`` (only where
        ``traits.cheap_grad_gap``)."""
        raise NotImplementedError

    def project_moment_(self, m: torch.Tensor, x: torch.Tensor) -> None:
        self.project_grad_(m, x)

    def project_scale_(self, v: torch.Tensor) -> None:
        """Non-negative second-moment state; left as it is unless the set says otherwise."""

    def project_point_(self, x: torch.Tensor) -> None:
        self.project_(x)

    def repair_(self, t: torch.Tensor) -> None:
        """Zero the entries held at zero, whatever ``t`` holds there; a no-op for sets that hold
        no entries at zero."""

    # -- what the set is ---------------------------------------------------------------------------
    def partition(self, like: torch.Tensor) -> Partition | None:
        """The set as held and (sign-)tied entries over ``like``'s flattened shape, or None."""
        return None

    def held_zeros(self) -> HeldZeros | None:
        """The entries held at exactly 0 whose projected gradient (``project_grad_``) is exactly
        0 as well, or None if there are none (or the family does not say). Called once per bound,
        at attach; a family that holds entries at 0 overrides it."""
        return None

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
        """The constraint's own data for this parameter (masks, bases, values), for checkpoints.
        The keys are attribute names of the bound (`with_state` sets them)."""
        return {}

    def check_state(self, tensors) -> tuple[bool, str]:
        """Whether ``tensors`` can be this bound's data: the same keys, each a tensor of the same
        shape and dtype, finite, and with values the family allows (`check_values`)."""
        mine = self.state_tensors()
        if not isinstance(tensors, dict):
            return False, f"data must be a dict of tensors, got {type(tensors).__name__}"
        if set(mine) != set(tensors):
            return False, f"data {sorted(tensors)}, expected {sorted(mine)}"
        for key, value in tensors.items():
            here = mine[key]
            if not isinstance(value, torch.Tensor):
                return False, f"{key} is a {type(value).__name__}, expected a tensor"
            if tuple(value.shape) != tuple(here.shape):
                return False, f"{key} of shape {tuple(value.shape)}, expected {tuple(here.shape)}"
            if value.dtype != here.dtype:
                return False, f"{key} of dtype {value.dtype}, expected {here.dtype}"
            if value.is_floating_point():
                bad = value.isnan() if key in self.infinite_ok else ~value.isfinite()
                if bool(bad.any()):
                    return False, f"{key} has non-finite values"
        return self.check_values({k: v.to(mine[k].device) for k, v in tensors.items()})

    def check_values(self, tensors: dict[str, torch.Tensor]) -> tuple[bool, str]:
        """Family-specific checks of checkpoint data already of the right keys, shapes and
        dtypes (0/1 masks, labels in range, an orthonormal basis)."""
        return True, ""

    def with_state(self, tensors: dict[str, torch.Tensor]) -> Bound:
        """A new bound holding copies of ``tensors`` (checked by `check_state` first); ``self``
        is not changed."""
        ok, reason = self.check_state(tensors)
        if not ok:
            raise ConstraintError(f"{self.name}: {self.constraint!r}: {reason}")
        new = copy.copy(self)
        mine = self.state_tensors()
        new._adopt({k: v.detach().to(mine[k].device).clone() for k, v in tensors.items()})
        return new

    def _adopt(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take checked data (on this bound's copy): set each attribute, then what follows from
        them (a family with derived data overrides this and calls it)."""
        for key, value in tensors.items():
            setattr(self, key, value)

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
        if isinstance(d, bool) or not isinstance(d, int):
            raise ConstraintError(f"{describe(name, param)}: {what} dims must be ints, got {dims!r}")
        if not -ndim <= d < ndim:
            raise ConstraintError(f"{describe(name, param)}: {what} dim {d} is out of range for {ndim} dims")
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


def finite_or_raise(value, who: str, what: str) -> None:
    """Raise `ConstraintError` if a number or tensor given to a constructor is not finite."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise ConstraintError(f"{who}: {what} has non-finite entries (NaN or inf)")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConstraintError(f"{who}: {what} is not finite, got {value!r}")


LOW_PRECISION = (torch.bfloat16, torch.float16)


class LowPrecisionBound(Bound):
    """A bound resolved in float32 for a half-precision parameter: every tensor is projected in
    float32 and written back, rounded once."""

    def __init__(self, inner: Bound, param: torch.Tensor):
        super().__init__(inner.constraint, inner.name, param, inner.traits)
        self.inner = inner

    def project_(self, x):
        y = x.float()
        self.inner.project_(y)
        x.copy_(y)

    def gap(self, x):
        return self.inner.gap(x.float())

    def gap_entries(self, x, out=None):
        return self.inner.gap_entries(x.float())

    def project_measured_(self, x, out=None):
        y = x.float()
        gap = self.inner.project_measured_(y)
        x.copy_(y)
        return gap

    def residual(self, x, out=None):
        return self.inner.residual(x.float())

    def project_grad_(self, g, x):
        y = g.float()
        self.inner.project_grad_(y, x.float())
        g.copy_(y)

    def grad_gap_entries(self, g, x, out=None):
        return self.inner.grad_gap_entries(g.float(), x.float())

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

    def repair_(self, t):
        y = t.float()
        self.inner.repair_(y)
        t.copy_(y)

    def partition(self, like):
        return self.inner.partition(like)

    def held_zeros(self):
        return self.inner.held_zeros()

    def state_tensors(self):
        return self.inner.state_tensors()

    def check_state(self, tensors):
        return self.inner.check_state(tensors)

    def with_state(self, tensors):
        new = copy.copy(self)
        new.inner = self.inner.with_state(tensors)
        return new

    @classmethod
    def project_all_(cls, bounds, xs):
        by_kind: dict[type[Bound], tuple[list, list]] = {}
        for b, x in zip(bounds, xs):
            inner, ys = by_kind.setdefault(type(b.inner), ([], []))
            inner.append(b.inner)
            ys.append(x)
        for kind, (inner, group) in by_kind.items():
            ys = [x.float() for x in group]
            kind.project_all_(inner, ys)
            torch._foreach_copy_(group, ys)
