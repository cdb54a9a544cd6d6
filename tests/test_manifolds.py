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
    monkeypatch.setattr(manifolds, "NEWTON_MAX_ITER", 0)  # not enough from 1e-3
    assert manifolds.polar_near(near) is None
    u, _, vh = torch.linalg.svd(near, full_matrices=False)
    torch.testing.assert_close(manifolds.polar_factor(near), u @ vh)
    nan = near.clone()
    nan[0, 0] = float("nan")
    assert manifolds.polar_near(nan) is None


# -- Orthogonal: the iteration against the SVD ------------------------------------------------------
def _svd_polar(w: torch.Tensor) -> torch.Tensor:
    """The polar factor from a float64 SVD (the reference, independent of the iteration)."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u @ vh


def _near_point(shape, dtype, spectral, seed):
    """``U S V^T`` with random orthonormal ``U``, ``V`` and singular values ``s_i = sqrt(1 + e_i)``,
    ``e_i`` spread over ``[-spectral, spectral]`` (both ends taken): ``||W W^T - I||_2`` is
    ``spectral`` (an Adam step of 1e-3 per entry on a 1024 x 1024 weight gives 0.055)."""
    gen = torch.Generator().manual_seed(seed)
    m, k = shape
    r = min(m, k)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))
    e = spectral * (2 * torch.rand(r, generator=gen, dtype=torch.float64) - 1)
    e[0], e[1] = spectral, -spectral
    return ((u * (1 + e).sqrt()) @ v.T).to(dtype)


def _spectral_error(w: torch.Tensor) -> float:
    m = w.double()
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.matrix_norm(g - torch.eye(g.shape[0], dtype=g.dtype), 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (256, 256)], ids=str)
@pytest.mark.parametrize("spectral", [1e-5, 3e-3, 0.055, 0.2])
def test_polar_iteration_from_an_adam_sized_step_is_the_svd_polar_factor(shape, dtype, spectral):
    """The fast path (no SVD) from near points, entry by entry against the float64 SVD's
    ``U V^T``: within 8 eps (measured at most 4.4 eps, 3x5 to 1024x1024)."""
    from constrained_optim.constraints import manifolds

    w = _near_point(shape, dtype, spectral, seed=shape[0] + int(spectral * 1e6))
    eps = torch.finfo(dtype).eps
    assert abs(_spectral_error(w) - spectral) < 0.01 * spectral + 100 * eps  # the size asked
    out = manifolds._polar_near(w)
    assert out is not None
    q, distance = out
    assert float((q.double() - _svd_polar(w)).abs().max()) <= 8 * eps
    assert _spectral_error(q) <= 16 * eps
    if distance is not None:  # measured from the Gram matrix that verified it
        s = torch.linalg.svdvals(q.double())
        true = float((s - 1).norm())
        assert abs(float(distance) - true) <= 4 * eps * max(shape) ** 0.5


def test_polar_iteration_takes_a_second_step_where_the_bound_does_not_prove_the_first(monkeypatch):
    """From ``||E||_2 = 0.3`` one degree-4 step leaves ``|e| ~ 0.25 * 0.3^5 = 6e-4``: not within
    rounding, and ``(3/4) r^2`` is above eps, so a second step is taken; from 0.02 the first
    step's result is accepted (verified by its Gram matrix) or proved by one Newton-Schulz step."""
    from constrained_optim.constraints import manifolds

    far_enough = _near_point((48, 80), torch.float32, 0.3, seed=5)
    near = _near_point((48, 80), torch.float32, 0.02, seed=6)
    eps = torch.finfo(torch.float32).eps
    # the error after one step, from the exact maths: every |e'| = |(1 + e) p(e)^2 - 1| at the
    # eigenvalues e of E, p the degree-4 Taylor polynomial of (1 + e)^(-1/2)
    m = far_enough.double()
    e = torch.linalg.eigvalsh(m @ m.T - torch.eye(48, dtype=torch.float64))
    p = 1 - e / 2 + 3 * e**2 / 8 - 5 * e**3 / 16 + 35 * e**4 / 128
    after = float(((1 + e) * p**2 - 1).abs().max())
    assert 0.75 * after**2 > eps and after > 16 * eps * 80**0.5
    calls = []
    real = manifolds._gram_error
    monkeypatch.setattr(manifolds, "_gram_error", lambda x, rows: calls.append(1) or real(x, rows))
    for w, grams in ((far_enough, 3), (near, 2)):
        calls.clear()
        q = manifolds.polar_near(w)
        assert q is not None and len(calls) == grams
        assert float((q.double() - _svd_polar(w)).abs().max()) <= 8 * eps
    monkeypatch.setattr(manifolds, "NEWTON_MAX_ITER", 1)
    assert manifolds.polar_near(far_enough) is None  # a second step needed, not allowed
    assert manifolds.polar_near(near) is not None


def test_polar_falls_back_to_the_svd_where_the_iteration_does_not_converge():
    """A near-singular matrix: every entry of ``W W^T - I`` is small (so the iteration starts)
    but one eigenvalue is near -1, where ``(1 + e)^(-1/2)`` has no useful polynomial: the
    iteration gives up and the SVD's polar factor is returned."""
    from constrained_optim.constraints import manifolds

    gen = torch.Generator().manual_seed(7)
    u, _, vh = torch.linalg.svd(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    s = torch.ones(64, dtype=torch.float64)
    s[0] = 1e-3
    w = (u * s) @ vh
    m = w @ w.T - torch.eye(64, dtype=torch.float64)
    assert float(m.abs().max()) < manifolds.NEWTON_START
    assert manifolds.polar_near(w) is None
    torch.testing.assert_close(manifolds.polar_factor(w), u @ vh, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonal_residual_is_the_distance_to_the_polar_factor(dtype):
    """The audit's residual (from the Gram matrix) against ``||S - I||_F`` of a float64 SVD:
    at a projected point, at a point slightly off (measured again, not remembered), and far off
    (``x - P(x)``)."""
    bound = bound_of(co.Orthogonal(), (40, 3, 2, 2), dtype)
    gen = torch.Generator().manual_seed(8)
    eps = torch.finfo(dtype).eps

    def true(x):
        return float((torch.linalg.svdvals(x.double().reshape(40, -1)) - 1).norm())

    with torch.no_grad():
        x = torch.randn(40, 3, 2, 2, generator=gen, dtype=dtype)
        bound.project_(x)
        at = float(torch.linalg.vector_norm(bound.residual(x)))
        assert abs(at - true(x)) <= 4 * eps * 40**0.5
        x.add_(1e-5 * torch.randn(x.shape, generator=gen, dtype=dtype))  # not through the bound
        off = float(torch.linalg.vector_norm(bound.residual(x)))
        assert off > 10 * at and abs(off - true(x)) <= 1e-3 * true(x) + 4 * eps * 40**0.5
        x.mul_(2.0)
        far = float(torch.linalg.vector_norm(bound.residual(x)))
        assert abs(far - true(x)) <= 1e-5 * true(x)
