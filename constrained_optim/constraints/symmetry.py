"""Sets of tensors invariant under a symmetry: `Tied`, `Symmetric`, `Invariant`.

Each is a linear subspace whose orthogonal projection is an average: over the entries that
share a label (`Tied`), over ``W`` and its swapped/flipped copy (`Symmetric`), over a finite
group of norm-preserving maps (`Invariant`). A group that only permutes entries (possibly with
signs), such as the 90-degree rotations of a kernel, is resolved at attach into its orbits and
then projected exactly like `Tied`, so tied entries are bitwise equal after every step.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import torch

from ..errors import ConstraintError, describe
from .base import (
    Bound,
    Constraint,
    Dims,
    HeldZeros,
    Partition,
    TensorLike,
    Traits,
    _same,
    normalize_dims,
    trailing_or_full,
)

#: every family here: a linear subspace, averaged exactly (except a general group's average)
TIES = Traits(linear=True, convex=True, projects_grad=True, exact=True, reduces=None)


# -- pure maths ---------------------------------------------------------------------------------
def tied_values(x, group_ids, counts, n_groups, weights=None) -> torch.Tensor:
    """The projection of ``x`` onto ``{x : x_i = w_i * c_g(i)}`` (one value ``c_g`` per group
    ``g``), as a new tensor shaped like ``x``.

    ``x`` is viewed as ``(lead, n)`` with ``group_ids`` of length ``n``; each group of every
    leading row gets its (weighted) mean ``c_g = sum_j w_j x_j / |g|``. With ``weights`` None
    (all ones) this is the plain group mean; weights of ``+-1`` express sign-tied entries and
    ``0`` entries held at zero. Every member of a group receives the same value bitwise.
    """
    if x.numel() == 0:  # the set of an empty tensor is itself
        return x.clone()
    n = group_ids.numel()
    flat = x.reshape(-1, n)
    if weights is not None:
        flat = flat * weights
    sums = flat.new_zeros(flat.shape[0], n_groups).index_add_(1, group_ids, flat)
    out = sums.div_(counts).index_select(1, group_ids)
    if weights is not None:
        out.mul_(weights)
    return out.view(x.shape)


def tied_project_(x, group_ids, counts, n_groups, weights=None) -> None:
    """``x <- tied_values(x, ...)``, written back once."""
    x.copy_(tied_values(x, group_ids, counts, n_groups, weights))


def swap_flip(x: torch.Tensor, dims: tuple[int, ...], flip: tuple[int, ...]) -> torch.Tensor:
    """``T(x)``: ``x`` with ``dims`` swapped and ``flip`` reversed (an involution)."""
    if dims:
        x = x.transpose(*dims)
    if flip:
        x = x.flip(flip)
    return x


def symmetric_project_(x, dims, flip, scratch: torch.Tensor | None = None) -> None:
    """``x <- (x + T(x)) / 2``, written back once; ``scratch`` (contiguous, ``x``'s shape, not
    ``x``'s memory) holds the temporary, so a caller projecting many tensors allocates once."""
    t = scratch if scratch is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    _symmetric_into(x, dims, flip, t, x)


def _symmetric_into(x, dims, flip, t, out) -> None:
    # T(x) copied contiguously first (torch's copy reads a transposed source in blocks; an
    # element-wise op reading it directly is several times slower), then summed in place: entry
    # (i, j) is x_ij + x_ji and (j, i) is x_ji + x_ij, bitwise equal since + commutes; the
    # halving is the one write to ``out``
    t.copy_(swap_flip(x, dims, flip))
    t.add_(x)
    torch.mul(t, 0.5, out=out)


def _scratch_for(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One contiguous temporary per tensor of ``xs``, all views of one buffer (a group of
    parameters shares a device and dtype, and is projected one tensor at a time)."""
    if not xs:
        return []
    buf = xs[0].new_empty(max(x.numel() for x in xs))
    return [buf[: x.numel()].view(x.shape) for x in xs]


# -- Tied ------------------------------------------------------------------------------------------
class Tied(Constraint):
    """Entries with equal labels share one value: ``{W : W_i = W_j whenever labels_i = labels_j}``.

    ``labels`` is an integer tensor with the parameter's shape, or its trailing shape (then the
    pattern applies independently within each leading index). The projection sets each group
    to its mean; gradients and first moments are averaged the same way, second moments too.

    The 2x2 kernel ``[[a+b, a-b], [a-b, a+b]]`` is ``Tied([[0, 1], [1, 0]])``:

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [4.0, 3.0]]))
    >>> b = co.Tied(torch.tensor([[0, 1], [1, 0]])).bind(w, "w")
    >>> with torch.no_grad():
    ...     b.project_(w)
    >>> w.data
    tensor([[2., 3.],
            [3., 2.]])
    """

    linear = True

    def __init__(self, labels: TensorLike) -> None:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ConstraintError(f"Tied: labels must be an integer tensor, got {labels.dtype}")
        self.labels = labels

    def _bind(self, param, name, owner):
        if trailing_or_full(param.shape, self.labels.shape) < 0:
            raise ConstraintError(
                f"{describe(name, param)}: Tied labels of shape {tuple(self.labels.shape)} "
                "must have the parameter's shape or its trailing shape"
            )
        _, group_ids = torch.unique(self.labels.flatten(), return_inverse=True)
        return TiedBound(self, name, param, group_ids, pattern=tuple(self.labels.shape))

    def __repr__(self):
        return f"Tied({int(self.labels.unique().numel())} groups of {self.labels.numel()})"


class TiedBound(Bound):
    """``{x : x_i = w_i c_group(i)}`` over a pattern of the parameter's trailing shape, repeated
    over its leading dims (a `Tied` set, or the orbits of a signed-permutation `Invariant`)."""

    def __init__(self, constraint, name, param, group_ids, weights=None, pattern=None):
        super().__init__(constraint, name, param, TIES)
        self.pattern = tuple(param.shape) if pattern is None else pattern
        self.dtype = param.dtype
        self.group_ids = group_ids.to(param.device)
        self.weights = None if weights is None else weights.to(param.device, param.dtype)
        self._derive()

    def _derive(self):
        """What follows from the group ids and weights."""
        ids = self.group_ids
        self.n_groups = int(ids.max()) + 1 if ids.numel() else 0
        self.counts = torch.bincount(ids, minlength=self.n_groups).to(self.dtype)
        # second moments are averaged without signs; entries held at 0 are zeroed
        self.scale_weights = None if self.weights is None else self.weights.abs()
        held = None if self.weights is None else (self.weights == 0).view(self.pattern)
        self.held = held if held is not None and bool(held.any()) else None

    def project_(self, x):
        tied_project_(x, self.group_ids, self.counts, self.n_groups, self.weights)

    def project_grad_(self, g, x):
        self.project_(g)

    def project_scale_(self, v):
        tied_project_(v, self.group_ids, self.counts, self.n_groups, self.scale_weights)

    def repair_(self, t):
        if self.held is not None:  # an orbit reached with both signs is held at 0
            t.masked_fill_(self.held, 0)

    def held_zeros(self):
        # the pattern's held entries, repeated over the leading dims (a broadcast)
        return None if self.held is None else HeldZeros(free=~self.held)

    def partition(self, like):
        n, p, device = like.numel(), self.group_ids.numel(), like.device
        lead = torch.arange(n // p if p else 0, device=device).unsqueeze(1) * self.n_groups
        group = (lead + self.group_ids.unsqueeze(0)).reshape(-1)
        weight = (
            torch.ones(p, dtype=torch.float64, device=device)
            if self.weights is None
            else self.weights.double()
        ).repeat(n // p if p else 0)
        return Partition(group, weight, torch.zeros(n, dtype=torch.float64, device=device))

    def state_tensors(self):
        out = {"group_ids": self.group_ids}
        if self.weights is not None:
            out["weights"] = self.weights
        return out

    def check_values(self, tensors):
        ids = tensors["group_ids"]
        if ids.numel():
            if int(ids.min()) < 0 or int(ids.max()) >= ids.numel():
                return False, f"group_ids must lie in [0, {ids.numel()})"
            if not bool(torch.bincount(ids).all()):
                return False, "group_ids must use every id from 0 to the largest"
        w = tensors.get("weights")
        if w is not None and not bool(((w == -1) | (w == 0) | (w == 1)).all()):
            return False, "weights must be -1, 0 or 1"
        return True, ""

    def _adopt(self, tensors):
        super()._adopt(tensors)
        self._derive()


# -- Symmetric -------------------------------------------------------------------------------------
def _dim_tuple(value, what) -> tuple:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ConstraintError(f"Symmetric: {what} must be an int or a tuple of ints, got {value!r}") from None


class Symmetric(Constraint):
    """Invariant under swapping ``dims`` and reversing ``flip``: ``{W : W = T(W)}``.

    ``Symmetric()`` is ``W == W.T``; ``Symmetric(dims=(0, 1), flip=(2, 3))`` is
    ``W[i, j, a, b] == W[j, i, k-1-a, k-1-b]`` (transpose-flip tied convolution filters);
    ``Symmetric(dims=None, flip=(2, 3))`` is a point-symmetric kernel. The projection is
    ``(W + T(W)) / 2``, bitwise symmetric.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [4.0, 3.0]]))
    >>> with torch.no_grad():
    ...     co.Symmetric().bind(w, "w").project_(w)
    >>> w.data
    tensor([[1., 3.],
            [3., 3.]])
    """

    linear = True

    def __init__(self, dims: Sequence[int] = (0, 1), flip: Dims = ()) -> None:
        dims = _dim_tuple(dims, "dims")
        if len(dims) not in (0, 2):
            raise ConstraintError(f"Symmetric: dims must be a pair of dims, got {dims!r}")
        self.dims = dims
        self.flip = _dim_tuple(flip, "flip")

    def _bind(self, param, name, owner):
        dims = normalize_dims(self.dims, param.dim(), name, param, "Symmetric")
        flip = normalize_dims(self.flip, param.dim(), name, param, "Symmetric flip")
        if dims and param.shape[dims[0]] != param.shape[dims[1]]:
            raise ConstraintError(
                f"{describe(name, param)}: Symmetric swaps dims {dims}, which need equal sizes "
                f"(got {param.shape[dims[0]]} and {param.shape[dims[1]]})"
            )
        return SymmetricBound(self, name, param, dims, flip)

    def __repr__(self):
        flip = f", flip={self.flip}" if self.flip else ""
        return f"Symmetric(dims={self.dims}{flip})"


class SymmetricBound(Bound):
    def __init__(self, constraint, name, param, dims, flip):
        super().__init__(constraint, name, param, TIES)
        self.dims, self.flip = dims, flip

    def project_(self, x):
        symmetric_project_(x, self.dims, self.flip)

    @classmethod
    def project_all_(cls, bounds, xs):
        for b, x, t in zip(bounds, xs, _scratch_for(xs)):
            symmetric_project_(x, b.dims, b.flip, t)

    @classmethod
    def project_grad_all_(cls, bounds, gs, xs):
        cls.project_all_(bounds, gs)

    def gap(self, x):
        return (x - swap_flip(x, self.dims, self.flip)) * 0.5

    def project_grad_(self, g, x):
        symmetric_project_(g, self.dims, self.flip)

    def project_scale_(self, v):
        symmetric_project_(v, self.dims, self.flip)

    def partition(self, like):
        n, device = like.numel(), like.device
        own = torch.arange(n, device=device)
        partner = swap_flip(own.view(like.shape), self.dims, self.flip).reshape(-1)
        return Partition(
            torch.minimum(own, partner),
            torch.ones(n, dtype=torch.float64, device=device),
            torch.zeros(n, dtype=torch.float64, device=device),
        )


# -- Invariant -------------------------------------------------------------------------------------
class Invariant(Constraint):
    """Invariant under a finite group ``G`` of norm-preserving linear maps: ``{W : g(W) = W, g in G}``.

    The projection is the group average ``(1/|G|) sum_g g(W)``. ``group`` is a sequence of
    callables taking and returning a floating tensor of the parameter's shape; the set must be
    closed under composition (then it is a group), which attach checks. Maps that permute entries
    (with signs) are resolved at attach into orbits and projected like `Tied`.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.arange(9.0).view(3, 3))
    >>> with torch.no_grad():
    ...     co.Invariant.rotations().bind(w, "w").project_(w)
    >>> w.data
    tensor([[4., 4., 4.],
            [4., 4., 4.],
            [4., 4., 4.]])
    """

    linear = True

    def __init__(
        self, group: Sequence[Callable[[torch.Tensor], torch.Tensor]], name: str | None = None
    ) -> None:
        self.group = list(group)
        if not self.group or not all(callable(g) for g in self.group):
            raise ConstraintError("Invariant: group must be a non-empty sequence of callables")
        self.name = name

    @classmethod
    def rotations(cls, dims: Sequence[int] = (-2, -1)) -> Invariant:
        """The group of 90-degree rotations in the plane of ``dims`` (a kernel's spatial dims)."""
        dims = tuple(dims)
        return cls(
            [lambda x, k=k: torch.rot90(x, k, dims) for k in range(4)],  # type: ignore[misc]
            name=f"rotations(dims={dims})",
        )

    def _bind(self, param, name, owner):
        probe = torch.arange(1, param.numel() + 1, dtype=torch.float64, device=param.device)
        probe = probe.view(param.shape)
        images = [self._apply(g, probe, param, name) for g in self.group]
        if param.numel() == 0:  # the set of an empty tensor is itself: nothing to project
            return TiedBound(self, name, param, torch.zeros(0, dtype=torch.long))
        perms = [signed_permutation(img, probe) for img in images]
        if all(p is not None for p in perms) and acts_as(self.group, perms, param):
            group_ids, weights = orbits(perms, describe(name, param))
            return TiedBound(self, name, param, group_ids, weights)
        check_group(self, param, name)
        return GroupAverageBound(self, name, param)

    def _apply(self, g, x, param, name):
        try:
            y = g(x)
        except Exception as err:  # a user's callable: any failure means it can't take this shape
            raise ConstraintError(f"{describe(name, param)}: {self!r} map failed: {err}") from None
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} map returned {shape}, "
                f"expected a tensor of shape {tuple(x.shape)}"
            )
        if not y.is_floating_point():
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} map returned a {y.dtype} tensor for a "
                f"{x.dtype} one, expected a floating tensor (a linear map keeps the dtype)"
            )
        return y

    def same_as(self, other: object) -> bool:
        # two calls of `rotations()` (or of any function building the maps) make new lambdas
        return (
            type(other) is type(self)
            and self.name == other.name
            and len(self.group) == len(other.group)
            and all(same_map(f, g) for f, g in zip(self.group, other.group))
        )

    def __repr__(self):
        return f"Invariant({self.name or f'{len(self.group)} maps'})"


