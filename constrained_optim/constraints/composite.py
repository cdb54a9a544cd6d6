"""Sets built from others: a user's own projection (`Projection`) and intersections (`Intersection`).

An intersection is projected exactly where it can be and by Dykstra's algorithm otherwise; the
plan reads only the members' `Traits` and `Bound.partition`, never their classes:

- sets that are all element-wise and convex (products of per-entry intervals: `Mask`, `Fixed`,
  `Box`, `NonNegative`, ``NormBall(p=inf)``, a fixed `NMSparsity` pattern) are projected in
  turn, once: clamping to one interval and then to another is clamping to their intersection;
- sets that hold, tie or sign-tie entries (those whose bound has a `Partition`: `Mask`, `Fixed`,
  `Tied`, `Symmetric`, `Invariant` over signed permutations, a fixed `NMSparsity` pattern) are
  joined at attach into one such set: entries connected through any member's groups share one
  value (with the signs the ties imply), a component that contains a held entry or an odd sign
  cycle is held, so the joined projection is again a group mean, bitwise exact at any size;
- linear and affine sets whose projections commute (checked at attach on random probes) are
  projected in turn, once; the product of commuting orthogonal projections is the orthogonal
  projection onto the intersection;
- other linear sets are merged at attach into one exact orthogonal projection onto their
  intersection (an orthonormal basis from the eigenvectors of ``sum_i L_i`` with eigenvalue
  equal to the number of sets), for parameters of at most `EXPLICIT_MAX` entries; larger ones
  alternate between the sets until the step is below ``tol``;
- the non-linear sets, with the merged linear part as one set, go through Dykstra's algorithm,
  which converges to the nearest point of the intersection of closed convex sets.

The tangent projection of the linear part is exact in the same way. Every projection works on a
copy where it takes more than one write and stores the result once. The residual an intersection
reports is ``sqrt(sum_i dist(x, C_i)^2)`` over its member sets, so a point that Dykstra left short
of the intersection, or an empty intersection, shows in the audit instead of being hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConstraintError, describe
from .base import Bound, Constraint, GapSize, HeldZeros, LowPrecisionBound, Partition, Traits, distance
from .symmetry import tied_values

#: largest parameter (in entries) whose non-commuting linear sets are merged into one explicit
#: orthogonal projection at attach (an ``n x n`` float64 eigen-decomposition)
EXPLICIT_MAX = 2048


# -- Projection --------------------------------------------------------------------------------------
class Projection(Constraint):
    """A user's own set, given by its projection.

    ``project(x)`` returns the projection of ``x`` onto the set; it may modify ``x`` in place (the
    library only hands it tensors it may spoil). ``project_grad(grad, param)``, if given, returns
    the gradient projected onto the tangent space at ``param`` (it may spoil ``grad``, and must
    not modify ``param``); without it, gradients are left as they are. The residual the audit
    reports is the distance between a projected point and its re-projection, so a ``project``
    that does not land on a set of its own fixed points shows there. Both functions are tried on
    the parameter at attach. The library knows nothing else of the set: its bound claims neither
    linearity nor convexity (an intersection with it goes through Dykstra's algorithm).

    >>> import torch, constrained_optim as co
    >>> halfspace = co.Projection(lambda x: x - (x.sum() - 1).clamp(min=0) / x.numel(), name="sum<=1")
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> with torch.no_grad():
    ...     halfspace.bind(w, "w").project_(w)
    >>> w.data
    tensor([0., 1.])
    """

    def __init__(
        self,
        project: Callable[[torch.Tensor], torch.Tensor],
        project_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(project):
            raise ConstraintError(f"Projection: project must be callable, got {type(project).__name__}")
        if project_grad is not None and not callable(project_grad):
            raise ConstraintError(
                f"Projection: project_grad must be callable or None, got {type(project_grad).__name__}"
            )
        self.project = project
        self.project_grad = project_grad
        self.name = name

    def _bind(self, param, name, owner):
        with torch.no_grad():
            self._try(lambda: self.project(param.detach().clone()), param, name, "project(x)")
            if self.project_grad is not None:
                self._try(
                    lambda: self.project_grad(torch.zeros_like(param), param.detach()),
                    param,
                    name,
                    "project_grad(grad, param)",
                )
        return ProjectionBound(self, name, param)

    def _try(self, call, param, name, what):
        try:
            out = call()
        except Exception as err:  # a user's function: any failure means it cannot take this parameter
            raise ConstraintError(f"{describe(name, param)}: {self!r} {what} failed: {err!r}") from None
        if not isinstance(out, torch.Tensor) or out.shape != param.shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} {what} returned {got}, expected a tensor of "
                f"shape {tuple(param.shape)}"
            )

    def __repr__(self):
        if self.name:
            return f"Projection({self.name})"
        return f"Projection({getattr(self.project, '__name__', type(self.project).__name__)})"


class ProjectionBound(Bound):
    """A user's functions, each handed a copy it may spoil; the result is stored once (a function
    that raises halfway leaves the tensor as it was)."""

    def __init__(self, constraint, name, param):
        super().__init__(
            constraint, name, param, Traits(projects_grad=constraint.project_grad is not None, reduces=None)
        )
        self.fn = constraint.project
        self.grad_fn = constraint.project_grad

    def project_(self, x):
        x.copy_(self.fn(x.clone()))

    def gap(self, x):
        return x - self.fn(x.clone())

    def project_grad_(self, g, x):
        if self.grad_fn is not None:
            g.copy_(self.grad_fn(g.clone(), x))


# -- Intersection ------------------------------------------------------------------------------------
class Intersection(Constraint):
    """``C_1 & C_2 & ...``: the points in every member set; also written ``a & b``.

    Exact in one pass where the sets commute (masks, held entries and boxes together; linear sets
    whose projections commute), one exact projection for other linear sets, and Dykstra's
    algorithm (at most ``max_iter`` sweeps, until a sweep moves the point by less than ``tol``
    relative to its norm; ``tol=None``: a few float eps) for convex sets otherwise. The residual
    the audit reports is the combined distance to the member sets: positive for an empty
    intersection, which attach does not reject. Attaching a second constraint to a parameter
    makes this intersection.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([3.0, -2.0, 0.5]))
    >>> both = co.Mask(torch.tensor([True, True, False])) & co.Box(-1.0, 1.0)
    >>> with torch.no_grad():
    ...     both.bind(w, "w").project_(w)
    >>> w.data
    tensor([ 1., -1.,  0.])
    """

    constraints: list[Constraint]

    def __init__(self, *constraints: Constraint, max_iter: int = 200, tol: float | None = None) -> None:
        members: list[Constraint] = []
        for c in constraints:
            if not isinstance(c, Constraint):
                raise ConstraintError(
                    f"Intersection: members must be constraints such as co.Box(...), got {type(c).__name__}"
                )
            members.extend(c.constraints if isinstance(c, Intersection) else [c])
        if not members:
            raise ConstraintError("Intersection: needs at least one constraint")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ConstraintError(f"Intersection: max_iter must be an int >= 1, got {max_iter!r}")
        if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ConstraintError(f"Intersection: tol must be None or in (0, 1), got {tol!r}")
        self.constraints = members
        self.max_iter = max_iter
        self.tol = tol
        self.linear = all(c.linear for c in members)

    def _bind(self, param, name, owner):
        return IntersectionBound(self, name, param, [c.bind(param, name, owner) for c in self.constraints])

    def same_as(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and len(self.constraints) == len(other.constraints)
            and self.max_iter == other.max_iter
            and self.tol == other.tol
            and all(a.same_as(b) for a, b in zip(self.constraints, other.constraints))
        )

    def __repr__(self):
        return " & ".join(f"({c!r})" if isinstance(c, Intersection) else repr(c) for c in self.constraints)


def intersect_bounds(old: Bound, new: Bound, param: torch.Tensor, name: str) -> Bound:
    """The intersection of two bounds of one parameter, keeping what each resolved at attach
    (a pattern chosen by magnitude stays the one chosen)."""
    wrapped = isinstance(old, LowPrecisionBound)
    inner_old = old.inner if isinstance(old, LowPrecisionBound) else old
    inner_new = new.inner if isinstance(new, LowPrecisionBound) else new
    members = [*_members(inner_old), *_members(inner_new)]
    constraint = Intersection(*[b.constraint for b in members])
    dtype = torch.float32 if wrapped else param.dtype
    like = torch.empty((), dtype=dtype, device=param.device).expand(tuple(param.shape))
    bound = IntersectionBound(constraint, name, like, members)
    return LowPrecisionBound(bound, param) if wrapped else bound


def _members(bound: Bound) -> list[Bound]:
    return list(bound.members) if isinstance(bound, IntersectionBound) else [bound]


# -- the blocks an intersection is projected by -------------------------------------------------------
# A block works in place and may write its tensor several times (Dykstra runs it on a scratch
# copy); ``writes_once`` / ``grad_writes_once`` say where one call is a single store, so a lone
# block can work on the parameter's own tensor.
class InTurn:
    """Bounds projected in turn once: exact when their projections compose to the projection onto
    the intersection (products of intervals; commuting linear sets)."""

    def __init__(self, bounds: list[Bound]):
        self.bounds = bounds
        self.linear = all(b.traits.linear for b in bounds)
        self.grad_bounds = [b for b in bounds if b.traits.projects_grad]
        self.writes_once = len(bounds) == 1
        self.grad_writes_once = len(self.grad_bounds) <= 1

    def project_(self, x):
        for b in self.bounds:
            b.project_(x)

    def project_grad_(self, g, x):
        for b in self.grad_bounds:
            b.project_grad_(g, x)


class ConeThenScale:
    """A norm ball or sphere (per unit, or whole) with element-wise convex cones (`Mask`,
    ``Fixed(..., 0.0)``, `NonNegative`, a fixed `NMSparsity` pattern): the cones' projection in
    turn, then the scaling, in one pass. For a closed convex cone ``K`` and the ball ``B`` of
    radius ``r`` about 0, ``P_{K ∩ B}(x) = P_B(P_K(x))`` (``<x - P_K x, P_K x> = 0``, so the
    nearest point of ``K`` at norm ``<= r`` is ``P_K x`` scaled); the scaling keeps zeros at zero
    and signs as they are, so the result is in ``K`` exactly. For a sphere the cones must be
    subspaces: ``P_K x / ||P_K x||``, and a unit with ``P_K x = 0`` (every point of the sphere in
    ``K`` equally near) takes equal entries on its free entries (cones, scale, cones, scale)."""

    linear = False
    grad_writes_once = False

    def __init__(self, cones: list[Bound], scaler: Bound):
        self.cones, self.scaler = cones, scaler
        self.again = not scaler.traits.convex  # the sphere's zero units
        # a ball scales a projected copy into the parameter: one write, and one pass fewer than
        # scaling in place and copying back
        self.scale_into_ = None if self.again else getattr(scaler, "scale_into_", None)
        self.writes_once = self.scale_into_ is not None

    def project_(self, x):
        if self.scale_into_ is not None:
            y = x.clone()
            for c in self.cones:
                c.project_(y)
            self.scale_into_(y, x)
            return
        for _ in range(2 if self.again else 1):
            for c in self.cones:
                c.project_(x)
            self.scaler.project_(x)


def cone_kind(b: Bound, like: torch.Tensor) -> str | None:
    """``"subspace"`` / ``"cone"`` for an element-wise convex set whose every entry's interval is
    ``{0}``, ``R``, ``[0, inf)`` or ``(-inf, 0]`` (``"subspace"``: only ``{0}`` and ``R``), else
    None. Read from the projection of the two extremes (a product of intervals maps ``+-max`` to
    its ends, or leaves them): an end that is not ``0`` or ``+-max`` is no cone."""
    if not (b.traits.elementwise and b.traits.convex):
        return None
    big = torch.finfo(like.dtype).max
    hi = torch.full(like.shape, big, dtype=like.dtype, device=like.device)
    lo = torch.full(like.shape, -big, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        b.project_(hi)
        b.project_(lo)
    if not bool(((hi == 0) | (hi == big)).all() and ((lo == 0) | (lo == -big)).all()):
        return None
    return "subspace" if torch.equal(hi == 0, lo == 0) else "cone"


def cone_plan(members: list[Bound], like: torch.Tensor) -> ConeThenScale | None:
    """The one-pass block for one L2 ball or sphere (``traits.via_norms``) with element-wise convex
    cones, or None where the intersection is not of that form."""
    scalers = [b for b in members if b.traits.via_norms]
    if len(scalers) != 1 or len(members) < 2:
        return None
    cones = [b for b in members if b is not scalers[0]]
    kinds = [cone_kind(b, like) for b in cones]
    if any(k is None for k in kinds):
        return None
    if not scalers[0].traits.convex and any(k != "subspace" for k in kinds):
        return None
    return ConeThenScale(cones, scalers[0])


class Joined:
    """Sets that hold or (sign-)tie entries, joined into one: ``x_i = w_i c_g(i) + x0_i``, with
    ``w_i = +-1`` on free components and ``0`` on held ones, whose values ``x0`` are fixed."""

    linear = True
    writes_once = grad_writes_once = True

    def __init__(self, group_ids, weights, x0):
        n_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
        self.group_ids, self.n_groups, self.weights = group_ids, n_groups, weights
        counts = torch.bincount(group_ids, weights.abs().double(), minlength=n_groups)
        self.counts = counts.clamp_min(1).to(weights.dtype)
        self.scale_weights = weights.abs()
        self.x0 = x0 if bool((x0 != 0).any()) else None
        self.held = weights == 0 if bool((weights == 0).any()) else None

    def _values(self, x, weights):
        return tied_values(x.reshape(1, -1), self.group_ids, self.counts, self.n_groups, weights)

    def project_(self, x):
        y = self._values(x, self.weights)
        if self.x0 is not None:
            y.add_(self.x0.view(1, -1))
        x.copy_(y.view(x.shape))

    def project_grad_(self, g, x):
        g.copy_(self._values(g, self.weights).view(g.shape))

    def project_scale_(self, v):
        v.copy_(self._values(v, self.scale_weights).view(v.shape))

    def repair_(self, t):
        if self.held is not None:  # held components (an odd sign cycle holds one at 0)
            t.masked_fill_(self.held.view(t.shape), 0)


def components(n_nodes: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Connected components of the graph with edges ``(u_k, v_k)``: each node's smallest member,
    by hooking and pointer jumping (vectorised, a few rounds for the graphs tying makes)."""
    label = torch.arange(n_nodes, device=u.device)
    while True:
        lu, lv = label[u], label[v]
        low = torch.minimum(lu, lv)
        new = label.clone()
        for ends in (u, v, lu, lv):
            new.scatter_reduce_(0, ends, low, reduce="amin")
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, label):
            return label
        label = new


