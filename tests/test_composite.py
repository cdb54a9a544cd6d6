"""`Intersection` (one exact pass, one merged linear projection, Dykstra) against closed forms,
null-space projectors and scipy's QP solver; `Projection` (a user's own set) and its audit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import constrained_optim as co
from constrained_optim.constraints import composite
from constrained_optim.constraints.composite import (
    AlternatingLinear,
    ExplicitLinear,
    IntersectionBound,
    InTurn,
    Joined,
)

TIED = torch.tensor([[0, 1], [1, 0]])
MASK = torch.tensor(
    [[[True, False], [True, True]], [[False, True], [True, True]], [[True, True], [True, True]]]
)


def bound_of(constraint, shape, dtype=torch.float64, value=None):
    param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype) if value is None else value.clone())
    return constraint.bind(param, "w")


def projected(bound, x):
    y = x.clone()
    with torch.no_grad():
        bound.project_(y)
    return y


def nearest_by_qp(x: np.ndarray, constraints, start=None) -> np.ndarray:
    start = np.zeros_like(x) if start is None else start
    res = minimize(
        lambda y: ((y - x) ** 2).sum(),
        start,
        jac=lambda y: 2 * (y - x),
        constraints=constraints,
        method="SLSQP",
        options={"ftol": 1e-10, "maxiter": 1000},
    )
    assert res.success, res.message
    return res.x


def null_space_projector(rows: list[np.ndarray], n: int) -> np.ndarray:
    """``I - C^+ C``: the orthogonal projector onto ``{z : C z = 0}``."""
    c = np.stack(rows) if rows else np.zeros((0, n))
    return np.eye(n) - np.linalg.pinv(c) @ c


def tied_rows(shape, labels):
    """``e_i - e_j`` for entries tied by ``labels`` (the trailing shape) in every leading index."""
    n = int(np.prod(shape))
    index = np.arange(n).reshape(shape).reshape(-1, labels.numel())
    lab = labels.flatten().numpy()
    rows = []
    for block in index:
        for v in np.unique(lab):
            members = block[lab == v]
            for j in members[1:]:
                r = np.zeros(n)
                r[members[0]], r[j] = 1, -1
                rows.append(r)
    return rows


def held_rows(held: np.ndarray):
    n = held.size
    return [np.eye(n)[i] for i in np.flatnonzero(held.reshape(-1))]


# -- one exact pass ------------------------------------------------------------------------------------
def test_two_masks_are_one_exact_pass():
    a, b = torch.rand(4, 5) > 0.3, torch.rand(4, 5) > 0.3
    bound = bound_of(co.Mask(a) & co.Mask(b), (4, 5), torch.float32)
    assert bound.traits.exact and len(bound.blocks) == 1 and isinstance(bound.blocks[0], InTurn)
    x = torch.randn(4, 5)
    assert torch.equal(projected(bound, x), x * (a & b))
    g = torch.randn(4, 5)
    bound.project_grad_(g_copy := g.clone(), x)
    assert torch.equal(g_copy, g * (a & b))


def test_mask_and_box_are_one_exact_pass_in_either_order():
    mask = torch.rand(3, 6) > 0.5
    x = torch.randn(3, 6) * 3
    expected = x.clamp(-1.0, 0.5) * mask
    for c in (co.Mask(mask) & co.Box(-1.0, 0.5), co.Box(-1.0, 0.5) & co.Mask(mask)):
        bound = bound_of(c, (3, 6), torch.float32)
        assert bound.traits.exact and bound.traits.elementwise
        assert torch.equal(projected(bound, x), expected)


def test_commuting_linear_sets_are_one_exact_pass():
    """Averaging the first two entries of each row commutes with holding the third: the two
    projections in turn are the projection onto the intersection."""
    basis = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    held = torch.tensor([False, False, True])
    bound = bound_of(co.Subspace(basis) & co.Fixed(held, 0.0), (4, 3))
    assert bound.one_pass and isinstance(bound.tangent, InTurn)
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = torch.stack(
        [(x[:, 0] + x[:, 1]) / 2, (x[:, 0] + x[:, 1]) / 2, torch.zeros(4, dtype=x.dtype)], 1
    )
    torch.testing.assert_close(projected(bound, x), expected, rtol=0, atol=1e-14)


# -- linear sets that do not commute -------------------------------------------------------------------
SIGN_FLIP = [lambda x: x, lambda x: -x.flip(-1)]  # x_i = -x_{n-1-i}


def linear_cases():
    basis = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    held = torch.tensor([[True, False, False], [False, False, True]])
    labels = torch.tensor([[0, 0, 1], [2, 3, 3], [4, 4, 4]])
    return [
        (
            "mask-tied",
            co.Mask(MASK),
            co.Tied(TIED),
            (3, 2, 2),
            Joined,
            held_rows(~MASK.numpy()) + tied_rows((3, 2, 2), TIED),
        ),
        (
            "subspace-fixed",
            co.Subspace(basis),
            co.Fixed(held, 0.0),
            (2, 3),
            ExplicitLinear,
            held_rows(held.numpy()) + [np.kron(np.eye(2)[i], np.array([1.0, -1.0, 1.0])) for i in range(2)],
        ),
        (
            "symmetric-tied",
            co.Symmetric(),
            co.Tied(labels),
            (3, 3),
            Joined,
            [np.eye(9)[3 * i + j] - np.eye(9)[3 * j + i] for i in range(3) for j in range(i + 1, 3)]
            + tied_rows((3, 3), labels),
        ),
        (
            "signs-tied",
            co.Invariant(SIGN_FLIP),
            co.Tied(torch.tensor([0, 1, 0, 1])),
            (2, 4),
            Joined,
            [np.eye(8)[4 * r + i] + np.eye(8)[4 * r + 3 - i] for r in range(2) for i in range(2)]
            + tied_rows((2, 4), torch.tensor([0, 1, 0, 1])),
        ),
        (
            "odd-sign-cycle",
            co.Invariant(SIGN_FLIP),
            co.Tied(torch.tensor([0, 1, 1, 0])),
            (4,),
            Joined,
            [np.eye(4)[i] + np.eye(4)[3 - i] for i in range(2)] + tied_rows((4,), torch.tensor([0, 1, 1, 0])),
        ),
    ]


@pytest.mark.parametrize("name, a, b, shape, kind, rows", linear_cases(), ids=[c[0] for c in linear_cases()])
def test_non_commuting_linear_sets_project_exactly_onto_the_intersection(name, a, b, shape, kind, rows):
    """Set and gradient projections equal the null-space projector of the stacked constraints."""
    bound = bound_of(a & b, shape)
    assert isinstance(bound.tangent, kind) and bound.one_pass
    assert bound.traits.exact == (kind is Joined)  # bitwise only where entries are held and tied
    n = int(np.prod(shape))
    reference = null_space_projector(rows, n)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        np.testing.assert_allclose(
            projected(bound, x).numpy().reshape(-1), reference @ x.numpy().reshape(-1), atol=1e-10
        )
        g = x.clone()
        bound.project_grad_(g, x)
        np.testing.assert_allclose(g.numpy().reshape(-1), reference @ x.numpy().reshape(-1), atol=1e-10)


def test_joined_holds_and_ties_are_bitwise_in_float32():
    """Held values, zeros and ties come out exact, not to rounding, however the sets overlap."""
    held = torch.zeros(3, 3, dtype=torch.bool)
    held[0, 2] = True  # ties to (2, 0) by symmetry, and to (0, 0), (0, 1) by the labels
    constraint = (
        co.Fixed(held, 0.3) & co.Tied(torch.tensor([[0, 0, 0], [1, 2, 3], [4, 4, 5]])) & co.Symmetric()
    )
    bound = bound_of(constraint, (3, 3), torch.float32)
    assert isinstance(bound.tangent, Joined)
    y = projected(bound, torch.randn(3, 3))
    # (0, 2) is held; labels tie row 0 and (2, 0) with (2, 1); symmetry ties (1, 2) to (2, 1):
    # one component, held at 0.3, leaving only the diagonal entries (1, 1) and (2, 2) free
    free = torch.zeros(3, 3, dtype=torch.bool)
    free[1, 1] = free[2, 2] = True
    assert bool((y[~free] == torch.tensor(0.3)).all())
    assert bool((y[free] != torch.tensor(0.3)).all())
    g = torch.randn(3, 3)
    bound.project_grad_(g, y)
    assert bool((g[0] == 0).all()) and torch.equal(g, g.T)


def test_joined_conflicting_values_are_an_empty_intersection():
    held_a = torch.tensor([True, False, False])
    held_b = torch.tensor([False, False, True])
    bound = bound_of(co.Fixed(held_a, 1.0) & co.Fixed(held_b, 3.0) & co.Tied(torch.tensor([0, 0, 0])), (3,))
    y = projected(bound, torch.zeros(3, dtype=torch.float64))
    assert float(torch.linalg.vector_norm(bound.residual(y))) > 1.0


def test_non_commuting_affine_sets_land_on_the_nearest_point():
    """``Fixed`` with values and ``Tied``: the affine intersection, nearest point by brute force."""
    held = torch.tensor([[True, False], [False, False]])
    bound = bound_of(co.Fixed(held, 2.0) & co.Tied(torch.tensor([[0, 0], [1, 1]])), (2, 2))
    x = torch.tensor([[0.0, 1.0], [3.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(
        projected(bound, x), torch.tensor([[2.0, 2.0], [4.0, 4.0]], dtype=torch.float64)
    )
    assert float(torch.linalg.vector_norm(bound.residual(projected(bound, x)))) == 0.0
    # the same set through the explicit path (an affine span that is not a tying)
    offset_bound = bound_of(
        co.Affine(torch.tensor([[1.0, 1.0]]), torch.tensor([0.0, 1.0]))
        & co.Fixed(torch.tensor([True, False]), 2.0),
        (2,),
    )
    assert isinstance(offset_bound.tangent, ExplicitLinear)
    torch.testing.assert_close(
        projected(offset_bound, torch.zeros(2, dtype=torch.float64)),
        torch.tensor([2.0, 3.0], dtype=torch.float64),
    )


def test_large_non_commuting_linear_sets_alternate_to_tolerance(monkeypatch):
    monkeypatch.setattr(composite, "EXPLICIT_MAX", 0)
    basis = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    held = torch.tensor([[True, False, False], [False, False, True]])
    bound = bound_of(co.Subspace(basis) & co.Fixed(held, 0.0), (2, 3))
    assert isinstance(bound.tangent, AlternatingLinear)
    rows = held_rows(held.numpy()) + [np.kron(np.eye(2)[i], np.array([1.0, -1.0, 1.0])) for i in range(2)]
    reference = null_space_projector(rows, 6)
    x = torch.randn(2, 3, dtype=torch.float64)
    np.testing.assert_allclose(
        projected(bound, x).numpy().reshape(-1), reference @ x.numpy().reshape(-1), atol=1e-12
    )


# -- a ball or sphere with cones: one exact pass ------------------------------------------------------
def _conv_centre():
    held = torch.zeros(4, 3, 3, 3, dtype=torch.bool)
    held[..., 1, 1] = True
    return held


CONE_CASES = [
    ("maxnorm-fixed0", lambda: co.MaxNorm(0.7) & co.Fixed((..., 1, 1), 0.0), (4, 3, 3, 3)),
    ("fixed0-maxnorm", lambda: co.Fixed((..., 1, 1), 0.0) & co.MaxNorm(0.7), (4, 3, 3, 3)),
    (
        "maxnorm-mask",
        lambda: co.MaxNorm(0.5) & co.Mask(torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.4),
        (5, 6),
    ),
    ("ball-nonneg", lambda: co.NormBall(1.0) & co.NonNegative(), (7,)),
    (
        "ball-nonneg-mask",
        lambda: co.NormBall(0.8, dim=1) & co.NonNegative() & co.Mask(torch.tensor([True, False, True, True])),
        (3, 4),
    ),
    (
        "maxnorm-fixed-mask",
        lambda: co.MaxNorm(0.3) & co.Mask(torch.tensor([True, True, False, True])) & co.Fixed((..., 0), 0.0),
        (3, 4),
    ),
]


def _dykstra_reference(bound, x):
    """Dykstra's algorithm run to convergence on the same members, one block each."""
    blocks = [InTurn([m]) for m in bound.members]
    y = x.clone()
    composite.dykstra_(y, blocks, max_iter=20000, tol=1e-15)
    return y


