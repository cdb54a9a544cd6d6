"""The contract every constraint keeps, run over every case in `cases.py`.

Membership is judged by each case's ``violation``, written from the set's definition; the
projection of linear sets is compared with the orthogonal projector computed by brute force
from independently drawn points of the set.
"""

from __future__ import annotations

import pytest
import torch

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
    x = case.feasible(gen, case.shape, dtype) if case.feasible else projected(bound, torch.randn(case.shape, dtype=dtype))
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
    ys = ([case.feasible(gen, case.shape, dtype) for _ in range(8)] if case.feasible
          else [projected(bound, x) for x in random_points(case, dtype, 8, seed=6)])
    xs = random_points(case, dtype, 6, seed=7)
    for x in xs:
        px = projected(bound, x)
        for y in ys:  # <x - P(x), y - P(x)> <= 0 for every y in the set
            assert float(((x - px) * (y - px)).sum()) <= tol(dtype, float(x.norm() * y.norm()))
    for x, z in zip(xs, xs[1:]):
        assert float((projected(bound, x) - projected(bound, z)).norm()) <= float((x - z).norm()) * (1 + tol(dtype))


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
    b1, _ = bound_for(case, torch.float32)
    b2, _ = bound_for(case, torch.float32)
    data = {k: v.clone() for k, v in b1.state_tensors().items()}
    b2.load_state_tensors(data)
    for k, v in b2.state_tensors().items():
        assert torch.equal(v, data[k])


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
