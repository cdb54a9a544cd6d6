"""The contract every constraint keeps, run over every case in `cases.py`.

Membership is judged by each case's ``violation``, written from the set's definition; the
projection of linear sets is compared with the orthogonal projector computed by brute force
from independently drawn points of the set.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import constrained_optim as co
from constrained_optim.constraints.base import Bound, GapSize

from cases import CASES, Case

DTYPES = [torch.float32, torch.float64]
IDS = [c.id for c in CASES]


def tol(dtype, scale=1.0):
    return 64 * torch.finfo(dtype).eps * max(1.0, scale)


def bound_for(case: Case, dtype, shape=None):
    param = torch.nn.Parameter(torch.zeros(shape or case.shape, dtype=dtype))
    return case.make().bind(param, "p"), param


def projected(bound, x):
    y = x.clone()
    with torch.no_grad():
        bound.project_(y)
    return y


def random_points(case, dtype, k, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(case.shape, generator=gen, dtype=dtype) * scale for _ in range(k)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_projection_lands_in_the_set_and_is_idempotent(case, dtype):
    bound, _ = bound_for(case, dtype)
    for x in random_points(case, dtype, 5):
        y = projected(bound, x)
        assert case.violation(y) <= tol(dtype, float(y.abs().max())), case.violation(y)
        if case.exact:
            assert case.violation(y) == 0.0
        z = projected(bound, y)
        torch.testing.assert_close(z, y, rtol=tol(dtype), atol=tol(dtype, float(y.abs().max())))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gap_is_x_minus_projection(case, dtype):
    bound, _ = bound_for(case, dtype)
    for x in random_points(case, dtype, 3):
        torch.testing.assert_close(bound.gap(x), x - projected(bound, x), rtol=0, atol=tol(dtype, 3))


MEASURED = [c for c in CASES if bound_for(c, torch.float32)[0].traits.measured_projection]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MEASURED, ids=[c.id for c in MEASURED])
def test_measured_projection_is_the_projection_and_measures_its_gap(case, dtype):
    bound, _ = bound_for(case, dtype)
    for x in random_points(case, dtype, 3):
        y = x.clone()
        with torch.no_grad():
            closed = bound.project_measured_(y, torch.empty_like(y))
        assert torch.equal(y, projected(bound, x))  # bit for bit what project_ does
        gap = (x - projected(bound, x)).double()
        if isinstance(closed, GapSize):
            norm, largest = float(closed.norm), float(closed.max)
        else:
            norm, largest = float(closed.double().norm()), float(closed.abs().max())
        scale = float(x.abs().max())
        assert norm == pytest.approx(float(gap.norm()), rel=1e-5, abs=tol(dtype, scale))
        assert largest == pytest.approx(float(gap.abs().max()), rel=1e-5, abs=tol(dtype, scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_feasible_points_are_fixed_points(case, dtype):
    if case.feasible is None:
        pytest.skip(f"{case.id}: no independent sampler of the set")
    bound, _ = bound_for(case, dtype)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        y = case.feasible(gen, case.shape, dtype)
        assert case.violation(y) <= tol(dtype, float(y.abs().max()))
        torch.testing.assert_close(projected(bound, y), y, rtol=tol(dtype), atol=tol(dtype, 3))


def brute_force_projector(case: Case, dtype):
    """``P(x) = y0 + B B^T (x - y0)`` with ``B`` an orthonormal basis of ``span{y_i - y0}`` for
    points ``y_i`` drawn from the set (enough of them to span it)."""
    gen = torch.Generator().manual_seed(2)
    ys = [case.feasible(gen, case.shape, torch.float64).flatten() for _ in range(96)]
    y0 = ys[0]
    diffs = torch.stack([y - y0 for y in ys[1:]], dim=1)
    u, s, _ = torch.linalg.svd(diffs, full_matrices=False)
    basis = u[:, : int((s > s[0] * 1e-10).sum())] if s.numel() and s[0] > 0 else u[:, :0]
    return lambda x: (y0 + basis @ (basis.T @ (x.double().flatten() - y0))).view(case.shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c.linear], ids=[c.id for c in CASES if c.linear])
def test_linear_projection_is_the_orthogonal_projector(case, dtype):
    """Equal to the brute-force projector; its linear part is symmetric and idempotent."""
    bound, _ = bound_for(case, dtype)
    reference = brute_force_projector(case, dtype)
    for x in random_points(case, dtype, 4):
        torch.testing.assert_close(projected(bound, x), reference(x), rtol=1e-5, atol=tol(dtype, 30))
    n = int(torch.Size(case.shape).numel())
    bound64, _ = bound_for(case, torch.float64)
    origin = projected(bound64, torch.zeros(case.shape, dtype=torch.float64))
    eye = torch.eye(n, dtype=torch.float64)
    columns = [(projected(bound64, e.view(case.shape)) - origin).flatten() for e in eye]
    matrix = torch.stack(columns, dim=1)
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix @ matrix, matrix, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c.linear], ids=[c.id for c in CASES if c.linear])
def test_gradient_projection_is_orthogonal_onto_the_tangent_space(case, dtype):
    """A feasible point moved along a projected gradient stays feasible; the removed part is
    orthogonal to what is kept, and the projection equals the projector's linear part."""
    bound, param = bound_for(case, dtype)
    gen = torch.Generator().manual_seed(3)
    x = (
        case.feasible(gen, case.shape, dtype)
        if case.feasible
        else projected(bound, torch.randn(case.shape, dtype=dtype))
    )
    origin = projected(bound, torch.zeros(case.shape, dtype=dtype))
    for g in random_points(case, dtype, 3, seed=4):
        pg = g.clone()
        with torch.no_grad():
            bound.project_grad_(pg, x)
        assert case.violation(x + pg) <= tol(dtype, 10)
        assert abs(float(((g - pg) * pg).sum())) <= tol(dtype, float(g.norm() ** 2))
        torch.testing.assert_close(pg, projected(bound, g) - origin, rtol=1e-5, atol=tol(dtype, 10))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c.convex], ids=[c.id for c in CASES if c.convex])