@pytest.mark.parametrize("name, make, shape", CONE_CASES, ids=[c[0] for c in CONE_CASES])
def test_a_ball_with_cones_is_one_pass_and_dykstras_limit(name, make, shape):
    bound = bound_of(make(), shape)
    assert bound.one_pass and isinstance(bound.blocks[0], composite.ConeThenScale)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.05, 3.0):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        y = projected(bound, x)
        torch.testing.assert_close(y, _dykstra_reference(bound, x), rtol=0, atol=1e-10)
        for m in bound.members:  # on every member set; held zeros and signs exactly
            if m.traits.elementwise:
                assert torch.equal(projected(m, y), y)
        assert float(torch.linalg.vector_norm(bound.residual(y))) < 1e-12


def test_a_ball_with_a_mask_matches_brute_force():
    mask = torch.tensor([True, False, True, True, False])
    bound = bound_of(co.NormBall(1.0) & co.Mask(mask), (5,))
    x = torch.tensor([2.0, 5.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    ref = nearest_by_qp(
        x.numpy(),
        [
            {"type": "ineq", "fun": lambda v: 1 - (v**2).sum(), "jac": lambda v: -2 * v},
            {"type": "eq", "fun": lambda v: v[~mask.numpy()], "jac": lambda v: np.eye(5)[~mask.numpy()]},
        ],
    )
    np.testing.assert_allclose(projected(bound, x).numpy(), ref, atol=1e-6)


def test_unit_norm_with_a_mask_is_one_pass_and_fills_zero_units_on_free_entries():
    mask = torch.tensor([[True, False, True, True], [False, True, True, False], [True, True, False, False]])
    bound = bound_of(co.UnitNorm() & co.Mask(mask), (3, 4), torch.float32)
    assert bound.one_pass and isinstance(bound.blocks[0], composite.ConeThenScale)
    x = torch.randn(3, 4)
    x[1] = x[1] * (~mask[1])  # only held entries: every free point of the sphere is as near
    y = projected(bound, x)
    assert bool((y[~mask] == 0).all())
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(y[0], (x[0] * mask[0]) / (x[0] * mask[0]).norm())
    torch.testing.assert_close(y[1], mask[1].float() / 2**0.5)


def test_a_box_that_is_no_cone_or_a_sphere_with_signs_goes_to_dykstra():
    assert not bound_of(co.MaxNorm(1.0) & co.Box(-0.2, 0.9), (3, 4)).one_pass
    assert not bound_of(co.MaxNorm(1.0) & co.Fixed((..., 0), 0.5), (3, 4)).one_pass
    assert not bound_of(co.UnitNorm() & co.NonNegative(), (3, 4)).one_pass


# -- Dykstra ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_dykstra_finds_the_nearest_point_of_a_ball_and_a_box(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, generator=gen, dtype=torch.float64) * 2
    bound = bound_of(co.NormBall(1.5) & co.Box(-0.2, 0.9), (6,))
    y = projected(bound, x)
    ref = nearest_by_qp(
        x.numpy(),
        [
            {"type": "ineq", "fun": lambda v: 1.5**2 - (v**2).sum(), "jac": lambda v: -2 * v},
            {"type": "ineq", "fun": lambda v: v + 0.2, "jac": lambda v: np.eye(6)},
            {"type": "ineq", "fun": lambda v: 0.9 - v, "jac": lambda v: -np.eye(6)},
        ],
    )
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-6)
    assert float(torch.linalg.vector_norm(bound.residual(y))) < 1e-10


def test_dykstra_finds_the_nearest_point_of_a_ball_and_a_halfspace():
    a = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)

    def halfspace(x):  # {x : <a, x> >= 1}
        return x + a * (1 - (a * x).sum()).clamp(min=0) / (a * a).sum()

    bound = bound_of(co.NormBall(1.0) & co.Projection(halfspace), (4,))
    assert not bound.one_pass and not bound.traits.exact
    for x in ([0.0, -2.0, 1.0, 0.0], [2.0, -1.0, 0.5, 1.0]):
        x = torch.tensor(x, dtype=torch.float64)
        y = projected(bound, x)
        ref = nearest_by_qp(
            x.numpy(),
            [
                {"type": "ineq", "fun": lambda v: 1 - (v**2).sum(), "jac": lambda v: -2 * v},
                {"type": "ineq", "fun": lambda v: a.numpy() @ v - 1, "jac": lambda v: a.numpy()},
            ],
            start=(a / (a * a).sum()).numpy(),
        )
        np.testing.assert_allclose(y.numpy(), ref, atol=1e-6)
    # plain alternating projections reach the intersection, but not its nearest point, from the first
    alternating = torch.tensor([0.0, -2.0, 1.0, 0.0], dtype=torch.float64)
    for _ in range(500):
        alternating = halfspace(alternating * min(1.0, 1.0 / float(alternating.norm())))
    assert (
        float(
            (alternating - projected(bound, torch.tensor([0.0, -2.0, 1.0, 0.0], dtype=torch.float64))).norm()
        )
        > 0.1
    )