def same_map(f, g) -> bool:
    """Whether two callables are one map: the same object, or functions of the same code object
    with equal defaults, captured values and globals (a lambda built twice by the same line)."""
    if f is g:
        return True
    if not (isinstance(f, types.FunctionType) and isinstance(g, types.FunctionType)):
        return False
    try:
        cells = [tuple(c.cell_contents for c in fn.__closure__ or ()) for fn in (f, g)]
    except ValueError:  # a captured variable not assigned yet
        return False
    return (
        f.__code__ is g.__code__
        and f.__globals__ is g.__globals__
        and _same(f.__defaults__, g.__defaults__)
        and _same(f.__kwdefaults__, g.__kwdefaults__)
        and _same(cells[0], cells[1])
    )


class GroupAverageBound(Bound):
    """The average over a general finite group of norm-preserving linear maps."""

    def __init__(self, constraint, name, param):
        super().__init__(constraint, name, param, Traits(linear=True, convex=True, projects_grad=True))
        self.group = constraint.group

    def project_(self, x):
        total = sum(g(x) for g in self.group)
        x.copy_(total / len(self.group))

    def project_grad_(self, g, x):
        self.project_(g)


def signed_permutation(image: torch.Tensor, probe: torch.Tensor):
    """``(perm, sign)`` with ``image.flatten() == sign * probe.flatten()[perm]`` if ``image`` is a
    signed permutation of ``probe = 1..n``, else None."""
    flat = image.flatten()
    mag = flat.abs()
    perm = mag.round().long() - 1
    n = flat.numel()
    if not torch.equal(mag, mag.round()) or perm.min() < 0 or perm.max() >= n:
        return None
    if not torch.equal(torch.sort(perm).values, torch.arange(n, device=perm.device)):
        return None
    return perm, flat.sign()