def test_convex_projection_is_nearest_and_non_expansive(case, dtype):
    bound, _ = bound_for(case, dtype)
    gen = torch.Generator().manual_seed(5)
    ys = (
        [case.feasible(gen, case.shape, dtype) for _ in range(8)]
        if case.feasible
        else [projected(bound, x) for x in random_points(case, dtype, 8, seed=6)]
    )
    xs = random_points(case, dtype, 6, seed=7)
    for x in xs:
        px = projected(bound, x)
        for y in ys:  # <x - P(x), y - P(x)> <= 0 for every y in the set
            assert float(((x - px) * (y - px)).sum()) <= tol(dtype, float(x.norm() * y.norm()))
    for x, z in zip(xs, xs[1:]):
        assert float((projected(bound, x) - projected(bound, z)).norm()) <= float((x - z).norm()) * (
            1 + tol(dtype)
        )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grouped_path_agrees_with_single_tensor_path(case):
    dtype = torch.float32
    b1, _ = bound_for(case, dtype)
    b2, _ = bound_for(case, dtype)
    xs = random_points(case, dtype, 2, seed=8)
    singles = [projected(b, x) for b, x in zip((b1, b2), xs)]
    grouped = [x.clone() for x in xs]
    with torch.no_grad():
        type(b1).project_all_([b1, b2], grouped)
    for a, b in zip(singles, grouped):
        assert torch.equal(a, b)
    gs = random_points(case, dtype, 2, seed=9)
    singles = [g.clone() for g in gs]
    grouped = [g.clone() for g in gs]
    with torch.no_grad():
        for b, g, x in zip((b1, b2), singles, xs):
            b.project_grad_(g, x)
        type(b1).project_grad_all_([b1, b2], grouped, xs)
    for a, b in zip(singles, grouped):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_second_moment_state_stays_non_negative(case):
    bound, _ = bound_for(case, torch.float32)
    v = torch.rand(case.shape) + 0.1
    with torch.no_grad():
        bound.project_scale_(v)
    assert bool((v >= 0).all())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_constraint_data_round_trips(case):
    """A bound's data is accepted by a bound of the same constraint, which then projects alike."""
    b1, _ = bound_for(case, torch.float32)
    b2, _ = bound_for(case, torch.float32)
    data = {k: v.clone() for k, v in b1.state_tensors().items()}
    assert b2.check_state(data) == (True, "")
    b3 = b2.with_state(data)
    assert type(b3) is type(b2) and set(b3.state_tensors()) == set(data)
    for k, v in b3.state_tensors().items():
        assert torch.equal(v, data[k])
    # keys are attribute names, unless the family maps them itself ("index0" of Fixed's index
    # tuple; an intersection's "0.keep")
    if type(b1)._adopt is Bound._adopt and type(b1).with_state is Bound.with_state:
        assert all(hasattr(b1, key) for key in data)
    x = random_points(case, torch.float32, 1, seed=10)[0]
    assert torch.equal(projected(b3, x), projected(b1, x))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_with_state_builds_a_new_bound_and_changes_nothing_else(case):
    bound, _ = bound_for(case, torch.float32)
    before = {k: v.clone() for k, v in bound.state_tensors().items()}
    data = {k: v.clone(memory_format=torch.contiguous_format) for k, v in before.items()}
    new = bound.with_state(data)
    assert new is not bound
    for v in data.values():  # the new bound holds copies: later changes to the data do not reach it
        if v.numel():
            v.view(-1)[0] = 1 - v.view(-1)[0]
    for k, v in bound.state_tensors().items():
        assert torch.equal(v, before[k])
    for k, v in new.state_tensors().items():
        assert torch.equal(v, before[k])


