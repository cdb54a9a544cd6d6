"""Odd input to the families: non-finite arguments refused at construction, zero-size and 0-d
parameters, stored-transposed parameters, repairs of non-finite tensors, checkpoint data that must
be refused, and the `Orthogonal` tangent point that no write can fool."""

from __future__ import annotations

import math

import pytest
import torch

import constrained_optim as co
from constrained_optim.constraints.manifolds import polar_factor, stiefel_tangent_

INF, NAN = math.inf, math.nan


def param(shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(shape, dtype=dtype))


def projected(bound, x):
    y = x.clone()
    with torch.no_grad():
        bound.project_(y)
    return y


# -- refused at construction ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: co.Box(torch.tensor(NAN), 1.0), "low has NaN"),
        (lambda: co.Box(None, torch.tensor([0.0, NAN])), "high has NaN"),
        (lambda: co.Fixed((..., 1), NAN), "value is not finite"),
        (lambda: co.Fixed((..., 1), INF), "value is not finite"),
        (lambda: co.Fixed((..., 1), torch.tensor([1.0, NAN])), "value has non-finite"),
        (lambda: co.Fixed((..., 1), torch.tensor([INF])), "value has non-finite"),
        (lambda: co.Affine(torch.ones(1, 2), torch.tensor([0.0, INF])), "offset has non-finite"),
        (lambda: co.Affine(torch.ones(1, 2), torch.tensor([NAN, 0.0])), "offset has non-finite"),
        (lambda: co.Subspace(torch.tensor([[1.0, INF]])), "basis has non-finite"),
        (lambda: co.Subspace(torch.tensor([[NAN, 1.0]])), "basis has non-finite"),
        (lambda: co.MaxNorm(NAN), "max_value must be a positive"),
        (lambda: co.NormBall(INF), "finite"),
        (lambda: co.Symmetric(dims=(0, 1, 2)), "pair"),
    ],
    ids=lambda v: None,
)
def test_non_finite_and_malformed_arguments_are_refused(make, match):
    with pytest.raises(co.ConstraintError, match=match):
        make()


def test_infinite_box_bounds_are_no_bound_and_round_trip():
    box = co.Box(torch.tensor([-INF, 0.0, -1.0]), torch.tensor(INF))
    bound = box.bind(param(3), "w")
    x = torch.tensor([-5.0, -5.0, -5.0])
    assert projected(bound, x).tolist() == [-5.0, 0.0, -1.0]
    data = bound.state_tensors()
    assert set(data) == {"low"} and bound.check_state(data) == (True, "")
    assert torch.equal(bound.with_state(data).low, data["low"])
    bad = {"low": torch.tensor([NAN, 0.0, 0.0])}
    assert not bound.check_state(bad)[0]


# -- zero-size and odd parameters ------------------------------------------------------------------
@pytest.mark.parametrize(
    "constraint, shape",
    [
        (co.Tied(torch.zeros(0, dtype=torch.long)), (0,)),
        (co.Tied(torch.tensor([[0, 1], [1, 0]])), (0, 2, 2)),
        (co.Subspace(torch.ones(2, 0)), (0,)),
        (co.Subspace(torch.ones(1, 3)), (0, 3)),
        (co.Affine(torch.ones(1, 3), torch.ones(3)), (0, 3)),
        (co.NormBall(1.0, p=1), (0, 3)),
        (co.NormBall(1.0, p=1, dim=1), (2, 0)),
        (co.NormBall(1.0), (0, 3)),
        (co.Simplex(), (0, 3)),
        (co.Invariant.rotations(), (0, 3, 3)),
        (co.Mask(torch.ones(0, 3, dtype=torch.bool)), (0, 3)),
        (co.Box(-1.0, 1.0), (0,)),
    ],
    ids=repr,
)
def test_a_zero_size_parameter_is_its_own_projection(constraint, shape):
    bound = constraint.bind(param(shape), "w")
    x = torch.randn(shape)
    assert projected(bound, x).shape == shape
    g = torch.randn(shape)
    bound.project_grad_(g, x)
    assert bound.gap(x).shape == shape
    assert bound.with_state(bound.state_tensors()) is not bound


def test_a_fixed_tensor_index_out_of_range_is_refused_at_bind():
    with pytest.raises(co.ConstraintError, match=r"w \(shape \(3, 3\).*dim 0 is out of range"):
        co.Fixed((torch.tensor([0, 7]),), 0.0).bind(param((3, 3)), "w")


def test_fixed_on_a_0d_parameter():
    bound = co.Fixed(torch.tensor(True), 2.5).bind(torch.nn.Parameter(torch.tensor(1.0)), "scale")
    assert float(projected(bound, torch.tensor(-4.0))) == 2.5
    g = torch.tensor(3.0)
    bound.project_grad_(g, g)
    assert float(g) == 0.0
    assert bound.with_state(bound.state_tensors()).index == bound.index
    free = co.Fixed(torch.tensor(False), 2.5).bind(torch.nn.Parameter(torch.tensor(1.0)), "scale")
    assert float(projected(free, torch.tensor(-4.0))) == -4.0


