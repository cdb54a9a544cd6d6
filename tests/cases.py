"""Every constraint, as a case the shared contract suite (`test_contract.py`) runs over.

A case builds the constraint and names a parameter shape it takes. ``violation(x)`` measures how
far ``x`` is off the set, written from the set's mathematical definition, independently of the
library's projection code, so "the projection lands in the set" is checked against the maths.
``feasible(gen, shape)`` draws points of the set, for the nearest-point property of convex sets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import constrained_optim as co


@dataclass
class Case:
    id: str
    make: Callable[[], co.Constraint]
    shape: tuple[int, ...]
    violation: Callable[[torch.Tensor], float]
    linear: bool = False  # a linear or affine set: P is an orthogonal (affine) projection
    convex: bool = False
    feasible: Callable[[torch.Generator, tuple, torch.dtype], torch.Tensor] | None = None
    tangent_violation: Callable[[torch.Tensor, torch.Tensor], float] | None = None  # (g, x)
    exact: bool = False  # after every optimizer step the violation is exactly 0.0 (bitwise)
    rtol: float = 1e-6  # otherwise violation <= rtol * max(1, |x|_max) after every step
    extra: dict = field(default_factory=dict)


def _max(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


# -- shared data ----------------------------------------------------------------------------------
MASK = torch.tensor([[True, False, True], [False, True, True]])
CENTRE_HELD = torch.zeros(3, 3, dtype=torch.bool)
CENTRE_HELD[1, 1] = True
FIXED_VALUE = torch.arange(9.0).view(3, 3) / 4
TIED_LABELS = torch.tensor([[0, 1], [1, 0]])
SUBSPACE_BASIS = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]]])
AFFINE_OFFSET = torch.tensor([[0.5, -1.0], [2.0, 0.25]])


def _with(x, index, value):
    x[index] = value
    return x


def _plus(a, t):
    return a + t(a)


def _rot_violation(x, dims=(-2, -1)):
    return max(_max(x - torch.rot90(x, k, dims)) for k in range(1, 4))


def _sym_violation(x, dims=(0, 1), flip=()):
    t = x.transpose(*dims) if dims else x
    return _max(x - (t.flip(flip) if flip else t))


def _tied_violation(x, labels):
    flat = x.reshape(-1, labels.numel())
    lab = labels.flatten()
    return max(_max(flat[:, lab == v] - flat[:, lab == v][:, :1]) for v in lab.unique())


def _in_span(x, basis, offset=None):
    k = basis.shape[0]
    b = basis.reshape(k, -1).double()
    flat = x.double().reshape(-1, b.shape[1])
    if offset is not None:
        flat = flat - offset.double().expand(x.shape).reshape(-1, b.shape[1])
    coef = torch.linalg.lstsq(b.T, flat.T).solution
    return _max(flat.T - b.T @ coef)


def _sign_flip_group():
    return [lambda x: x, lambda x: -x.flip(-1)]


LINEAR_CASES = [
    Case(
        "Mask",
        lambda: co.Mask(MASK),
        (4, 2, 3),
        lambda x: _max(x[..., ~MASK]),
        exact=True,
        linear=True,
        convex=True,
        feasible=lambda g, s, d: torch.randn(s, generator=g, dtype=d) * MASK,
    ),
    Case(
        "Fixed-index",
        lambda: co.Fixed((..., 1, 1), 0.0),
        (3, 2, 3, 3),
        lambda x: _max(x[..., 1, 1]),
        exact=True,
        linear=True,
        convex=True,
        feasible=lambda g, s, d: _with(torch.randn(s, generator=g, dtype=d), (..., 1, 1), 0.0),
    ),
    Case(
        "Fixed-mask-value",
        lambda: co.Fixed(CENTRE_HELD, FIXED_VALUE),
        (2, 3, 3),
        lambda x: _max(x[..., CENTRE_HELD] - FIXED_VALUE[CENTRE_HELD].to(x.dtype)),
        exact=True,
        linear=True,
        convex=True,
        feasible=lambda g, s, d: torch.where(
            CENTRE_HELD, FIXED_VALUE.to(d), torch.randn(s, generator=g, dtype=d)
        ),
    ),
    Case(
        "Tied",
        lambda: co.Tied(TIED_LABELS),
        (3, 2, 2),
        lambda x: _tied_violation(x, TIED_LABELS),
        exact=True,
        linear=True,
        convex=True,
        feasible=lambda g, s, d: torch.randn(s[0], 2, generator=g, dtype=d)[:, TIED_LABELS],
    ),
    Case(
        "Symmetric",
        lambda: co.Symmetric(),
        (4, 4),
        _sym_violation,
        exact=True,
        linear=True,
        convex=True,
        feasible=lambda g, s, d: _plus(torch.randn(s, generator=g, dtype=d), lambda a: a.T),
    ),
    Case(
        "Symmetric-flip",
        lambda: co.Symmetric(dims=(0, 1), flip=(2, 3)),
        (3, 3, 3, 3),
        lambda x: _sym_violation(x, (0, 1), (2, 3)),
        exact=True,
        linear=True,
        convex=True,
        feasible=lambda g, s, d: _plus(
            torch.randn(s, generator=g, dtype=d), lambda a: a.transpose(0, 1).flip(2, 3)
        ),
    ),
    Case(
        "Invariant-rotations",
        lambda: co.Invariant.rotations(),
        (2, 3, 3),
        _rot_violation,
        exact=True,
        linear=True,
        convex=True,
        feasible=lambda g, s, d: sum(
            torch.rot90(a, k, (-2, -1)) for a in [torch.randn(s, generator=g, dtype=d)] for k in range(4)
        ),
    ),
    Case(
        "Invariant-signed",
        lambda: co.Invariant(_sign_flip_group()),
        (2, 5),
        lambda x: _max(x + x.flip(-1)),
        exact=True,
        linear=True,
        convex=True,
        feasible=lambda g, s, d: _plus(torch.randn(s, generator=g, dtype=d), lambda a: -a.flip(-1)),
    ),
    Case(
        "Invariant-callables",
        lambda: co.Invariant([lambda x: x, lambda x: x @ REFLECT_60.to(x)]),
        (3, 2),
        lambda x: _max(x - x @ REFLECT_60.to(x)),
        linear=True,
        convex=True,
        feasible=lambda g, s, d: _plus(torch.randn(s, generator=g, dtype=d), lambda a: a @ REFLECT_60.to(a)),
    ),
    Case(
        "Subspace",
        lambda: co.Subspace(SUBSPACE_BASIS),
        (3, 2, 2),
        lambda x: _in_span(x, SUBSPACE_BASIS),
        linear=True,
        convex=True,
        feasible=lambda g, s, d: torch.einsum(
            "lk,k...->l...", torch.randn(s[0], 2, generator=g, dtype=d), SUBSPACE_BASIS.to(d)
        ),
    ),
    Case(
        "Affine",
        lambda: co.Affine(SUBSPACE_BASIS, AFFINE_OFFSET),
        (3, 2, 2),
        lambda x: _in_span(x, SUBSPACE_BASIS, AFFINE_OFFSET),
        linear=True,
        convex=True,
        feasible=lambda g, s, d: (
            AFFINE_OFFSET.to(d)
            + torch.einsum("lk,k...->l...", torch.randn(s[0], 2, generator=g, dtype=d), SUBSPACE_BASIS.to(d))
        ),
    ),
]

# a reflection of the plane (axis at 30 degrees), acting on the last dim of a (..., 2) tensor:
# orthogonal but not a permutation, so `Invariant` takes its general group-average path
REFLECT_60 = torch.tensor([[0.5, 3**0.5 / 2], [3**0.5 / 2, -0.5]], dtype=torch.float64)

# the non-linear sets (Box, norm balls, simplex, manifolds, sparsity, custom and composite) -----
BOX_HIGH = torch.tensor([0.5, 1.0, 2.0, 0.0])
INF = float("inf")
OPEN_LOW = torch.tensor([[-INF, -1.0, 0.0, -INF]])  # infinite entries: no bound there
OPEN_HIGH = torch.tensor([INF, 1.0, INF, 0.5])
NONLINEAR_MASK = torch.tensor(
    [[[True, False], [True, True]], [[False, True], [True, True]], [[True, True], [True, True]]]
)  # not constant on TIED_LABELS groups
HALFSPACE_A = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
SUBSPACE_ROWS = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # does not commute with HELD_ENDS
HELD_ENDS = torch.tensor([[True, False, False], [False, False, True]])


def _relu_max(t: torch.Tensor) -> float:
    return float(t.clamp_min(0).max()) if t.numel() else 0.0


def _units(x, dims):
    """Norms over ``dims`` for each index of the other dims, by an explicit loop over units."""
    keep = [d for d in range(x.dim()) if d not in dims]
    moved = x.permute(keep + list(dims)).reshape(-1, int(torch.tensor([x.shape[d] for d in dims]).prod()))
    return [row for row in moved]


def _ball_violation(x, radius, p, dims=None):
    rows = [x.flatten()] if dims is None else _units(x, dims)
    norms = torch.stack(
        [r.abs().sum() if p == 1 else r.abs().max() if p == "inf" else r.pow(2).sum().sqrt() for r in rows]
    )
    return _relu_max(norms - radius)


def _sphere_violation(x, dims):
    return max(abs(float(r.pow(2).sum().sqrt()) - 1.0) for r in _units(x, dims))


def _simplex_violation(x, dim, radius):
    sums = x.sum(dim)
    return max(_relu_max(-x), _max(sums - radius))


def _orth_violation(x):
    w = x.reshape(x.shape[0], -1).double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return _max(gram - torch.eye(gram.shape[0], dtype=torch.float64))


def _orth_tangent_violation(g, x):
    w, z = x.reshape(x.shape[0], -1).double(), g.reshape(x.shape[0], -1).double()
    return _max(w @ z.T + z @ w.T) if w.shape[0] <= w.shape[1] else _max(w.T @ z + z.T @ w)


def _rank_violation(x, rank):
    s = torch.linalg.svdvals(x.reshape(x.shape[0], -1).double())
    return float(s[rank:].norm())


def _nm_violation(x, n, m, dim=-1):
    groups = x.movedim(dim, -1).reshape(-1, m).abs()
    return _max(groups.sort(dim=1, descending=True).values[:, n:])


def _nm_first(g, s, d, n=2, m=4):
    """Points of the pattern chosen at attach on a zero parameter (ties keep the lower index)."""
    y = torch.randn(s, generator=g, dtype=d)
    y.view(-1, m)[:, n:] = 0
    return y


def _halfspace_project(x):
    a = HALFSPACE_A.to(x)
    return x - a * (x * a).sum().sub(1.0).clamp_min(0) / a.pow(2).sum()


def _zero_mean(x, param=None):
    return x - x.mean()


def _uniform(g, s, d, low, high):
    return low + (high - low) * torch.rand(s, generator=g, dtype=d)


def _in_ball(g, s, d, radius, p=2):
    y = torch.randn(s, generator=g, dtype=d)
    norm = y.abs().sum() if p == 1 else y.norm()
    return y / norm * radius * float(torch.rand((), generator=g, dtype=d))


def _zero_centre(t):
    t = t.clone()
    t[..., 1, 1] = 0.0
    return t


def _in_unit_balls(g, s, d, radius, dims, p=2):
    y = torch.randn(s, generator=g, dtype=d)
    scale = torch.rand([1 if i in dims else n for i, n in enumerate(s)], generator=g, dtype=d)
    return y / torch.linalg.vector_norm(y, p, dim=dims, keepdim=True) * radius * scale


def _in_simplex(g, s, d, dim, radius):
    e = -torch.rand(s, generator=g, dtype=d).log()
    return e / e.sum(dim, keepdim=True) * radius


def _symmetric_centre_zero(g, s, d):
    a = torch.randn(s, generator=g, dtype=d)
    y = a + a.transpose(0, 1).flip(2, 3)
    y[..., 1, 1] = 0
    return y


def _tied_nonneg(g, s, d):
    return torch.rand(s[0], 2, generator=g, dtype=d)[:, TIED_LABELS]


def _mask_tied_feasible(g, s, d):
    y = torch.randn(s[0], 2, generator=g, dtype=d)[:, TIED_LABELS]
    for i in range(s[0]):  # a group with a held entry is held entirely
        for v in (0, 1):
            if not bool(NONLINEAR_MASK[i][TIED_LABELS == v].all()):
                y[i][TIED_LABELS == v] = 0
    return y


def _unit(x, dim):
    return x / x.norm(dim=dim, keepdim=True)


def _orthonormal(g, shape, dtype):
    """Orthonormal rows or columns (whichever fits) of the (shape[0], -1) view, from a QR."""
    rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64))
    return (q if rows >= cols else q.T).reshape(shape).to(dtype)


def _of_rank(g, shape, dtype, rank):
    left = torch.randn(shape[0], rank, generator=g, dtype=torch.float64)
    right = torch.randn(rank, int(torch.Size(shape[1:]).numel()), generator=g, dtype=torch.float64)
    return (left @ right).reshape(shape).to(dtype)


def _one_of_two_dim0(g, shape, dtype):
    """At most one non-zero in each pair of rows (1:2 sparsity along dim 0)."""
    x = torch.randn(shape, generator=g, dtype=dtype).view(shape[0] // 2, 2, *shape[1:])
    first = torch.rand(shape[0] // 2, 1, *shape[1:], generator=g) > 0.5
    keep = torch.cat([first, ~first], dim=1)
    return (x * keep).view(shape)


NONLINEAR_CASES: list[Case] = [
    Case(
        "Box",
        lambda: co.Box(-0.5, BOX_HIGH),
        (3, 4),
        lambda x: max(_relu_max(-0.5 - x), _relu_max(x - BOX_HIGH.to(x))),
        exact=True,
        convex=True,
        feasible=lambda g, s, d: _uniform(g, s, d, -0.5, BOX_HIGH.to(d)),
    ),
    Case(
        "Box-infinite-entries",
        lambda: co.Box(OPEN_LOW, OPEN_HIGH),
        (3, 4),
        lambda x: max(_relu_max(OPEN_LOW.to(x) - x), _relu_max(x - OPEN_HIGH.to(x))),
        exact=True,
        convex=True,
        feasible=lambda g, s, d: (torch.randn(s, generator=g, dtype=d) * 3).clamp(
            OPEN_LOW.to(d), OPEN_HIGH.to(d)
        ),
    ),
    Case(
        "NonNegative",
        lambda: co.NonNegative(),
        (2, 3, 3),
        lambda x: _relu_max(-x),
        exact=True,
        convex=True,
        feasible=lambda g, s, d: torch.rand(s, generator=g, dtype=d),
    ),
    Case(
        "NormBall-2",
        lambda: co.NormBall(2.0),
        (3, 4),
        lambda x: _ball_violation(x, 2.0, 2),
        convex=True,
        feasible=lambda g, s, d: _in_ball(g, s, d, 2.0),
    ),
    Case(
        "NormBall-2-dim",
        lambda: co.NormBall(1.5, dim=1),
        (4, 3, 2),
        lambda x: _ball_violation(x, 1.5, 2, (1,)),
        convex=True,
        feasible=lambda g, s, d: _in_unit_balls(g, s, d, 1.5, (1,)),
    ),
    Case(
        "NormBall-1",
        lambda: co.NormBall(2.0, p=1),
        (3, 5),
        lambda x: _ball_violation(x, 2.0, 1),
        convex=True,
        feasible=lambda g, s, d: _in_ball(g, s, d, 2.0, p=1),
    ),
    Case(
        "NormBall-1-dims",
        lambda: co.NormBall(1.0, p=1, dim=(0, 2)),
        (3, 2, 4),
        lambda x: _ball_violation(x, 1.0, 1, (0, 2)),
        convex=True,
        feasible=lambda g, s, d: _in_unit_balls(g, s, d, 1.0, (0, 2), p=1),
    ),
    Case(
        "NormBall-inf",
        lambda: co.NormBall(0.7, p="inf"),
        (2, 5),
        lambda x: _ball_violation(x, 0.7, "inf"),
        exact=True,
        convex=True,
        feasible=lambda g, s, d: _uniform(g, s, d, -0.7, 0.7),
    ),
    Case(
        "MaxNorm",
        lambda: co.MaxNorm(1.0),
        (4, 2, 3),
        lambda x: _ball_violation(x, 1.0, 2, (1, 2)),
        convex=True,
        feasible=lambda g, s, d: _in_unit_balls(g, s, d, 1.0, (1, 2)),
    ),
    Case(
        "UnitNorm",
        lambda: co.UnitNorm(),
        (5, 3),
        lambda x: _sphere_violation(x, (1,)),
        feasible=lambda g, s, d: _unit(torch.randn(s, generator=g, dtype=d), 1),
    ),
    Case(
        "UnitNorm-dim0",
        lambda: co.UnitNorm(dim=0),
        (3, 4),
        lambda x: _sphere_violation(x, (0,)),
        feasible=lambda g, s, d: _unit(torch.randn(s, generator=g, dtype=d), 0),
    ),
    Case(
        "Simplex",
        lambda: co.Simplex(),
        (3, 5),
        lambda x: _simplex_violation(x, -1, 1.0),
        convex=True,
        feasible=lambda g, s, d: _in_simplex(g, s, d, -1, 1.0),
    ),
    Case(
        "Simplex-dim0",
        lambda: co.Simplex(dim=0, radius=2.0),
        (4, 3),
        lambda x: _simplex_violation(x, 0, 2.0),
        convex=True,
        feasible=lambda g, s, d: _in_simplex(g, s, d, 0, 2.0),
    ),
    Case(
        "Orthogonal-wide",
        lambda: co.Orthogonal(),
        (3, 5),
        _orth_violation,
        rtol=1e-5,
        tangent_violation=_orth_tangent_violation,
        feasible=lambda g, s, d: _orthonormal(g, s, d),
    ),
    Case(
        "Orthogonal-tall",
        lambda: co.Orthogonal(),
        (6, 1, 2),
        _orth_violation,
        rtol=1e-5,
        tangent_violation=_orth_tangent_violation,
        feasible=lambda g, s, d: _orthonormal(g, s, d),
    ),
    Case(
        "Orthogonal-conv",
        lambda: co.Orthogonal(),
        (4, 2, 3, 3),
        _orth_violation,
        rtol=1e-5,
        tangent_violation=_orth_tangent_violation,
        feasible=lambda g, s, d: _orthonormal(g, s, d),
    ),
    Case(
        "LowRank",
        lambda: co.LowRank(2),
        (5, 4),
        lambda x: _rank_violation(x, 2),
        rtol=1e-5,
        feasible=lambda g, s, d: _of_rank(g, s, d, 2),
    ),
    Case(
        "LowRank-conv",
        lambda: co.LowRank(1),
        (3, 2, 2, 2),
        lambda x: _rank_violation(x, 1),
        rtol=1e-5,
        feasible=lambda g, s, d: _of_rank(g, s, d, 1),
    ),
    Case(
        "NMSparsity-fixed",
        lambda: co.NMSparsity(2, 4),
        (3, 8),
        lambda x: _nm_violation(x, 2, 4),
        exact=True,
        linear=True,
        convex=True,
        feasible=_nm_first,
    ),
    Case(
        "NMSparsity-free-dim0",
        lambda: co.NMSparsity(1, 2, dim=0, fixed=False),
        (4, 3),
        lambda x: _nm_violation(x, 1, 2, 0),
        exact=True,
        feasible=lambda g, s, d: _one_of_two_dim0(g, s, d),
    ),
    Case(
        "Projection-halfspace",
        lambda: co.Projection(_halfspace_project, name="halfspace"),
        (2, 3),
        lambda x: _relu_max((x * HALFSPACE_A.to(x)).sum() - 1.0),
        convex=True,
        feasible=lambda g, s, d: _halfspace_project(torch.randn(s, generator=g, dtype=d) - HALFSPACE_A.to(d)),
    ),
    Case(
        "Projection-zero-mean",
        lambda: co.Projection(_zero_mean, _zero_mean),
        (3, 4),
        lambda x: abs(float(x.double().mean())),
        linear=True,
        convex=True,
        feasible=lambda g, s, d: _zero_mean(torch.randn(s, generator=g, dtype=d)),
    ),
    Case(
        "Intersection-mask-box",
        lambda: co.Mask(MASK) & co.Box(-1.0, 1.0),
        (4, 2, 3),
        lambda x: max(_max(x[..., ~MASK]), _relu_max(x.abs() - 1.0)),
        exact=True,
        convex=True,
        feasible=lambda g, s, d: _uniform(g, s, d, -1.0, 1.0) * MASK,
    ),
    Case(
        "Intersection-symmetric-fixed",
        lambda: co.Symmetric(flip=(2, 3)) & co.Fixed((..., 1, 1), 0.0),
        (3, 3, 3, 3),
        lambda x: max(_sym_violation(x, (0, 1), (2, 3)), _max(x[..., 1, 1])),
        exact=True,
        linear=True,
        convex=True,
        feasible=_symmetric_centre_zero,
    ),
    Case(
        "Intersection-mask-tied",
        lambda: co.Intersection(co.Mask(NONLINEAR_MASK), co.Tied(TIED_LABELS)),
        (3, 2, 2),
        lambda x: max(_max(x[~NONLINEAR_MASK]), _tied_violation(x, TIED_LABELS)),
        exact=True,
        linear=True,
        convex=True,
        feasible=_mask_tied_feasible,
    ),
    Case(
        "Intersection-subspace-fixed",
        lambda: co.Subspace(SUBSPACE_ROWS) & co.Fixed(HELD_ENDS, 0.0),
        (2, 3),
        lambda x: max(_in_span(x, SUBSPACE_ROWS), _max(x[HELD_ENDS])),
        linear=True,
        convex=True,
        feasible=lambda g, s, d: (
            torch.randn(2, 1, generator=g, dtype=d) * torch.tensor([[0.0, 1, 1], [1, 1, 0]], dtype=d)
        ),
    ),
    Case(
        "Intersection-tied-nonnegative",
        lambda: co.Tied(TIED_LABELS) & co.NonNegative(),
        (3, 2, 2),
        lambda x: max(_relu_max(-x), _tied_violation(x, TIED_LABELS)),
        convex=True,
        feasible=_tied_nonneg,
    ),
    Case(
        "Intersection-maxnorm-centre",
        lambda: co.MaxNorm(1.0) & co.Fixed((..., 1, 1), 0.0),
        (4, 2, 3, 3),
        lambda x: max(_ball_violation(x, 1.0, 2, (1, 2, 3)), _max(x[..., 1, 1])),
        convex=True,
        feasible=lambda g, s, d: _zero_centre(_in_unit_balls(g, s, d, 1.0, (1, 2, 3))),
    ),
    Case(
        "Intersection-ball-mask",
        lambda: co.NormBall(2.0) & co.Mask(MASK),
        (4, 2, 3),
        lambda x: max(_ball_violation(x, 2.0, 2), _max(x[..., ~MASK])),
        convex=True,
        feasible=lambda g, s, d: _in_ball(g, s, d, 2.0) * MASK,
    ),
    Case(
        "Intersection-ball-box",
        lambda: co.NormBall(2.0) & co.Box(0.0, 1.0),
        (3, 4),
        lambda x: max(_ball_violation(x, 2.0, 2), _relu_max(-x), _relu_max(x - 1.0)),
        convex=True,
        feasible=lambda g, s, d: _in_ball(g, s, d, 2.0).abs().clamp_max(1.0),
    ),
]

CASES = LINEAR_CASES + NONLINEAR_CASES
