"""Norm sets against closed forms, KKT conditions, an independent root finder and scipy's QP solver;
per-unit batching against a Python loop over units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import constrained_optim as co


def projected(constraint, x, name="w"):
    b = constraint.bind(torch.nn.Parameter(torch.zeros_like(x)), name)
    y = x.clone()
    with torch.no_grad():
        b.project_(y)
    return y


def threshold_by_bisection(a: np.ndarray, radius: float) -> float:
    """The ``theta >= 0`` with ``sum(max(a - theta, 0)) = radius`` (``a >= 0``), by bisection: an
    algorithm independent of the sort-based one under test."""
    lo, hi = min(0.0, a.min() - radius), float(a.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(a - mid, 0).sum() > radius:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def qp(x: np.ndarray, constraints, bounds=None, lift=None) -> np.ndarray:
    """``argmin |A v - x|^2`` over the constraints on ``v`` (``A = lift``, default the identity),
    by scipy's SLSQP."""
    a = np.eye(x.size) if lift is None else lift
    res = minimize(
        lambda v: ((a @ v - x) ** 2).sum(),
        np.zeros(a.shape[1]),
        jac=lambda v: 2 * a.T @ (a @ v - x),
        constraints=constraints,
        bounds=bounds,
        method="SLSQP",
        options={"ftol": 1e-10, "maxiter": 1000},
    )
    assert res.success, res.message
    return a @ res.x


# -- the simplex -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("radius", [1.0, 2.5])
def test_simplex_satisfies_kkt_and_matches_bisection_and_qp(seed, radius):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, generator=gen, dtype=torch.float64) * 2
    y = projected(co.Simplex(radius=radius), x)
    # KKT: y = max(x - theta, 0) with one theta; sum(y) = r
    assert float(y.min()) >= 0 and abs(float(y.sum()) - radius) < 1e-12
    support = y > 0
    theta = x[support] - y[support]
    assert float(theta.max() - theta.min()) < 1e-12
    assert bool((x[~support] <= theta[0] + 1e-12).all())
    # an independent root finder for theta
    t = threshold_by_bisection(x.numpy(), radius)
    np.testing.assert_allclose(y.numpy(), np.maximum(x.numpy() - t, 0), atol=1e-10)
    # a generic QP solver
    ref = qp(
        x.numpy(),
        [{"type": "eq", "fun": lambda v: v.sum() - radius, "jac": lambda v: np.ones_like(v)}],
        bounds=[(0, None)] * x.numel(),
    )
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-6)