def test_tied_and_non_negative_is_the_clamped_group_mean():
    """Equal-weight groups: the nearest tied non-negative point sets each group to max(mean, 0)."""
    bound = bound_of(co.Tied(TIED) & co.NonNegative(), (3, 2, 2))
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    flat = x.reshape(3, 4)
    lab = TIED.flatten()
    expected = torch.stack([torch.stack([flat[:, lab == v].mean(1) for v in (0, 1)], 1)[:, lab]]).reshape(
        3, 2, 2
    )
    torch.testing.assert_close(projected(bound, x), expected.clamp_min(0), rtol=0, atol=1e-12)


# -- through the optimizer -------------------------------------------------------------------------------
def test_attaching_two_constraints_gives_their_intersection():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    mask = torch.rand(4, 6) > 0.4
    opt.attach("weight", co.Mask(mask)).attach("weight", co.Box(-0.05, 0.05))
    bound = opt.engine.bounds[model.weight]
    assert isinstance(bound, IntersectionBound) and bound.traits.exact
    assert "&" in repr(bound.constraint)
    x = torch.randn(8, 6)
    for _ in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        w = model.weight.detach()
        assert bool((w[~mask] == 0).all()) and bool((w.abs() <= torch.tensor(0.05)).all())
    assert opt.audit.last[0].residual == 0.0
    assert "&" in opt.audit.last[0].constraint