def join_partitions(parts: list[Partition], like: torch.Tensor) -> Joined:
    """The intersection of sets given by their `Partition` (`Bound.partition`), as one `Joined` set."""
    n, device = like.numel(), like.device
    us, vs = [], []
    held = torch.zeros(n, dtype=torch.bool, device=device)
    value = torch.zeros(n, dtype=torch.float64, device=device)
    value_set = torch.zeros(n, dtype=torch.bool, device=device)
    conflict = torch.zeros(n, dtype=torch.bool, device=device)
    own = torch.arange(n, device=device)
    for part in parts:
        group, weight, held_value = part.group, part.weight, part.held_value
        is_held = weight == 0
        # held entries: their values must agree across members
        fresh = is_held & ~value_set
        clash = is_held & value_set & (value != held_value)
        conflict |= clash
        value = torch.where(fresh, held_value, value)
        value_set |= is_held
        held |= is_held
        # tie every free entry to its group's first free member, with the relative sign
        free = ~is_held
        first = torch.full((int(group.max()) + 1 if n else 0,), n, dtype=torch.long, device=device)
        first.scatter_reduce_(0, group[free], own[free], reduce="amin")
        rep = first[group]
        link = free & (rep < n) & (rep != own)
        i, j = own[link], rep[link]
        sign = weight[link] * weight[j]
        # the signed double cover: node i is (i, +), node i + n is (i, -)
        same = sign > 0
        us += [i, i + n]
        vs += [torch.where(same, j, j + n), torch.where(same, j + n, j)]
    u = torch.cat(us) if us else own[:0]
    v = torch.cat(vs) if vs else own[:0]
    label = components(2 * n, u, v)
    pos, neg = label[:n], label[n:]
    odd = pos == neg  # an odd sign cycle: x_i = -x_i, so the component is 0
    _, comp = torch.unique(torch.minimum(pos, neg), return_inverse=True)
    sign = torch.where(pos < neg, 1.0, -1.0).double()
    n_comp = int(comp.max()) + 1 if n else 0

    def per_comp(values, reduce):
        out = torch.zeros(n_comp, dtype=values.dtype, device=device)
        return out.scatter_reduce_(0, comp, values, reduce=reduce, include_self=False)

    pinned = per_comp((held | odd).double(), "amax")[comp] > 0
    # a held component's value c (x_i = sign_i c) from its held entries; their mean where they
    # disagree (an empty intersection, which the residual then shows)
    n_held = per_comp(held.double(), "sum")
    c = per_comp(torch.where(held, sign * value, 0.0), "sum") / n_held.clamp_min(1)
    c = torch.where(per_comp((held | odd).double() * odd.double(), "amax") > 0, 0.0, c)
    x0 = torch.where(held, value, sign * c[comp])
    x0 = torch.where(pinned, x0, 0.0)
    weights = torch.where(pinned, 0.0, sign)
    _, compact = torch.unique(comp, return_inverse=True)
    return Joined(compact, weights.to(like.dtype), x0.to(like.dtype))


