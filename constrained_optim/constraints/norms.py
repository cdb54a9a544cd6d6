"""Norm sets: `NormBall` (p in {1, 2, inf}), `MaxNorm`, `UnitNorm` and `Simplex`.

Each is either one set for the whole tensor or, given ``dim``, one set per index of the other
dims ("per unit"). Per-unit L2 sets are a `torch.linalg.vector_norm` with ``keepdim`` and one
in-place scaling; the L1 ball and the simplex use the exact sort-based projection (Held, Wolfe
and Crowder 1974; Duchi et al. 2008), batched over units: no Python loop runs in the step.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConstraintError, describe
from .base import Bound, Constraint, Dims, GapSize, Traits, normalize_dims
from .coordinate import BoxBound
from .layout import output_dim


# -- pure maths ---------------------------------------------------------------------------------
def l2_ball_project_(x: torch.Tensor, radius: float, dims, out: torch.Tensor | None = None) -> None:
    """Project onto ``{x : ||x||_2 <= r}`` (per index of the dims not in ``dims``; ``dims=None``:
    the whole tensor): ``x <- x * min(1, r / ||x||)``, or into ``out`` (one write). Points inside
    are left bitwise as they are."""
    norm = torch.linalg.vector_norm(x, 2, dim=dims, keepdim=True)
    torch.mul(x, norm.reciprocal_().mul_(radius).clamp_max_(1.0), out=x if out is None else out)


def l2_ball_gap_size(x: torch.Tensor, radius: float, dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(||x - P(x)||, max |x - P(x)|, per-unit distances)`` for the ball of `l2_ball_project_`,
    from the units' norms, without forming the gap."""
    return _ball_gap(x, torch.linalg.vector_norm(x, 2, dim=dims, keepdim=True), radius, dims)