def test_a_second_attach_keeps_the_pattern_the_first_one_chose():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 8))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([p], lr=0.1))
    opt.attach(p, co.NMSparsity(2, 4))
    keep = p.detach() != 0
    opt.attach(p, co.NormBall(0.1))  # shrinks every entry: a new choice by magnitude could differ
    p.grad = torch.randn(2, 8)
    opt.step()
    assert torch.equal(p.detach() != 0, keep)
    state = opt.engine.bounds[p].state_tensors()
    assert set(state) == {"0.keep"} and torch.equal(state["0.keep"].bool(), keep)


def test_an_empty_intersection_is_reported_not_hidden():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([p], lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.attach(p, co.Fixed(torch.ones(3, dtype=torch.bool), 5.0) & co.Box(high=1.0))  # no error at attach
    p.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="off the set"):
        opt.step()
    record = opt.audit.last[0]
    assert record.residual == pytest.approx(4.0 * 3**0.5, rel=1e-6)  # |1 - 5| on each entry
    with pytest.raises(co.ConstraintViolation, match="distance"):
        opt.check()


def test_dykstra_short_of_convergence_shows_in_the_residual():
    bound = bound_of(co.Intersection(co.NormBall(1.0), co.Box(0.5, 2.0), max_iter=1), (3,))
    y = projected(bound, torch.tensor([3.0, 3.0, -1.0], dtype=torch.float64))
    assert float(torch.linalg.vector_norm(bound.residual(y))) > 1e-3


