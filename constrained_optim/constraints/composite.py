"""Sets built from others: a user's own projection (`Projection`) and intersections (`Intersection`).

An intersection is projected exactly where it can be and by Dykstra's algorithm otherwise:

- sets that are all products of per-entry intervals (`Mask`, `Fixed`, `Box`, `NonNegative`, a
  fixed `NMSparsity` pattern) are projected in turn, once: clamping to one interval and then to
  another is clamping to their intersection;
- sets that hold, tie or sign-tie entries (`Mask`, `Fixed`, `Tied`, `Symmetric`, `Invariant`
  over signed permutations, a fixed `NMSparsity` pattern) are joined at attach into one such set:
  entries connected through any member's groups share one value (with the signs the ties
  imply), a component that contains a held entry or an odd sign cycle is held, so the joined
  projection is again a group mean, bitwise exact at any size;
- linear and affine sets whose projections commute (checked at attach on random probes) are
  projected in turn, once; the product of commuting orthogonal projections is the orthogonal
  projection onto the intersection;
- other linear sets are merged at attach into one exact orthogonal projection onto their
  intersection (an orthonormal basis from the eigenvectors of ``sum_i L_i`` with eigenvalue
  equal to the number of sets), for parameters of at most `EXPLICIT_MAX` entries; larger ones
  alternate between the sets until the step is below ``tol``;
- the non-linear sets, with the merged linear part as one set, go through Dykstra's algorithm,
  which converges to the nearest point of the intersection of closed convex sets.

The tangent projection of the linear part is exact in the same way. The residual an intersection
reports is ``sqrt(sum_i dist(x, C_i)^2)`` over its member sets, so a point that Dykstra left short
of the intersection, or an empty intersection, shows in the audit instead of being hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConstraintError, describe
from .base import Bound, Constraint, LowPrecisionBound
from .coordinate import FixedBound, MaskBound
from .symmetry import SymmetricBound, TiedBound, swap_flip, tied_project_

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
    the parameter at attach.

    >>> import torch, constrained_optim as co
    >>> halfspace = co.Projection(lambda x: x - (x.sum() - 1).clamp(min=0) / x.numel(), name="sum<=1")
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> with torch.no_grad():
    ...     halfspace.bind(w, "w").project_(w)
    >>> w.data
    tensor([0., 1.])
    """

    def __init__(self, project: Callable, project_grad: Callable | None = None, name: str | None = None):
        if not callable(project):
            raise ConstraintError(f"Projection: project must be callable, got {type(project).__name__}")
        if project_grad is not None and not callable(project_grad):
            raise ConstraintError(
                f"Projection: project_grad must be callable or None, got {type(project_grad).__name__}"
            )
        self.project = project
        self.project_grad = project_grad
        self.name = name

    def _bind(self, param, name):
        with torch.no_grad():
            self._try(lambda: self.project(param.detach().clone()), param, name, "project(x)")
            if self.project_grad is not None:
                self._try(lambda: self.project_grad(torch.zeros_like(param), param.detach()),
                          param, name, "project_grad(grad, param)")
        kind = ProjectionGradBound if self.project_grad is not None else ProjectionBound
        return kind(self, name, param)

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


