"""`Orthogonal` against scipy's polar decomposition and the Stiefel tangent space; `LowRank`
against numpy's SVD (Eckart-Young); both through the optimizer, on conv weights too."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import constrained_optim as co

SHAPES = [(3, 5), (5, 3), (4, 4), (4, 2, 3, 3), (6, 1, 2)]


def bound_of(constraint, shape, dtype=torch.float64):
    return constraint.bind(torch.nn.Parameter(torch.zeros(shape, dtype=dtype)), "w")


def projected(bound, x):
    y = x.clone()
    with torch.no_grad():
        bound.project_(y)
    return y


def gram_error(w: torch.Tensor) -> float:
    m = w.reshape(w.shape[0], -1)
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float((g - torch.eye(g.shape[0], dtype=g.dtype)).abs().max())


# -- Orthogonal --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_orthogonal_projection_is_scipys_polar_factor(shape):
    x = torch.randn(shape, dtype=torch.float64)
    y = projected(bound_of(co.Orthogonal(), shape), x)
    m = x.reshape(shape[0], -1).numpy()
    # scipy: m = u p with u (m x k) having orthonormal columns (tall) or rows (wide)
    u, _ = scipy.linalg.polar(m, side="right")
    np.testing.assert_allclose(y.reshape(shape[0], -1).numpy(), u, atol=1e-12)
    assert gram_error(y) < 1e-12


def test_orthogonal_projection_is_the_nearest_orthonormal_matrix():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    y = projected(bound_of(co.Orthogonal(), (4, 6)), x)
    for _ in range(200):
        q, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=torch.float64))
        assert float((x - y).norm()) <= float((x - q.T).norm()) + 1e-12


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_orthogonal_gradient_projection_is_onto_the_tangent_space(shape):
    """Idempotent, lands in ``{Z : X Z^T + Z X^T = 0}`` (or ``X^T Z + Z^T X = 0`` for a tall
    matrix), and the removed part is orthogonal to every tangent vector."""
    bound = bound_of(co.Orthogonal(), shape)
    gen = torch.Generator().manual_seed(1)
    x = projected(bound, torch.randn(shape, generator=gen, dtype=torch.float64))
    X = x.reshape(shape[0], -1)
    wide = X.shape[0] <= X.shape[1]

    def tangent_error(z):
        Z = z.reshape(X.shape)
        return float((X @ Z.T + Z @ X.T).abs().max() if wide else (X.T @ Z + Z.T @ X).abs().max())

    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    pg = g.clone()
    bound.project_grad_(pg, x)
    assert tangent_error(pg) < 1e-12
    again = pg.clone()
    bound.project_grad_(again, x)
    torch.testing.assert_close(again, pg, rtol=0, atol=1e-13)
    # a tangent vector by construction: X A with A skew (wide: A X), plus the normal-free part
    a = torch.randn(min(X.shape), min(X.shape), generator=gen, dtype=torch.float64)
    skew = a - a.T
    t = (skew @ X if wide else X @ skew).reshape(shape)
    assert tangent_error(t) < 1e-12
    assert abs(float(((g - pg) * t).sum())) < 1e-12


def test_orthogonal_gradient_at_a_point_off_the_manifold_uses_its_polar_factor():
    """Between a closure optimizer's own updates the point is off the manifold; the gradient is then
    projected onto the tangent space at the nearest point of the manifold."""
    bound = bound_of(co.Orthogonal(), (3, 5))
    x = torch.randn(3, 5, dtype=torch.float64)  # never projected in place by this bound
    g = torch.randn(3, 5, dtype=torch.float64)
    pg = g.clone()
    bound.project_grad_(pg, x)
    p = projected(bound, x)  # a copy: the bound now knows that copy, not x
    ref = g.clone()
    bound.project_grad_(ref, p)
    torch.testing.assert_close(pg, ref, rtol=0, atol=1e-12)
    P = p.reshape(3, 5)
    assert float((P @ pg.T + pg @ P.T).abs().max()) < 1e-12


def test_momentum_moves_along_the_manifold():
    """With the tangent projection the optimizer's step leaves the manifold only to second order
    (drift ~ lr^2); without it, to first order (drift ~ lr)."""

    def drift(lr, project_grad):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4, bias=False)
        opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), model)
        opt.attach("weight", co.Orthogonal())
        if not project_grad:
            opt.engine.bounds[model.weight].project_grad_ = lambda g, x: None
        x = torch.randn(16, 8)
        for _ in range(3):
            opt.zero_grad()
            model(x).sin().sum().backward()
            opt.step()
        return opt.audit.last[0].drift

    ratio_tangent = drift(2e-3, True) / drift(1e-3, True)
    ratio_plain = drift(2e-3, False) / drift(1e-3, False)
    assert 3.5 < ratio_tangent < 4.5, ratio_tangent  # halving lr quarters the drift
    assert 1.7 < ratio_plain < 2.3, ratio_plain  # halving lr halves it


def test_orthogonal_on_a_warm_optimizer_projects_momentum_onto_the_tangent_space():
    model = torch.nn.Conv2d(3, 4, 3)
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99)), model)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    second = opt.state[model.weight]["exp_avg_sq"].clone()
    opt.attach("weight", co.Orthogonal())
    W = model.weight.detach().reshape(4, -1)
    assert gram_error(W) < 1e-5
    M = opt.state[model.weight]["exp_avg"].reshape(4, -1)
    assert float((W @ M.T + M @ W.T).abs().max()) < 1e-6 * max(1.0, float(M.abs().max()))
    assert torch.equal(opt.state[model.weight]["exp_avg_sq"], second)  # second moments left as they are
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        assert gram_error(model.weight.detach()) < 1e-5


@pytest.mark.parametrize("constraint", [co.Orthogonal(), co.LowRank(1)], ids=repr)
def test_matrix_sets_reject_a_vector_naming_it(constraint):
    model = torch.nn.Linear(3, 2)
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(co.ConstraintError, match=r"bias \(shape \(2,\).*at least 2 dims"):
        opt.attach("bias", constraint)


def test_orthogonal_on_non_finite_values_reports_instead_of_raising():
    p = torch.nn.Parameter(torch.eye(3))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([p], lr=1.0))
    opt.attach(p, co.Orthogonal())
    p.grad = torch.full((3, 3), float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()


# -- LowRank -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("shape", [(6, 4), (3, 7), (5, 2, 2, 2)], ids=str)
def test_low_rank_is_numpys_truncated_svd(shape, rank):
    x = torch.randn(shape, dtype=torch.float64)
    y = projected(bound_of(co.LowRank(rank), shape), x)
    m = x.reshape(shape[0], -1).numpy()
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    ref = (u[:, :rank] * s[:rank]) @ vt[:rank]
    np.testing.assert_allclose(y.reshape(shape[0], -1).numpy(), ref, atol=1e-12)
    assert np.linalg.matrix_rank(y.reshape(shape[0], -1).numpy(), tol=1e-9) <= rank
    # Eckart-Young: the distance is the norm of the dropped singular values
    assert abs(float((x - y).norm()) - float(np.sqrt((s[rank:] ** 2).sum()))) < 1e-12


def test_low_rank_at_full_rank_changes_nothing_and_rank_is_validated():
    x = torch.randn(3, 5)
    assert torch.equal(projected(bound_of(co.LowRank(3), (3, 5), torch.float32), x), x)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(co.ConstraintError, match="rank"):
            co.LowRank(bad)


def test_low_rank_trains_a_conv_weight_within_its_rank():
    model = torch.nn.Conv2d(4, 6, 3)
    opt = co.ConstrainedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), model)
    opt.attach("weight", co.LowRank(2))
    x = torch.randn(2, 4, 7, 7)
    for _ in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        s = torch.linalg.svdvals(model.weight.detach().reshape(6, -1))
        assert float(s[2:].max()) < 1e-5 * float(s[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_polar_from_a_near_point_is_the_svd_polar_factor(shape, dtype):
    from constrained_optim.constraints import manifolds

    gen = torch.Generator().manual_seed(0)
    q = manifolds.polar_factor(torch.randn(shape, generator=gen, dtype=dtype))
    for size in (1e-6, 1e-4, 2e-3):
        w = q + size * torch.randn(shape, generator=gen, dtype=dtype)
        near = manifolds.polar_near(w)
        assert near is not None and manifolds.on_stiefel(near)
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        tol = 50 * torch.finfo(dtype).eps * max(shape) ** 0.5
        torch.testing.assert_close(near, u @ vh, rtol=0, atol=tol)


def test_polar_falls_back_to_the_svd_far_from_the_manifold_or_unconverged(monkeypatch):
    from constrained_optim.constraints import manifolds

    gen = torch.Generator().manual_seed(1)
    far = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    assert manifolds.polar_near(far) is None
    u, _, vh = torch.linalg.svd(far, full_matrices=False)
    torch.testing.assert_close(manifolds.polar_factor(far), u @ vh)
    near = manifolds.polar_factor(far) + 1e-3 * torch.randn(20, 30, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(manifolds, "NEWTON_MAX_ITER", 1)  # not enough from 1e-3
    assert manifolds.polar_near(near) is None
    u, _, vh = torch.linalg.svd(near, full_matrices=False)
    torch.testing.assert_close(manifolds.polar_factor(near), u @ vh)
    nan = near.clone()
    nan[0, 0] = float("nan")
    assert manifolds.polar_near(nan) is None