def test_symmetric_accepts_an_int_flip():
    c = co.Symmetric(flip=2)
    assert c.flip == (2,) and c.same_as(co.Symmetric(flip=(2,)))
    y = projected(c.bind(param((3, 3, 4)), "w"), torch.randn(3, 3, 4))
    assert torch.equal(y, y.transpose(0, 1).flip(2))


def test_symmetric_on_a_parameter_stored_transposed_and_a_transposed_gradient():
    p = torch.nn.Parameter(torch.randn(5, 5).t())  # not contiguous; its transpose is
    bound = co.Symmetric().bind(p, "w")
    with torch.no_grad():
        bound.project_(p)
        assert torch.equal(p, p.T) and not p.is_contiguous()
        g = torch.randn(5, 5).t()
        bound.project_grad_(g, p)
        assert torch.equal(g, g.T)
        v = torch.rand(5, 5).t()
        bound.project_scale_(v)
        assert torch.equal(v, v.T)
    flip = co.Symmetric(dims=(0, 1), flip=(2, 3)).bind(torch.nn.Parameter(torch.randn(3, 3, 2, 2)), "k")
    x = torch.randn(3, 3, 2, 2).permute(1, 0, 3, 2)  # T(x) is x's own memory, contiguous
    y = projected(flip, x)
    assert torch.equal(y, y.transpose(0, 1).flip(2, 3))


def test_an_invariant_map_returning_integers_is_refused_naming_the_dtype():
    with pytest.raises(co.ConstraintError, match=r"w \(shape \(2, 2\).*torch.int64"):
        co.Invariant([lambda x: x, lambda x: x.long()]).bind(param((2, 2)), "w")


# -- repairs of non-finite tensors -------------------------------------------------------------------
def held_bound(kind):
    keep = torch.tensor([[True, False, True, False]])
    shape = (2, 4)
    if kind == "mask":
        return co.Mask(keep).bind(param(shape), "w"), ~keep.expand(shape)
    if kind == "fixed":
        return co.Fixed(~keep, 3.0).bind(param(shape), "w"), ~keep.expand(shape)
    if kind == "nm":
        p = torch.nn.Parameter(torch.tensor([[5.0, 0.1, 4.0, 0.2], [0.1, 5.0, 0.2, 4.0]]))
        return co.NMSparsity(2, 4).bind(p, "w"), p.detach().abs() < 1
    if kind == "intersection":
        return (co.Mask(keep) & co.NormBall(1.0)).bind(param(shape), "w"), ~keep.expand(shape)
    # held through the join: an odd sign cycle (x_i = -x_{n-1-i} and x_0 = x_3) pins entries 0, 3
    sign_flip = co.Invariant([lambda x: x, lambda x: -x.flip(-1)])
    return (sign_flip & co.Tied(torch.tensor([0, 1, 2, 0]))).bind(param((1, 4)), "w"), torch.tensor(
        [[True, False, False, True]]
    )


@pytest.mark.parametrize("kind", ["mask", "fixed", "nm", "intersection", "joined"])
def test_repair_zeros_held_entries_whatever_they_hold(kind):
    bound, held = held_bound(kind)
    t = torch.full(held.shape, INF)
    t[0, 0] = NAN
    t[~held] = 7.0
    bound.repair_(t)
    assert bool((t[held] == 0).all())
    assert bool((t[~held] == 7.0).all())


# -- checkpoint data ----------------------------------------------------------------------------------
def test_refused_data_names_what_is_wrong():
    tied = co.Tied(torch.tensor([0, 1, 1])).bind(param(3), "w")
    assert tied.check_state({"group_ids": torch.tensor([0, 2, 2])}) == (
        False,
        "group_ids must use every id from 0 to the largest",
    )
    assert tied.check_state({"group_ids": torch.tensor([0, -1, 1])})[1] == "group_ids must lie in [0, 3)"
    assert tied.check_state({"group_ids": torch.tensor([0, 1, 1], dtype=torch.int32)})[1] == (
        "group_ids of dtype torch.int32, expected torch.int64"
    )
    nm = co.NMSparsity(2, 4).bind(param((2, 4)), "w")
    ok, reason = nm.check_state({"keep": torch.ones(2, 4, dtype=torch.uint8)})  # 0/1, but 4 of 4 kept
    assert not ok and "at most 2 of every 4" in reason
    fixed = co.Fixed(torch.tensor([True, False, True]), 1.0).bind(param((2, 3)), "w")
    data = fixed.state_tensors()
    assert set(data) == {"values", "index0", "index1"}
    assert "dim 1" in fixed.check_state({**data, "index1": data["index1"] + 3})[1]
    sub = co.Subspace(torch.randn(2, 3)).bind(param((4, 3)), "w")
    assert sub.check_state({"basis": sub.basis * 1.01}) == (False, "basis must have orthonormal columns")
    affine = co.Affine(torch.tensor([[1.0, 1.0]]), torch.tensor([1.0, -1.0])).bind(param(2), "w")
    assert affine.check_state({"basis": affine.basis, "offset": torch.tensor([1.0, 1.0])}) == (
        False,
        "offset must be orthogonal to the basis",
    )
    box = co.Box(torch.zeros(3), torch.ones(3)).bind(param(3), "w")
    assert not box.check_state({"low": torch.full((3,), 2.0), "high": torch.ones(3)})[0]