class ExplicitLinear:
    """The orthogonal projection onto an affine intersection ``x0 + T``, ``T`` spanned by the
    orthonormal columns of ``q``, ``x0`` orthogonal to ``T``: ``x <- q q^T x + x0``."""

    linear = True
    writes_once = grad_writes_once = True

    def __init__(self, q: torch.Tensor, x0: torch.Tensor):
        self.q, self.x0 = q, x0

    def project_(self, x):
        flat = x.reshape(-1)
        x.copy_((self.q @ (self.q.T @ flat) + self.x0).view(x.shape))

    def project_grad_(self, g, x):
        flat = g.reshape(-1)
        g.copy_((self.q @ (self.q.T @ flat)).view(g.shape))


class AlternatingLinear:
    """Linear sets too large to merge: alternating projections (von Neumann), which converge to
    the projection onto the intersection of affine sets, until a sweep moves less than ``tol``."""

    linear = True
    writes_once = grad_writes_once = False

    def __init__(self, bounds: list[Bound], max_iter: int, tol: float):
        self.bounds, self.max_iter, self.tol = bounds, max_iter, tol

    def _alternate(self, x, step):
        before = torch.empty_like(x)
        limit = self.tol * max(float(torch.linalg.vector_norm(x)), 1e-30)
        for _ in range(self.max_iter):
            before.copy_(x)
            for b in self.bounds:
                step(b, x)
            if float(torch.linalg.vector_norm(before.sub_(x))) <= limit:
                break

    def project_(self, x):
        self._alternate(x, lambda b, y: b.project_(y))

    def project_grad_(self, g, x):
        self._alternate(g, lambda b, y: b.project_grad_(y, x))


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _probes(like: torch.Tensor, k: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device) for _ in range(k)]