def test_simplex_per_slice_equals_a_loop_and_handles_edge_points():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    y = projected(co.Simplex(dim=1, radius=2.0), x)
    for i in range(4):
        for k in range(5):
            torch.testing.assert_close(
                y[i, :, k], projected(co.Simplex(radius=2.0), x[i, :, k]), rtol=0, atol=1e-14
            )
    # a vertex, a constant row, a row already on the simplex
    rows = torch.tensor([[9.0, 0.0, 0.0], [5.0, 5.0, 5.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    out = projected(co.Simplex(), rows)
    torch.testing.assert_close(
        out,
        torch.tensor([[1.0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5]], dtype=torch.float64),
        rtol=0,
        atol=1e-15,
    )


def test_simplex_sum_is_exact_to_float32_on_long_rows():
    """The running sums are taken in float64, so long float32 rows still sum to the radius."""
    x = torch.randn(3, 100_000)
    y = projected(co.Simplex(), x)
    assert float((y.double().sum(1) - 1).abs().max()) < 1e-5
    assert float(y.min()) >= 0


# -- the L1 ball -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_l1_ball_satisfies_kkt_and_matches_bisection_and_qp(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, generator=gen, dtype=torch.float64) * 2
    radius = 1.5
    y = projected(co.NormBall(radius, p=1), x)
    assert abs(float(y.abs().sum()) - radius) < 1e-12  # x is outside: the projection is on the sphere
    assert bool((y * x >= 0).all())  # signs kept
    t = threshold_by_bisection(x.abs().numpy(), radius)
    np.testing.assert_allclose(
        y.numpy(), np.sign(x.numpy()) * np.maximum(np.abs(x.numpy()) - t, 0), atol=1e-10
    )
    # QP in the split form y = u - v, u, v >= 0, sum(u + v) <= r
    n = x.numel()
    ref = qp(
        x.numpy(),
        [{"type": "ineq", "fun": lambda v: radius - v.sum(), "jac": lambda v: -np.ones_like(v)}],
        bounds=[(0, None)] * 2 * n,
        lift=np.hstack([np.eye(n), -np.eye(n)]),
    )
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-6)


def test_l1_ball_leaves_points_inside_bitwise():
    x = torch.tensor([[0.1, -0.2, 0.3], [1.0, 2.0, -3.0]])
    y = projected(co.NormBall(1.0, p=1, dim=1), x)
    assert torch.equal(y[0], x[0])
    assert abs(float(y[1].abs().sum()) - 1.0) < 1e-6


@pytest.mark.parametrize("dims", [0, 1, 2, (0, 2), (1, 2), (2, 0)])
@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_norm_ball_per_unit_equals_a_loop_over_units(p, dims):
    x = torch.randn(3, 4, 5, dtype=torch.float64) * 2
    y = projected(co.NormBall(1.2, p=p, dim=dims), x)
    red = sorted([dims] if isinstance(dims, int) else dims)
    other = [d for d in range(3) if d not in red]
    xm = x.permute(other + red).reshape(-1, math.prod(x.shape[d] for d in red))
    ym = y.permute(other + red).reshape(xm.shape)
    for u in range(xm.shape[0]):
        torch.testing.assert_close(ym[u], projected(co.NormBall(1.2, p=p), xm[u]), rtol=0, atol=1e-14)


def test_l2_ball_closed_form_and_inside_points_untouched():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(
        projected(co.NormBall(1.0, dim=1), x), torch.tensor([[0.6, 0.8], [0.3, 0.4]], dtype=torch.float64)
    )
    whole = projected(co.NormBall(2.0), x)
    torch.testing.assert_close(whole, x * 2.0 / x.norm())
    small = torch.randn(5) * 0.01
    assert torch.equal(projected(co.NormBall(1.0), small), small)


def test_inf_ball_is_a_clamp():
    x = torch.randn(4, 5) * 3
    assert torch.equal(projected(co.NormBall(0.5, p=float("inf")), x), x.clamp(-0.5, 0.5))


# -- MaxNorm and UnitNorm ----------------------------------------------------------------------------
def keras_max_norm(w: np.ndarray, c: float, axis) -> np.ndarray:
    """Keras' formula without its epsilon: ``w * clip(|w|, 0, c) / |w|`` with norms over ``axis``."""
    norms = np.sqrt((w**2).sum(axis=axis, keepdims=True))
    return w * np.clip(norms, 0, c) / norms


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 3, 3), (4, 2, 5)])
def test_max_norm_is_per_output_unit_like_keras(shape):
    """A torch weight is ``(out, in, ...)``: Keras' per-unit norm is over every dim but 0."""
    w = torch.randn(shape, dtype=torch.float64) * 2
    y = projected(co.MaxNorm(1.5), w)
    axis = tuple(range(1, len(shape)))
    np.testing.assert_allclose(y.numpy(), keras_max_norm(w.numpy(), 1.5, axis), rtol=1e-12)
    norms = torch.linalg.vector_norm(y, dim=axis)
    assert float(norms.max()) <= 1.5 + 1e-12


def test_max_norm_of_a_vector_is_one_unit_and_dim_overrides():
    b = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(projected(co.MaxNorm(1.0), b), torch.tensor([0.6, 0.8], dtype=torch.float64))
    w = torch.randn(3, 4, dtype=torch.float64) * 3  # Keras' Dense layout (in, out): norm over dim 0
    np.testing.assert_allclose(
        projected(co.MaxNorm(1.0, dim=0), w).numpy(), keras_max_norm(w.numpy(), 1.0, 0)
    )


def test_unit_norm_rows_and_a_zero_row_gets_the_documented_vector():
    w = torch.tensor(
        [[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-30, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    y = projected(co.UnitNorm(), w)
    assert bool(y.isfinite().all())
    torch.testing.assert_close(y[0], torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(y[1], torch.full((4,), 0.5, dtype=torch.float64))  # 1 / sqrt(4)
    torch.testing.assert_close(y[2], torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    conv = projected(co.UnitNorm(), torch.zeros(2, 3, 3, 3))
    torch.testing.assert_close(conv, torch.full((2, 3, 3, 3), 1 / math.sqrt(27)))


def test_unit_norm_is_the_nearest_point_of_the_sphere():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, generator=gen, dtype=torch.float64)
    y = projected(co.UnitNorm(), x)
    for _ in range(200):
        s = torch.randn(8, generator=gen, dtype=torch.float64)
        s /= s.norm()
        assert float((x - y).norm()) <= float((x - s).norm()) + 1e-12


def test_unit_norm_under_an_optimizer_keeps_every_unit_on_the_sphere():
    model = torch.nn.Linear(6, 4)
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    opt.attach("weight", co.UnitNorm())
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).sum().backward()
        opt.step()
        norms = model.weight.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(4), rtol=0, atol=1e-6)