def _corrupt(key: str, value: torch.Tensor, bound) -> torch.Tensor | None:
    """A value of the right shape and dtype that the family must refuse (None: no such check)."""
    bad = value.clone(memory_format=torch.contiguous_format)
    flat = bad.view(-1)
    if not flat.numel():
        return None
    name = key.rsplit(".", 1)[-1]
    if name == "keep":
        flat[0] = 2
    elif name == "group_ids":
        flat[0] = flat.numel()  # out of [0, n)
    elif name == "weights":
        flat[0] = 0.5
    elif name.startswith("index"):
        flat[0] = 10**6  # past the end of any dim here
    elif name == "basis":
        bad *= 2  # not orthonormal
    elif name == "offset":
        basis = bound.state_tensors()[key.replace("offset", "basis")]
        bad += basis[:, 0].expand_as(bad.reshape(-1, basis.shape[0])).reshape(bad.shape)
    elif name == "low":
        bad.fill_(1e6)  # above any high
    elif name == "high":
        bad.fill_(-1e6)
    else:
        return None
    return bad


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_constraint_data_is_refused_with_a_reason(case):
    bound, _ = bound_for(case, torch.float32)
    good = {k: v.clone() for k, v in bound.state_tensors().items()}
    for key, value in good.items():
        bad_values = [_corrupt(key, value, bound)]
        if value.is_floating_point() and value.numel():
            nan = value.clone()
            nan.view(-1)[0] = float("nan")
            bad_values.append(nan)
        for bad in (b for b in bad_values if b is not None):
            ok, reason = bound.check_state({**good, key: bad})
            assert not ok and reason, (key, bad)
            with pytest.raises(co.ConstraintError, match="p: "):
                bound.with_state({**good, key: bad})
    ok, reason = bound.check_state({**good, "extra": torch.zeros(1)})
    assert not ok and "expected" in reason
    assert all(torch.equal(v, good[k]) for k, v in bound.state_tensors().items())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_equal_constraints_built_twice_are_the_same(case):
    assert case.make().same_as(case.make())


def test_every_exported_family_has_a_case():
    families = {
        obj
        for name in co.__all__
        if isinstance(obj := getattr(co, name), type)
        and issubclass(obj, co.Constraint)
        and obj is not co.Constraint
    }
    covered = set()
    for case in CASES:
        c = case.make()
        covered.add(type(c))
        if isinstance(c, co.Intersection):
            covered |= {type(m) for m in c.constraints}
    assert families <= covered, f"no case for {sorted(f.__name__ for f in families - covered)}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_traits_agree_with_the_case(case):
    bound, _ = bound_for(case, torch.float32)
    traits = bound.traits
    if isinstance(case.make(), co.Projection):  # a user's set is opaque: its bound claims nothing
        assert not (traits.linear or traits.convex or traits.exact)
        return
    assert traits.linear == case.linear
    assert traits.exact == case.exact
    assert traits.convex == case.convex
    assert bound.linear == traits.linear


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_elementwise_bounds_project_each_entry_on_its_own(case):
    """Brute force: entry i of P(x) depends on x_i alone, whatever the other entries hold."""
    bound, _ = bound_for(case, torch.float64)
    if not bound.traits.elementwise:
        pytest.skip("not element-wise")
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(case.shape, generator=gen, dtype=torch.float64) * 3
    y = projected(bound, x)
    for i in range(x.numel()):
        z = torch.randn(case.shape, generator=gen, dtype=torch.float64) * 3
        z.view(-1)[i] = x.view(-1)[i]
        assert projected(bound, z).view(-1)[i] == y.view(-1)[i]


class CountWrites(TorchFunctionMode):
    """Counts the in-place writes into one tensor's memory (the target of an in-place method or
    function, of ``__setitem__``, or an ``out=``)."""

    INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"}

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.storage = target.untyped_storage().data_ptr()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        targets = [kwargs.get("out")]
        if (name.endswith("_") and not name.startswith("__")) or name in self.INPLACE_DUNDERS:
            targets.append(args[0] if args else None)
        self.count += sum(
            isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == self.storage for t in targets
        )
        return func(*args, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_projections_write_their_tensor_once(case):
    """Computed first, stored with one in-place op: an exception between ops (a Ctrl-C) leaves the
    tensor as it was or projected, never half-written. Gradients alike."""
    bound, _ = bound_for(case, torch.float32)
    x, g = random_points(case, torch.float32, 2, seed=12)
    with torch.no_grad(), CountWrites(x) as writes:
        bound.project_(x)
    assert writes.count == 1
    with torch.no_grad(), CountWrites(g) as writes:
        bound.project_grad_(g, x)
    assert writes.count == (1 if bound.traits.projects_grad else 0)


LEADING = {"Mask", "Tied", "Subspace", "Affine", "Fixed-index", "Invariant-callables"}


@pytest.mark.parametrize("case", [c for c in CASES if c.id in LEADING], ids=sorted(LEADING, key=IDS.index))
def test_pattern_applies_independently_along_leading_dims(case):
    """A constraint whose pattern has the trailing shape acts on each leading index alone."""
    stacked_shape = (2,) + case.shape
    bound, _ = bound_for(case, torch.float64, stacked_shape)
    single, _ = bound_for(case, torch.float64)
    x = torch.randn(stacked_shape, dtype=torch.float64)
    y = projected(bound, x)
    for i in range(2):
        torch.testing.assert_close(y[i], projected(single, x[i]), rtol=1e-12, atol=1e-12)