def _applied(b: Bound, x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    b.project_(y)
    return y


def commute(bounds: list[Bound], like: torch.Tensor) -> bool:
    """Whether the (affine) projections commute pairwise: ``P_i P_j z = P_j P_i z`` for two random
    ``z`` (then for every ``z``, with probability one), to rounding."""
    limit = 1e3 * _eps(like.dtype)
    for z in _probes(like, 2):
        scale = float(z.norm())
        for i, a in enumerate(bounds):
            for b in bounds[i + 1 :]:
                ab = _applied(a, _applied(b, z))
                ba = _applied(b, _applied(a, z))
                if float((ab - ba).norm()) > limit * scale:
                    return False
    return True


def explicit_linear(bounds: list[Bound], like: torch.Tensor) -> ExplicitLinear:
    """One exact projection onto the intersection of affine sets ``C_i = {L_i x + o_i}``.

    ``T = ∩ range(L_i)`` is the eigenspace of ``S = sum_i L_i`` for the eigenvalue ``k`` (the number
    of sets), since ``k I - S = sum_i (I - L_i)^T (I - L_i)``; the nearest point to 0,
    ``x0 = (k I - S)^+ sum_i o_i``, minimises ``sum_i dist(x, C_i)^2`` (zero where the sets meet).
    """
    n = like.numel()
    k = len(bounds)
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    s = torch.zeros(n, n, dtype=torch.float64, device=like.device)
    offsets = torch.zeros(n, dtype=torch.float64, device=like.device)
    zero = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    for b in bounds:
        columns = []
        for j in range(n):
            g = eye[j].view(like.shape).clone()
            b.project_grad_(g, zero)
            columns.append(g.reshape(-1))
        s += torch.stack(columns, 1).double()
        offsets += _applied(b, zero).reshape(-1).double()
    s = (s + s.T) * 0.5
    values, vectors = torch.linalg.eigh(s)
    inside = values > k - 1e3 * _eps(like.dtype) * k
    q = vectors[:, inside]
    rest, gaps = vectors[:, ~inside], k - values[~inside]
    x0 = rest @ ((rest.T @ offsets) / gaps)
    return ExplicitLinear(q.to(like.dtype), x0.to(like.dtype))


def dykstra_(x: torch.Tensor, blocks, max_iter: int, tol: float) -> int:
    """Dykstra's algorithm: the nearest point of ``∩ C_i`` to ``x`` (closed convex ``C_i``), in place.

    Each sweep projects ``x + p_i`` onto ``C_i`` and keeps the increment ``p_i = (x + p_i) - x_new``;
    affine sets need no increment (it is normal to the set and does not change the projection).
    Stops when a sweep moves ``x`` by less than ``tol * |x|`` in all; returns the sweeps taken.
    """
    incs = [None if blk.linear else torch.zeros_like(x) for blk in blocks]
    before = torch.empty_like(x)
    limit = tol * max(float(torch.linalg.vector_norm(x)), 1e-30)
    for sweep in range(1, max_iter + 1):
        moved = x.new_zeros(())
        for blk, inc in zip(blocks, incs):
            before.copy_(x)
            if inc is None:
                blk.project_(x)
            else:
                inc.add_(x)
                x.copy_(inc)
                blk.project_(x)
                inc.sub_(x)
            moved += torch.linalg.vector_norm(before.sub_(x)) ** 2
        total = float(moved)
        if total <= limit * limit or total != total:  # converged, or NaN (the engine reports it)
            return sweep
    return max_iter


def _on_copy(x: torch.Tensor, once: bool, apply: Callable[[torch.Tensor], None]) -> None:
    """``apply`` to ``x`` directly where it is a single store (``once``), else to a copy that is
    written back once."""
    if once:
        apply(x)
        return
    y = x.clone()
    apply(y)
    x.copy_(y)


class IntersectionBound(Bound):
    """An intersection resolved for one parameter: its member bounds and how they are combined.
    Its traits follow from the members' and from the plan."""

    def __init__(self, constraint, name, param, members: list[Bound]):
        self.members = members
        self.max_iter = getattr(constraint, "max_iter", 200)
        tol = getattr(constraint, "tol", None)
        self.tol = tol if tol is not None else 16 * _eps(param.dtype)
        # shape, dtype and device for the probes planning takes (an expanded empty: no memory)
        self.like = torch.empty((), dtype=param.dtype, device=param.device).expand(tuple(param.shape))
        self.sweeps = 0
        self._plan()
        super().__init__(constraint, name, param, self._traits())

    tangent: InTurn | Joined | ExplicitLinear | AlternatingLinear | None

    def _plan(self) -> None:
        members = self.members
        if len(members) == 1 or all(b.traits.elementwise and b.traits.convex for b in members):
            self.blocks: list[Any] = [InTurn(members)]
            self.tangent, self.grad_rest = self.blocks[0], []
        else:
            lin = [b for b in members if b.traits.linear]
            rest = [b for b in members if not b.traits.linear]
            blocks: list = []
            self.tangent = None
            if lin:
                parts = [b.partition(self.like) for b in lin] if len(lin) > 1 else [None]
                if all(p is not None for p in parts):
                    self.tangent = join_partitions(parts, self.like)  # type: ignore[arg-type]  # none None
                elif len(lin) == 1 or commute(lin, self.like):
                    self.tangent = InTurn(lin)
                elif self.like.numel() <= EXPLICIT_MAX:
                    self.tangent = explicit_linear(lin, self.like)
                else:
                    self.tangent = AlternatingLinear(lin, self.max_iter, self.tol)
                blocks.append(self.tangent)
            # element-wise convex sets compose exactly in turn: one block
            boxes = [b for b in rest if b.traits.elementwise and b.traits.convex]
            if boxes:
                blocks.append(InTurn(boxes))
            blocks += [InTurn([b]) for b in rest if not (b.traits.elementwise and b.traits.convex)]
            self.blocks = blocks
            self.grad_rest = [b for b in rest if b.traits.projects_grad]
            # a ball or sphere with cones that hold zeros or signs: one exact pass, no Dykstra
            block = cone_plan(members, self.like)
            if block is not None:
                self.blocks = [block]
        # a ball with one cone that measures its own gap cheaply: the projection measures the
        # whole gap (`project_measured_`)
        block = self.blocks[0]
        self.measured = (
            isinstance(block, ConeThenScale)
            and block.scale_into_ is not None
            and hasattr(block.scaler, "scale_measured_into_")
            and len(block.cones) == 1
            and block.cones[0].traits.cheap_gap
        )
        steps = (self.tangent is not None) + len(self.grad_rest)
        lone = self.tangent is None or self.tangent.grad_writes_once
        self._grad_once = steps == 0 or (steps == 1 and lone)
        # the one member whose tangent projection is the intersection's (`MaxNorm & Fixed`: the
        # Fixed), whose cheap measure of the removed part then serves the audit
        projecting: list[Bound | None] = list(self.grad_rest)
        if self.tangent is not None:  # a merged linear part is no one member's
            projecting += self.tangent.grad_bounds if isinstance(self.tangent, InTurn) else [None]
        only = projecting[0] if len(projecting) == 1 else None
        self.grad_member = only if only is not None and only.traits.cheap_grad_gap else None

    def _traits(self) -> Traits:
        t = [b.traits for b in self.members]
        if len(t) == 1:  # the member's own, less the gap forms this bound does not forward
            return dataclasses.replace(t[0], cheap_gap=False, cheap_grad_gap=False, measured_projection=False)
        block = self.blocks[0]
        exact = len(self.blocks) == 1 and (
            isinstance(block, Joined)
            or (isinstance(block, InTurn) and all(x.exact and x.elementwise for x in t))
        )
        return Traits(
            linear=all(x.linear for x in t),
            convex=all(x.convex for x in t),
            projects_grad=any(x.projects_grad for x in t),
            exact=exact,
            reduces=() if all(x.elementwise for x in t) else None,
            cheap_grad_gap=self.grad_member is not None,
            measured_projection=self.measured,
        )

    @property
    def one_pass(self) -> bool:
        """Projected exactly in one pass (no Dykstra sweeps, no alternation), to rounding."""
        return len(self.blocks) == 1 and not isinstance(self.blocks[0], AlternatingLinear)

    # -- the set ---------------------------------------------------------------------------------------
    def project_(self, x):
        if len(self.blocks) == 1:
            _on_copy(x, self.blocks[0].writes_once, self.blocks[0].project_)
        else:

            def sweep(y):
                self.sweeps = dykstra_(y, self.blocks, self.max_iter, self.tol)

            _on_copy(x, False, sweep)

    def project_measured_(self, x, out=None):
        """`project_` of a ball with one cone, measuring its gap on the way: the cone keeps or
        zeroes each entry, so ``x - P(x)`` is the cone's gap on the entries it zeroes and the
        ball's gap of ``P_K(x)`` on the rest (disjoint: their squared norms add, maxima compare)."""
        block = self.blocks[0]
        cone = block.cones[0]
        closed = cone.gap_entries(x, out)  # read before x changes
        if isinstance(closed, GapSize):
            cone_norm, cone_max = closed
        elif closed.numel() == 0:
            cone_norm = cone_max = closed.new_zeros(())
        else:
            lo, hi = torch.aminmax(closed)
            cone_norm, cone_max = torch.linalg.vector_norm(closed), torch.maximum(hi, -lo)
        y = x.clone()  # as `ConeThenScale.project_`: the cone on a copy, scaled into x
        cone.project_(y)
        ball = block.scaler.scale_measured_into_(y, x)
        return GapSize(torch.hypot(cone_norm, ball.norm), torch.maximum(cone_max, ball.max))

    def residual(self, x, out=None):
        """``sqrt(sum_i dist(x, C_i)^2)``: the distances to every member set, each in its family's
        cheapest form, as one small tensor."""
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.stack([distance(b.residual(x)).to(wide) for b in self.members])

    # -- gradients and state ---------------------------------------------------------------------------
    def project_grad_(self, g, x):
        def apply(h):
            if self.tangent is not None:
                self.tangent.project_grad_(h, x)
            for b in self.grad_rest:
                b.project_grad_(h, x)

        _on_copy(g, self._grad_once, apply)

    def grad_gap_entries(self, g, x, out=None):
        if self.grad_member is None:  # only where traits.cheap_grad_gap
            raise NotImplementedError
        return self.grad_member.grad_gap_entries(g, x, out)

    def project_scale_(self, v):
        def apply(w):
            members = self.members
            if isinstance(self.tangent, Joined):
                self.tangent.project_scale_(w)
                members = [b for b in members if not b.traits.linear]
            for b in members:
                b.project_scale_(w)

        _on_copy(v, False, apply)

    def repair_(self, t):
        for b in self.members:
            b.repair_(t)
        if isinstance(self.tangent, Joined):
            self.tangent.repair_(t)

    def held_zeros(self):
        """The members' held zeros (and a joined partition's), where one pass projects the set;
        confirmed on a probe: a projected point and a projected gradient are exactly 0 there."""
        if not (self.one_pass and self.traits.projects_grad):
            return None
        parts = [h for b in self.members if (h := b.held_zeros()) is not None]
        joined = self.tangent
        if isinstance(joined, Joined) and joined.held is not None:
            held = joined.held if joined.x0 is None else joined.held & (joined.x0 == 0)
            parts.append(HeldZeros(free=~held.view(self.shape)))
        if not parts:
            return None
        if len(parts) == 1:
            found = parts[0]
        else:
            free = parts[0].free_mask(self.shape)
            for h in parts[1:]:
                free &= h.free_mask(self.shape)
            found = HeldZeros(free=free)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(self.shape, generator=gen, dtype=self.like.dtype)
        g = torch.randn(self.shape, generator=gen, dtype=self.like.dtype)
        with torch.no_grad():
            self.project_(x)
            self.project_grad_(g, x)
        return found if found.all_zero(x) and found.all_zero(g) else None

    # -- checkpoints: each member's data under its position, "0.keep" ---------------------------------
    def state_tensors(self):
        return {f"{i}.{k}": v for i, b in enumerate(self.members) for k, v in b.state_tensors().items()}

    def _member_data(self, tensors, i: int) -> dict:
        prefix = f"{i}."
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    def check_state(self, tensors):
        if not isinstance(tensors, dict):
            return False, f"data must be a dict of tensors, got {type(tensors).__name__}"
        mine = self.state_tensors()
        if set(mine) != set(tensors):
            return False, f"data {sorted(tensors)}, expected {sorted(mine)}"
        for i, b in enumerate(self.members):
            ok, reason = b.check_state(self._member_data(tensors, i))
            if not ok:
                return False, f"{i} ({b.constraint!r}): {reason}"
        return True, ""

    def with_state(self, tensors):
        """A new intersection of the members rebuilt from ``tensors``, planned again (the merged
        linear part depends on the members' data)."""
        ok, reason = self.check_state(tensors)
        if not ok:
            raise ConstraintError(f"{self.name}: {self.constraint!r}: {reason}")
        members = [b.with_state(self._member_data(tensors, i)) for i, b in enumerate(self.members)]
        return IntersectionBound(self.constraint, self.name, self.like, members)