def _ball_gap(x, norm, radius: float, dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # a unit at norm n > r is off by x_u (1 - r / n): of norm n - r, largest entry max|x_u| (1 - r / n).
    # The largest entries are read (one more pass) only for units outside, none on a CPU when every
    # unit is inside (reading that costs no device sync there)
    over = (norm - radius).clamp_min_(0.0)
    total = torch.linalg.vector_norm(over)
    if over.numel() == 0 or (x.device.type == "cpu" and not bool(over.any())):
        return total, total.new_zeros(()).to(x.dtype), over
    shrink = (over / norm).nan_to_num_(nan=0.0)  # 1 - r / n outside; 0 inside (and for n = 0)
    largest = torch.linalg.vector_norm(x, math.inf, dim=dims, keepdim=True)
    return total, (largest * shrink).max(), over


def unit_sphere_project_(x: torch.Tensor, dims) -> None:
    """Project onto ``{x : ||x||_2 = 1}`` per unit: ``x <- x / ||x||``, written back once. Every
    point of the sphere is nearest to 0, so a zero unit gets the one with equal entries,
    ``1 / sqrt(k)`` each."""
    norm = torch.linalg.vector_norm(x, 2, dim=dims, keepdim=True)
    zero = norm == 0
    k = x.numel() // max(norm.numel(), 1)
    y = torch.div(x, norm.masked_fill_(zero, 1.0))
    x.copy_(y.add_(zero.to(x.dtype), alpha=1.0 / math.sqrt(k) if k else 0.0))


def simplex_rows(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row of ``v`` (``(rows, k)``) projected onto ``{w : w >= 0, sum(w) = r}``.

    ``w = max(v - theta, 0)`` with ``theta = (sum_{i <= rho} u_i - r) / rho``, ``u`` the row sorted
    in decreasing order and ``rho`` the largest ``j`` with ``u_j > (sum_{i <= j} u_i - r) / j``.
    The running sums are taken in float64 so ``sum(w) = r`` to the working precision.
    """
    u = v.sort(dim=1, descending=True).values
    excess = u.cumsum(1, dtype=torch.float64).sub_(radius)
    ranks = torch.arange(1, v.shape[1] + 1, dtype=torch.float64, device=v.device)
    rho = (excess < u * ranks).sum(1, keepdim=True)  # the condition holds on a prefix, rho >= 1
    theta = excess.gather(1, rho - 1).div_(rho)
    return (v - theta.to(v.dtype)).clamp_min_(0)


def l1_ball_rows(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row of ``v`` projected onto ``{w : ||w||_1 <= r}``: rows inside are kept; the others
    are ``sign(v) * simplex(|v|)``."""
    a = v.abs()
    inside = a.sum(1, keepdim=True) <= radius
    return torch.where(inside, v, simplex_rows(a, radius).copysign_(v))


def as_rows(x: torch.Tensor, dims) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` as ``(units, k)`` with the reduced ``dims`` last (a view where the layout allows),
    and the permutation that puts them there. ``dims=None``: one row."""
    if dims is None:
        return x.reshape(1, -1), tuple(range(x.dim()))
    perm = tuple(d for d in range(x.dim()) if d not in dims) + tuple(dims)
    k = math.prod(x.shape[d] for d in dims)
    return x.permute(perm).reshape(-1, k), perm


def rows_project_(x: torch.Tensor, dims, rows_fn) -> None:
    """Apply a row-wise projection ``rows_fn`` to the units of ``x`` in place, written back once
    (an empty ``x`` is its own projection)."""
    if x.numel() == 0:
        return
    rows, perm = as_rows(x, dims)
    out = rows_fn(rows)
    x.permute(perm).copy_(out.view([x.shape[d] for d in perm]))


# -- constraints -----------------------------------------------------------------------------------
def _radius(value, who, what="radius") -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise ConstraintError(f"{who}: {what} must be a positive number, got {value!r}") from None
    if not r > 0 or math.isinf(r):
        raise ConstraintError(f"{who}: {what} must be a positive finite number, got {value!r}")
    return r


def _dims(dim, param, name, who):
    if dim is None:
        return None
    dims = normalize_dims(dim, param.dim(), name, param, who)
    return tuple(sorted(dims)) if dims else None


def _unit_dims(dim, param, name, who, owner):
    """``dim=None``: every dim but the owner's output dim (each output unit, `layout`); a 0-d or
    1-D parameter is one unit."""
    if dim is None:
        if param.dim() < 2:
            return None
        out = output_dim(owner, param) % param.dim()
        return tuple(d for d in range(param.dim()) if d != out)
    return _dims(dim, param, name, who)


class NormBall(Constraint):
    """``{W : ||W||_p <= radius}`` for ``p`` in {1, 2, inf}.

    ``dim=None`` is one ball for the whole tensor; ``dim`` (an int or a tuple) takes the norm over
    those dims, one ball for each index of the others. The projections are exact: a scaling for
    ``p=2``, a clamp for ``p=inf``, the sort-based soft threshold for ``p=1``.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
    >>> with torch.no_grad():
    ...     co.NormBall(1.0, dim=1).bind(w, "w").project_(w)
    >>> w.data
    tensor([[0.6000, 0.8000],
            [0.3000, 0.4000]])
    >>> with torch.no_grad():
    ...     co.NormBall(0.5, p=1).bind(w, "w").project_(w)
    >>> w.data
    tensor([[0.1500, 0.3500],
            [0.0000, 0.0000]])
    """

    def __init__(self, radius: float, p: float | str = 2, dim: Dims | None = None) -> None:
        if p not in (1, 2, math.inf, "inf", "fro"):
            raise ConstraintError(f"NormBall: p must be 1, 2 or inf, got {p!r}")
        self.p = {"inf": math.inf, "fro": 2}.get(p, p)  # type: ignore[arg-type]
        self.radius = _radius(radius, f"NormBall(p={self.p})")
        self.dim = dim

    def _bind(self, param, name, owner):
        dims = _dims(self.dim, param, name, repr(self))
        if self.p == math.inf:  # every entry within [-r, r]: a box
            return BoxBound(self, name, param, -self.radius, self.radius)
        if self.p == 2:
            return L2BallBound(self, name, param, dims, self.radius)
        return RowwiseBound(self, name, param, dims, self.radius, l1_ball_rows)

    def __repr__(self):
        p = "inf" if self.p == math.inf else self.p
        dim = f", dim={self.dim}" if self.dim is not None else ""
        return f"NormBall({self.radius:g}, p={p}{dim})"


class MaxNorm(Constraint):
    """Each output unit's L2 norm at most ``max_value``: ``{W : ||W[i]||_2 <= c for every i}``.

    As Keras' ``MaxNorm``: by default (``dim=None``) the norm runs over every dim but the owning
    layer's output dim (`layout`): 0 for ``nn.Linear``, ``nn.Conv*`` and unknown modules, 1 for
    ``nn.ConvTranspose*``, the last for layers stored ``(in, out)`` such as transformers'
    ``Conv1D``; a 1-D parameter is a single unit. ``dim`` names the dims the norm runs over
    instead. The projection scales units that are too long down to ``max_value`` exactly and
    leaves the others as they are.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([[6.0, 8.0], [0.6, 0.8]]))
    >>> with torch.no_grad():
    ...     co.MaxNorm(2.0).bind(w, "w").project_(w)
    >>> w.data
    tensor([[1.2000, 1.6000],
            [0.6000, 0.8000]])
    """

    def __init__(self, max_value: float, dim: Dims | None = None) -> None:
        self.max_value = _radius(max_value, "MaxNorm", "max_value")
        self.dim = dim

    def _bind(self, param, name, owner):
        dims = _unit_dims(self.dim, param, name, repr(self), owner)
        return L2BallBound(self, name, param, dims, self.max_value)

    def __repr__(self):
        dim = f", dim={self.dim}" if self.dim is not None else ""
        return f"MaxNorm({self.max_value:g}{dim})"


class UnitNorm(Constraint):
    """Each output unit has L2 norm exactly 1: ``{W : ||W[i]||_2 = 1 for every i}``.

    Units as in `MaxNorm` (``dim=None``: every dim but the owner's output dim). The projection
    divides each unit by its norm; a unit that is all zeros (every point of the sphere is equally
    near) becomes the unit vector with equal entries, ``1 / sqrt(k)`` each, never NaN. Not convex.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    >>> with torch.no_grad():
    ...     co.UnitNorm().bind(w, "w").project_(w)
    >>> w.data
    tensor([[0.6000, 0.8000],
            [0.7071, 0.7071]])
    """

    def __init__(self, dim: Dims | None = None) -> None:
        self.dim = dim

    def _bind(self, param, name, owner):
        if param.numel() == 0:  # the unit sphere of an empty vector is empty
            raise ConstraintError(f"{describe(name, param)}: {self!r} needs a non-empty parameter")
        return UnitNormBound(self, name, param, _unit_dims(self.dim, param, name, repr(self), owner))

    def __repr__(self):
        return f"UnitNorm(dim={self.dim})" if self.dim is not None else "UnitNorm()"


class Simplex(Constraint):
    """``{W : W >= 0, sum over dim = radius}``, for each index of the other dims.

    The projection is exact (sort-based). With ``radius=1`` every slice along ``dim`` is a
    probability vector.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([[0.5, 0.3, -1.0], [2.0, 0.0, 0.0]]))
    >>> with torch.no_grad():
    ...     co.Simplex().bind(w, "w").project_(w)
    >>> w.data
    tensor([[0.6000, 0.4000, 0.0000],
            [1.0000, 0.0000, 0.0000]])
    """

    def __init__(self, dim: Dims = -1, radius: float = 1.0) -> None:
        self.radius = _radius(radius, "Simplex")
        if dim is None:
            raise ConstraintError("Simplex: dim must be an int or a tuple of ints, got None")
        self.dim = dim

    def _bind(self, param, name, owner):
        if param.dim() == 0:
            raise ConstraintError(f"{describe(name, param)}: {self!r} needs at least 1 dim")
        dims = _dims(self.dim, param, name, repr(self))
        if dims is None or math.prod(param.shape[d] for d in dims) == 0:
            raise ConstraintError(f"{describe(name, param)}: {self!r} needs a non-empty dim")
        return RowwiseBound(self, name, param, dims, self.radius, simplex_rows)

    def __repr__(self):
        return f"Simplex(dim={self.dim}, radius={self.radius:g})"


# -- bounds ------------------------------------------------------------------------------------------
# ``dims`` is what one unit spans (None: the whole tensor), which is what ``traits.reduces`` says
class L2BallBound(Bound):
    def __init__(self, constraint, name, param, dims, radius):
        super().__init__(
            constraint,
            name,
            param,
            Traits(convex=True, reduces=dims, via_norms=True, cheap_gap=True, measured_projection=True),
        )
        self.dims, self.radius = dims, radius

    def project_(self, x):
        l2_ball_project_(x, self.radius, self.dims)

    def scale_into_(self, y, out):
        """``out <- P(y)``: the ball's projection of ``y`` written into ``out`` (an intersection's
        cones projected ``y``, a copy of ``out``; this is its one write)."""
        l2_ball_project_(y, self.radius, self.dims, out)

    def scale_measured_into_(self, y, out) -> GapSize:
        """`scale_into_`, bit for bit (`l2_ball_project_`'s arithmetic on the same norms), returning
        the `GapSize` of ``y - P(y)`` from those norms."""
        norm = torch.linalg.vector_norm(y, 2, dim=self.dims, keepdim=True)
        total, largest, _ = _ball_gap(y, norm, self.radius, self.dims)
        torch.mul(y, norm.reciprocal_().mul_(self.radius).clamp_max_(1.0), out=out)
        return GapSize(total, largest)

    def gap_entries(self, x, out=None):
        total, largest, _ = l2_ball_gap_size(x, self.radius, self.dims)
        return GapSize(total, largest)

    def project_measured_(self, x, out=None):
        return self.scale_measured_into_(x, x)  # the projection in place, its gap read on the way

    def residual(self, x, out=None):
        # each unit's distance to its ball: a tensor of one entry per unit, whose norm is the distance
        return l2_ball_gap_size(x, self.radius, self.dims)[2]

    def gap(self, x):
        # x - x * min(1, r / |x|) = x * max(0, 1 - r / |x|)
        norm = torch.linalg.vector_norm(x, 2, dim=self.dims, keepdim=True)
        return x * norm.reciprocal_().mul_(-self.radius).add_(1.0).clamp_min_(0.0)


class UnitNormBound(Bound):
    def __init__(self, constraint, name, param, dims):
        super().__init__(constraint, name, param, Traits(reduces=dims, via_norms=True))
        self.dims = dims

    def project_(self, x):
        unit_sphere_project_(x, self.dims)


class RowwiseBound(Bound):
    """A set projected one unit at a time by a sort-based ``rows(v, radius)`` (L1 ball, simplex)."""

    def __init__(self, constraint, name, param, dims, radius, rows):
        super().__init__(constraint, name, param, Traits(convex=True, reduces=dims))
        self.dims, self.radius, self.rows = dims, radius, rows

    def project_(self, x):
        rows_project_(x, self.dims, lambda v: self.rows(v, self.radius))