def acts_as(group, perms, param) -> bool:
    """Whether each map really is its signed permutation (on a random probe, not just ``1..n``)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.device)
    flat = z.flatten()
    return all(torch.equal(g(z).flatten(), sign * flat[perm]) for g, (perm, sign) in zip(group, perms))


def orbits(perms, who: str):
    """Group ids and +-1/0 weights of the orbits of a signed-permutation group.

    For a group, the orbit of entry ``i`` is ``{perm_g(i)}``, so its smallest member is a label.
    Invariance ties ``x_i = s * x_rep`` with the sign of any map sending ``i`` to the
    representative; an entry reached with both signs forces its orbit to 0 (weight 0).
    """
    check_closed(perms, who)
    p = torch.stack([q for q, _ in perms])
    s = torch.stack([sg for _, sg in perms])
    rep = p.min(0).values
    hits = p == rep
    big = torch.full_like(s, 2.0)
    high = torch.where(hits, s, -big).max(0).values
    low = torch.where(hits, s, big).min(0).values
    consistent = high == low
    _, group_ids = torch.unique(rep, return_inverse=True)
    n_groups = int(group_ids.max()) + 1
    # uint8, not bool: CUDA's scatter_reduce has no bool kernel
    ok_group = torch.ones(n_groups, dtype=torch.uint8, device=rep.device)
    ok_group.scatter_reduce_(0, group_ids, consistent.to(torch.uint8), reduce="amin")
    weights = torch.where(ok_group[group_ids].bool(), high, torch.zeros_like(high))
    return group_ids, (None if bool((weights == 1).all()) else weights)


def check_closed(perms, who: str) -> None:
    """Raise unless the signed permutations are closed under composition."""
    n = perms[0][0].numel()
    codes = [(sg * (q + 1)).long() for q, sg in perms]
    weights = torch.randn(n, dtype=torch.float64, device=codes[0].device)
    index: dict[float, list[int]] = {}
    for k, c in enumerate(codes):
        index.setdefault(float((c.double() * weights).sum()), []).append(k)
    for qg, sg in perms:
        for qh, sh in perms:
            # (g o h)(x)_i = s_g(i) s_h(pi_g(i)) x[pi_h(pi_g(i))]
            code = (sg * sh[qg] * (qh[qg] + 1)).long()
            key = float((code.double() * weights).sum())
            if not any(torch.equal(code, codes[k]) for k in index.get(key, [])):
                raise ConstraintError(
                    f"{who}: the maps are not closed under composition, so they are not a group"
                )


def check_group(constraint: Invariant, param, name) -> None:
    """Raise unless every map is linear and norm-preserving and the set is closed, numerically."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    u, v = (torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.device) for _ in range(2))
    who = f"{describe(name, param)}: {constraint!r}"
    images = [constraint._apply(g, u, param, name) for g in constraint.group]
    scale = float(u.norm())
    for g, gu in zip(constraint.group, images):
        if abs(float(gu.norm()) - scale) > 1e-9 * scale:
            raise ConstraintError(f"{who}: a map does not preserve the norm")
        if not torch.allclose(g(2.0 * u - 3.0 * v), 2.0 * gu - 3.0 * g(v), rtol=1e-9, atol=1e-9):
            raise ConstraintError(f"{who}: a map is not linear")
    for g in constraint.group:
        for gh in (g(hu) for hu in images):
            if not any(torch.allclose(gh, k, rtol=1e-9, atol=1e-9 * scale) for k in images):
                raise ConstraintError(
                    f"{who}: the maps are not closed under composition, so they are not a group"
                )