def test_dykstra_stops_at_once_on_non_finite_values():
    bound = bound_of(co.NormBall(1.0) & co.Box(0.0, 2.0), (3,))
    y = projected(bound, torch.tensor([float("nan"), 1.0, 2.0], dtype=torch.float64))
    assert bound.sweeps == 1 and bool(y.isnan().any())


def test_intersection_state_round_trips_and_rebuilds_its_plan():
    shape = (3, 2, 2)
    b1 = bound_of(co.Mask(MASK) & co.Tied(TIED), shape)
    b2 = bound_of(co.Mask(torch.ones(3, 2, 2, dtype=torch.bool)) & co.Tied(TIED), shape)
    b3 = b2.with_state({k: v.clone() for k, v in b1.state_tensors().items()})
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(projected(b3, x), projected(b1, x), rtol=0, atol=1e-14)
    assert not torch.equal(projected(b2, x), projected(b1, x))  # b2 itself is as it was
    bad = {k: v.clone() for k, v in b1.state_tensors().items()}
    bad["0.keep"].view(-1)[0] = 3
    assert b1.check_state(bad) == (False, "0 (Mask(10/12 free)): keep must hold only 0 and 1")


# -- construction ------------------------------------------------------------------------------------------
def test_nesting_flattens_and_reads_as_the_operator():
    c = (co.Mask(torch.ones(3, dtype=torch.bool)) & co.Box(0, 1)) & co.NonNegative()
    assert len(c.constraints) == 3
    assert repr(c) == "Mask(3/3 free) & Box(low=0.0, high=1.0) & NonNegative()"
    assert (
        c.linear is False
        and (co.Mask(torch.ones(3, dtype=torch.bool)) & co.Tied(torch.zeros(3, dtype=torch.long))).linear
    )


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((), {}, "at least one"),
        ((co.Box(0, 1), "box"), {}, "members must be constraints"),
        ((co.Box(0, 1),), {"max_iter": 0}, "max_iter"),
        ((co.Box(0, 1),), {"tol": 0.0}, "tol"),
    ],
)
def test_bad_intersections_raise(args, kwargs, match):
    with pytest.raises(co.ConstraintError, match=match):
        co.Intersection(*args, **kwargs)