def _store_(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x <- y`` where ``y`` may share memory with ``x`` (a user's function returned a view)."""
    if y is x:
        return
    if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        y = y.clone()
    x.copy_(y)


class ProjectionBound(Bound):
    def __init__(self, constraint, name, param):
        super().__init__(constraint, name, param)
        self.fn = constraint.project

    def project_(self, x):
        _store_(x, self.fn(x))  # x is overwritten anyway: the function may spoil it

    def gap(self, x):
        return x - self.fn(x.clone())


class ProjectionGradBound(ProjectionBound):
    projects_grad = True

    def __init__(self, constraint, name, param):
        super().__init__(constraint, name, param)
        self.grad_fn = constraint.project_grad

    def project_grad_(self, g, x):
        _store_(g, self.grad_fn(g, x))


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

    def __init__(self, *constraints: Constraint, max_iter: int = 200, tol: float | None = None):
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

    def _bind(self, param, name):
        return IntersectionBound.build(self, name, param, [c.bind(param, name) for c in self.constraints])

    def __repr__(self):
        return " & ".join(
            f"({c!r})" if isinstance(c, Intersection) else repr(c) for c in self.constraints
        )


def intersect_bounds(old: Bound, new: Bound, param: torch.Tensor, name: str) -> Bound:
    """The intersection of two bounds of one parameter, keeping what each resolved at attach
    (a pattern chosen by magnitude stays the one chosen)."""
    wrapped = isinstance(old, LowPrecisionBound)
    inner_old = old.inner if wrapped else old
    inner_new = new.inner if isinstance(new, LowPrecisionBound) else new
    members = [*_members(inner_old), *_members(inner_new)]
    constraint = Intersection(*[b.constraint for b in members])
    dtype = torch.float32 if wrapped else param.dtype
    like = torch.empty((), dtype=dtype, device=param.device).expand(tuple(param.shape))
    bound = IntersectionBound.build(constraint, name, like, members)
    return LowPrecisionBound.wrap(bound, param) if wrapped else bound


def _members(bound: Bound) -> list[Bound]:
    return list(bound.members) if isinstance(bound, IntersectionBound) else [bound]


# -- the blocks an intersection is projected by -------------------------------------------------------
class InTurn:
    """Bounds projected in turn once: exact when their projections compose to the projection onto
    the intersection (products of intervals; commuting linear sets)."""

    def __init__(self, bounds: list[Bound]):
        self.bounds = bounds
        self.linear = all(b.linear for b in bounds)

    def project_(self, x):
        for b in self.bounds:
            b.project_(x)

    def project_grad_(self, g, x):
        for b in self.bounds:
            b.project_grad_(g, x)


class Joined:
    """Sets that hold or (sign-)tie entries, joined into one: ``x_i = w_i c_g(i) + x0_i``, with
    ``w_i = +-1`` on free components and ``0`` on held ones, whose values ``x0`` are fixed."""

    linear = True

    def __init__(self, group_ids, weights, x0):
        n_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
        self.group_ids, self.n_groups, self.weights = group_ids, n_groups, weights
        counts = torch.bincount(group_ids, weights.abs().double(), minlength=n_groups)
        self.counts = counts.clamp_min(1).to(weights.dtype)
        self.scale_weights = weights.abs()
        self.x0 = x0 if bool((x0 != 0).any()) else None

    def _tie_(self, x, weights):
        flat = x.view(1, -1) if x.is_contiguous() else x.reshape(1, -1).clone()
        tied_project_(flat, self.group_ids, self.counts, self.n_groups, weights)
        if flat.data_ptr() != x.data_ptr():
            x.copy_(flat.view(x.shape))

    def project_(self, x):
        self._tie_(x, self.weights)
        if self.x0 is not None:
            x.add_(self.x0.view(x.shape))

    def project_grad_(self, g, x):
        self._tie_(g, self.weights)

    def project_scale_(self, v):
        self._tie_(v, self.scale_weights)


def partition_of(bound: Bound, like: torch.Tensor):
    """``(group, weight, held_value)`` over the flattened parameter if the bound's set is
    ``{x : x_i = w_i c_group(i)}`` with ``w_i`` in {-1, 0, 1} and held entries (``w_i = 0``) at
    ``held_value``; None for other sets."""
    n, device = like.numel(), like.device
    own = torch.arange(n, device=device)
    zeros = torch.zeros(n, dtype=torch.float64, device=device)
    if isinstance(bound, MaskBound):
        return own, bound.keep.expand(like.shape).reshape(-1).double(), zeros
    if isinstance(bound, FixedBound):
        held = torch.zeros(like.shape, dtype=torch.bool, device=device)
        held[bound.index] = True
        values = torch.zeros(like.shape, dtype=torch.float64, device=device)
        values[bound.index] = bound.values.double()
        return own, (~held).reshape(-1).double(), values.reshape(-1)
    if isinstance(bound, TiedBound):
        p = bound.group_ids.numel()
        lead = torch.arange(n // p, device=device).unsqueeze(1) * bound.n_groups
        group = (lead + bound.group_ids.unsqueeze(0)).reshape(-1)
        weight = (torch.ones(p, dtype=torch.float64, device=device) if bound.weights is None
                  else bound.weights.double()).repeat(n // p)
        return group, weight, zeros
    if isinstance(bound, SymmetricBound):
        partner = swap_flip(own.view(like.shape), bound.dims, bound.flip).reshape(-1)
        return torch.minimum(own, partner), torch.ones(n, dtype=torch.float64, device=device), zeros
    return None


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


def join_partitions(parts, like: torch.Tensor) -> Joined:
    """The intersection of sets given by `partition_of`, as one `Joined` set."""
    n, device = like.numel(), like.device
    us, vs = [], []
    held = torch.zeros(n, dtype=torch.bool, device=device)
    value = torch.zeros(n, dtype=torch.float64, device=device)
    value_set = torch.zeros(n, dtype=torch.bool, device=device)
    conflict = torch.zeros(n, dtype=torch.bool, device=device)
    own = torch.arange(n, device=device)
    for group, weight, held_value in parts:
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
            for b in bounds[i + 1:]:
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


class IntersectionBound(Bound):
    """An intersection resolved for one parameter: its member bounds and how they are combined."""

    def __init__(self, constraint, name, param, members: list[Bound]):
        super().__init__(constraint, name, param)
        self.members = members
        self.max_iter = getattr(constraint, "max_iter", 200)
        tol = getattr(constraint, "tol", None)
        self.tol = tol if tol is not None else 16 * _eps(param.dtype)
        # shape, dtype and device for the probes planning takes (an expanded empty: no memory)
        self.like = torch.empty((), dtype=param.dtype, device=param.device).expand(tuple(param.shape))
        self.coordinatewise = all(b.coordinatewise for b in members)
        self.sweeps = 0
        self._plan()

    @staticmethod
    def build(constraint, name, param, members: list[Bound]) -> IntersectionBound:
        kind = IntersectionGradBound if any(b.projects_grad for b in members) else IntersectionBound
        return kind(constraint, name, param, members)

    def _plan(self) -> None:
        members = self.members
        if self.coordinatewise or len(members) == 1:
            self.blocks = [InTurn(members)]
            self.tangent, self.grad_rest = self.blocks[0], []
            return
        lin = [b for b in members if b.linear]
        rest = [b for b in members if not b.linear]
        blocks: list = []
        self.tangent = None
        if lin:
            parts = [partition_of(b, self.like) for b in lin] if len(lin) > 1 else [None]
            if all(p is not None for p in parts):
                self.tangent = join_partitions(parts, self.like)
            elif len(lin) == 1 or commute(lin, self.like):
                self.tangent = InTurn(lin)
            elif self.like.numel() <= EXPLICIT_MAX:
                self.tangent = explicit_linear(lin, self.like)
            else:
                self.tangent = AlternatingLinear(lin, self.max_iter, self.tol)
            blocks.append(self.tangent)
        boxes = [b for b in rest if b.coordinatewise]
        if boxes:
            blocks.append(InTurn(boxes))
        blocks += [InTurn([b]) for b in rest if not b.coordinatewise]
        self.blocks = blocks
        self.grad_rest = [b for b in rest if b.projects_grad]

    @property
    def linear(self) -> bool:
        return all(b.linear for b in self.members)

    @property
    def exact(self) -> bool:
        """Projected in one pass (no Dykstra iterations)."""
        return len(self.blocks) == 1 and not isinstance(self.blocks[0], AlternatingLinear)

    # -- the set ---------------------------------------------------------------------------------------
    def project_(self, x):
        if len(self.blocks) == 1:
            self.blocks[0].project_(x)
        else:
            self.sweeps = dykstra_(x, self.blocks, self.max_iter, self.tol)

    def residual(self, x):
        """``sqrt(sum_i dist(x, C_i)^2)``, as the concatenation of the gaps to every member set."""
        return torch.cat([b.gap(x).reshape(-1) for b in self.members])

    # -- gradients and state ---------------------------------------------------------------------------
    def project_grad_(self, g, x):
        if self.tangent is not None:
            self.tangent.project_grad_(g, x)
        for b in self.grad_rest:
            b.project_grad_(g, x)

    def project_scale_(self, v):
        if isinstance(self.tangent, Joined):
            self.tangent.project_scale_(v)
            members = [b for b in self.members if not b.linear]
        else:
            members = self.members
        for b in members:
            b.project_scale_(v)

    def state_tensors(self):
        return {f"{i}.{k}": v for i, b in enumerate(self.members) for k, v in b.state_tensors().items()}

    def load_state_tensors(self, tensors):
        super().load_state_tensors(tensors)
        self._plan()  # the merged linear part depends on the members' data

    def __repr__(self):
        return f"{self.constraint!r} on {self.name}"


class IntersectionGradBound(IntersectionBound):
    projects_grad = True