def test_with_state_of_tied_recomputes_what_follows_from_the_labels():
    b1 = co.Tied(torch.tensor([0, 0, 1, 1])).bind(param(4), "w")
    b2 = co.Tied(torch.tensor([0, 1, 2, 3])).bind(param(4), "w")
    b3 = b2.with_state(b1.state_tensors())
    assert b3.n_groups == 2 and b2.n_groups == 4
    x = torch.tensor([1.0, 3.0, 5.0, 9.0])
    assert projected(b3, x).tolist() == [2.0, 2.0, 7.0, 7.0]
    assert torch.equal(projected(b2, x), x)


# -- same_as -------------------------------------------------------------------------------------------
def test_same_as_tells_different_constraints_apart():
    assert not co.Box(0, 1).same_as(co.Box(0, 2))
    assert not co.Invariant.rotations().same_as(co.Invariant.rotations(dims=(0, 1)))
    flips = co.Invariant([lambda x: x, lambda x: -x.flip(-1)])
    assert not flips.same_as(co.Invariant([lambda x: x, lambda x: x.flip(-1)]))
    assert not (co.Mask(torch.ones(3, dtype=torch.bool)) & co.Box(0, 1)).same_as(
        co.Mask(torch.ones(3, dtype=torch.bool)) & co.Box(0, 2)
    )
    assert (co.Mask(torch.ones(3, dtype=torch.bool)) & co.Box(0, 1)).same_as(
        co.Mask(torch.ones(3, dtype=torch.bool)) & co.Box(0, 1)
    )
    assert not co.NMSparsity(2, 4).same_as(co.NMSparsity(2, 4, dim=-1))


# -- Orthogonal: the tangent point is read from x ----------------------------------------------------
def test_orthogonal_tangent_point_cannot_be_fooled_by_data_writes():
    p = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
    bound = co.Orthogonal().bind(p, "w")
    with torch.no_grad():
        bound.project_(p)
    p.data.copy_(torch.randn(3, 5, dtype=torch.float64))  # off the manifold, version unchanged
    g = torch.randn(3, 5, dtype=torch.float64)
    pg = g.clone()
    bound.project_grad_(pg, p.detach())
    point = polar_factor(p.detach())
    ref = g.clone()
    stiefel_tangent_(ref, point)
    torch.testing.assert_close(pg, ref, rtol=0, atol=1e-12)


def test_orthogonal_fresh_bound_projects_gradients_bitwise_as_the_old_one():
    """After a checkpoint load a new bound sees the same parameter: same decision, same result."""
    p = torch.nn.Parameter(torch.randn(4, 6))
    old = co.Orthogonal().bind(p, "w")
    with torch.no_grad():
        old.project_(p)
    fresh = co.Orthogonal().bind(p, "w")
    g = torch.randn(4, 6)
    a, b = g.clone(), g.clone()
    old.project_grad_(a, p.detach())
    fresh.project_grad_(b, p.detach())
    assert torch.equal(a, b)
    # at a projected point the tangent at x and at its recomputed polar factor agree to rounding
    ref = g.clone()
    stiefel_tangent_(ref, polar_factor(p.detach()))
    assert float((a - ref).norm()) <= 32 * torch.finfo(torch.float32).eps * float(g.norm())


# -- intersections: traits from the members -----------------------------------------------------------
def test_intersection_traits_follow_from_members_and_plan():
    mask = torch.tensor([True, False, True, True])
    t = (co.Mask(mask) & co.Box(-1, 1)).bind(param(4), "w").traits
    assert t.exact and t.elementwise and t.convex and not t.linear and t.projects_grad
    t = (co.Mask(mask) & co.Tied(torch.tensor([0, 0, 1, 1]))).bind(param(4), "w").traits
    assert t.exact and t.linear and t.reduces is None
    t = (co.Subspace(torch.randn(2, 4)) & co.Fixed(mask, 0.0)).bind(param(4), "w").traits
    assert t.linear and not t.exact
    t = (co.NormBall(1.0) & co.Box(0, 1)).bind(param(4), "w").traits
    assert t.convex and not (t.exact or t.linear or t.projects_grad)
    t = (co.UnitNorm() & co.Box(0, 1)).bind(param((2, 4)), "w").traits
    assert not t.convex
    single = co.Intersection(co.MaxNorm(1.0)).bind(param((3, 4)), "w").traits
    assert single.reduces == (1,) and single.via_norms and single.convex