# -- Projection ---------------------------------------------------------------------------------------------
def test_a_wrong_user_projection_shows_in_the_audit():
    """``x / 2`` is not a projection (not idempotent): re-projecting moves the point again."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([p], lr=0.1))
    opt.attach(p, co.Projection(lambda x: x / 2, name="halve"))
    p.grad = torch.zeros(4)
    with pytest.warns(RuntimeWarning, match="off the set"):
        opt.step()
    record = opt.audit.last[0]
    assert record.constraint == "Projection(halve)"
    assert record.residual == pytest.approx(float(p.detach().norm()) / 2)


def test_a_right_user_projection_is_exact_and_may_spoil_its_input():
    def clamp_in_place(x):  # modifies its argument: the library hands it a spare tensor
        return x.clamp_(-1, 1)

    p = torch.nn.Parameter(torch.tensor([3.0, -0.5, -2.0]))
    bound = co.Projection(clamp_in_place).bind(p, "p")
    x = torch.tensor([5.0, 0.0, -5.0])
    gap = bound.gap(x)
    assert x.tolist() == [5.0, 0.0, -5.0] and gap.tolist() == [4.0, 0.0, -4.0]
    opt = co.ConstrainedOptimizer(torch.optim.SGD([p], lr=0.1)).attach(p, co.Projection(clamp_in_place))
    p.grad = torch.tensor([-100.0, 1.0, 0.0])
    opt.step()
    assert p.detach().tolist() == [1.0, -0.6000000238418579, -1.0]
    assert opt.audit.last[0].residual == 0.0


def test_user_gradient_projection_is_used_for_gradients_and_momentum():
    def zero_mean(x, param=None):
        return x - x.mean()

    p = torch.nn.Parameter(torch.randn(5))
    inner = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    for _ in range(2):  # warm momentum with a non-zero mean
        inner.zero_grad()
        p.sum().backward()
        inner.step()
    opt = co.ConstrainedOptimizer(inner).attach(p, co.Projection(zero_mean, zero_mean))
    assert abs(float(inner.state[p]["momentum_buffer"].mean())) < 1e-6
    for _ in range(3):
        opt.zero_grad()
        (p.sum() * 3 + p.pow(2).sum()).backward()
        opt.step()
        assert abs(float(p.detach().mean())) < 1e-6
    assert opt.audit.last[0].grad_blocked > 0


def test_user_functions_that_fail_at_attach_change_nothing():
    p = torch.nn.Parameter(torch.randn(2, 3))
    inner = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.randn(2, 3)
    inner.step()
    before = p.detach().clone()
    state = {k: v.clone() for k, v in inner.state[p].items()}
    opt = co.ConstrainedOptimizer(inner)

    def boom(x):
        raise RuntimeError("cannot")

    with pytest.raises(co.ConstraintError, match=r"\(shape \(2, 3\).*failed.*cannot"):
        opt.attach(p, co.Projection(boom))
    with pytest.raises(
        co.ConstraintError, match=r"returned shape \(3,\), expected a tensor of shape \(2, 3\)"
    ):
        opt.attach(p, co.Projection(lambda x: x[0]))
    with pytest.raises(co.ConstraintError, match="project_grad"):
        opt.attach(p, co.Projection(lambda x: x, lambda g, x: None))
    with pytest.raises(co.ConstraintError, match="callable"):
        co.Projection(3)
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(inner.state[p][k], v) for k, v in state.items())
    assert not opt.engine.bounds
