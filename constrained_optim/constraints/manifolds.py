"""Matrix manifolds of a weight viewed as ``(shape[0], -1)``: `Orthogonal` and `LowRank`.

A conv weight ``(out, in, kh, kw)`` is the matrix ``(out, in * kh * kw)``: one row per output
unit. Both projections are the nearest point in the Frobenius norm, through one SVD: the polar
factor ``U V^T`` (orthonormal rows or columns) and the truncated SVD (Eckart-Young).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConstraintError, describe
from .base import Bound, Constraint, Traits


# -- pure maths ---------------------------------------------------------------------------------
def svd(w: torch.Tensor):
    """``torch.linalg.svd(w, full_matrices=False)``; non-finite input gives NaN factors (the
    engine then reports the parameter as non-finite) instead of raising mid-step."""
    try:
        return torch.linalg.svd(w, full_matrices=False)
    except torch.linalg.LinAlgError:
        m, k = w.shape
        r = min(m, k)
        nan = math.nan
        return w.new_full((m, r), nan), w.new_full((r,), nan), w.new_full((r, k), nan)


def polar_factor(w: torch.Tensor) -> torch.Tensor:
    """The nearest matrix to ``w`` (``(m, k)``) with orthonormal rows (``m <= k``) or columns
    (``m >= k``): ``U V^T`` for ``w = U S V^T`` (the orthogonal factor of the polar decomposition).
    From a point near the manifold (every step after the first) by Newton-Schulz iterations
    (`polar_near`), checked; by the SVD otherwise, polished by the same iterations."""
    near = polar_near(w)
    if near is not None:
        return near
    u, _, vh = svd(w)
    q = u @ vh
    # a float32 SVD on CUDA leaves U V^T off the manifold by more than rounding (a 1024 x 1024
    # polar factor at 2.6e-5 per entry on an H200): Newton-Schulz polishes it to rounding
    polished = polar_near(q)
    return q if polished is None else polished


#: Newton-Schulz starts only where ``||W W^T - I||_inf`` (a bound on the spectral norm of the
#: symmetric ``W W^T - I``) is below this (it converges for any spectral norm below 1, quadratically
#: once small), and gives up to the SVD after `NEWTON_MAX_ITER` iterations
NEWTON_START = 0.5
NEWTON_MAX_ITER = 8


def polar_near(w: torch.Tensor) -> torch.Tensor | None:
    """The polar factor of ``w`` by ``X <- X - (X X^T - I) X / 2`` (Newton-Schulz: ``1.5 X - 0.5 X
    X^T X``), which keeps the singular vectors and drives every singular value to 1, until
    ``|X X^T - I|_max`` is within `on_stiefel`'s limit, then once more; None (use the SVD) when
    ``w`` is too far from the manifold or the iteration has not converged. The Gram matrix is of
    the smaller side; each iteration is two matrix products and one host read."""
    if w.numel() == 0 or not w.is_floating_point():
        return None
    rows = w.shape[0] <= w.shape[1]
    limit = 16 * torch.finfo(w.dtype).eps * math.sqrt(max(w.shape))
    x = w
    for it in range(NEWTON_MAX_ITER + 1):
        e = x @ x.T if rows else x.T @ x
        e.diagonal().sub_(1.0)
        if it == 0 and not bool(e.abs().sum(1).max() < NEWTON_START):  # NaN: not near
            return None
        if bool(e.abs().max() <= limit):
            # converged: one more correction takes it from the limit to rounding (quadratically)
            return x - (e @ x if rows else x @ e).mul_(0.5)
        if it == NEWTON_MAX_ITER:
            return None
        x = x - (e @ x if rows else x @ e).mul_(0.5)
    return None


def stiefel_tangent_(g: torch.Tensor, x: torch.Tensor) -> None:
    """Project ``g`` (``(m, k)``) onto the tangent space at ``x`` of the matrices with orthonormal
    rows (``m <= k``: ``{Z : X Z^T + Z X^T = 0}``, ``Z <- Z - sym(Z X^T) X``) or columns
    (``m > k``: ``{Z : X^T Z + Z^T X = 0}``, ``Z <- Z - X sym(X^T Z)``), ``sym(A) = (A + A^T) / 2``."""
    if x.shape[0] <= x.shape[1]:
        a = g @ x.T
        g.sub_(((a + a.T) * 0.5) @ x)
    else:
        a = x.T @ g
        g.sub_(x @ ((a + a.T) * 0.5))


def on_stiefel(w: torch.Tensor) -> bool:
    """Whether ``w`` (``(m, k)``) has orthonormal rows (``m <= k``) or columns to rounding:
    ``|W W^T - I|_max <= 16 eps sqrt(max(m, k))`` (a polar factor computed in ``w``'s dtype is
    within about 2 eps sqrt(max(m, k)), measured on 3x5 to 4608x512 in float32 and float64)."""
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    gram.diagonal().sub_(1.0)
    limit = 16 * torch.finfo(w.dtype).eps * math.sqrt(max(w.shape))
    return bool(gram.abs().max() <= limit)  # NaN compares False: off the manifold


def truncated_svd(w: torch.Tensor, rank: int) -> torch.Tensor:
    """The nearest matrix to ``w`` of rank at most ``rank``: ``U_r S_r V_r^T`` (Eckart-Young)."""
    u, s, vh = svd(w)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _matrix_view(x: torch.Tensor, m: int) -> torch.Tensor:
    return x.reshape(m, -1)


def _write_(x: torch.Tensor, value: torch.Tensor) -> None:
    x.copy_(value.view(x.shape))


def _check_matrix(constraint, param, name) -> None:
    if param.dim() < 2:
        raise ConstraintError(
            f"{describe(name, param)}: {constraint!r} needs a parameter with at least 2 dims "
            "(a matrix, or a weight viewed as (shape[0], -1)); a 1-D parameter has no rows and columns"
        )
    if param.numel() == 0:
        raise ConstraintError(f"{describe(name, param)}: {constraint!r} needs a non-empty parameter")


# -- Orthogonal --------------------------------------------------------------------------------------
class Orthogonal(Constraint):
    """Orthonormal rows or columns of ``W`` viewed as ``(shape[0], -1)``, whichever fits:
    ``{W : W W^T = I}`` for a wide (or square) matrix, ``{W : W^T W = I}`` for a tall one.

    The projection is the nearest such matrix, the polar factor ``U V^T`` of ``W = U S V^T``.
    Gradients (and momentum, ``exp_avg`` at attach) are projected onto the tangent space at the
    current point, so momentum moves along the manifold; second moments are left as they are.
    On a square weight the set is the orthogonal group: ``W x`` preserves norms. Works for conv
    weights (rows = output channels).

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
    >>> with torch.no_grad():
    ...     co.Orthogonal().bind(w, "w").project_(w)
    >>> w.data
    tensor([[1., 0.],
            [0., 1.]])
    """

    def _bind(self, param, name, owner):
        _check_matrix(self, param, name)
        return OrthogonalBound(self, name, param)


class OrthogonalBound(Bound):
    """The tangent projection is taken at the polar factor of ``x``: at ``x`` itself when ``x``
    is on the manifold to rounding (`on_stiefel`, one Gram matrix: the usual case, the gradient
    at a parameter projected after the previous step), else at its polar factor, one more SVD (a
    closure optimizer such as LBFGS evaluates gradients between its own updates, off the manifold).

    The choice reads ``x`` alone, with no memory of what this bound projected, so it cannot be
    fooled by writes that bypass autograd's version counter (``.data``), and a bound rebuilt
    from a checkpoint projects exactly as the one it replaces. On a projected ``x`` the tangent
    projections at ``x`` and at its recomputed polar factor differ by a few eps of the gradient's
    norm (at most 10 eps measured, 3x5 to 512x4608, float32 and float64)."""

    def __init__(self, constraint, name, param):
        super().__init__(constraint, name, param, Traits(projects_grad=True, reduces=None))
        self.rows = param.shape[0]

    def project_(self, x):
        _write_(x, polar_factor(_matrix_view(x, self.rows)))

    def gap(self, x):
        return x - polar_factor(_matrix_view(x, self.rows)).view(x.shape)

    def _on_manifold(self, x) -> torch.Tensor:
        w = _matrix_view(x, self.rows)
        return w if on_stiefel(w) else polar_factor(w)

    def project_grad_(self, g, x):
        point = self._on_manifold(x)
        if g.is_contiguous():  # a view: the projection writes into g, once (its last op)
            stiefel_tangent_(g.view(self.rows, -1), point)
        else:
            z = g.reshape(self.rows, -1).clone()
            stiefel_tangent_(z, point)
            _write_(g, z)


# -- LowRank -----------------------------------------------------------------------------------------
class LowRank(Constraint):
    """Rank at most ``rank`` of ``W`` viewed as ``(shape[0], -1)``: ``{W : rank(W) <= r}``.

    The projection is the truncated SVD, the nearest such matrix (Eckart-Young). Not convex;
    gradients are not projected (the set is enforced by the projection after each step).

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    >>> with torch.no_grad():
    ...     co.LowRank(1).bind(w, "w").project_(w)
    >>> w.data
    tensor([[3., 0.],
            [0., 0.]])
    """

    def __init__(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConstraintError(f"LowRank: rank must be an int >= 1, got {rank!r}")
        self.rank = rank

    def _bind(self, param, name, owner):
        _check_matrix(self, param, name)
        return LowRankBound(self, name, param, self.rank)

    def __repr__(self):
        return f"LowRank({self.rank})"


class LowRankBound(Bound):
    def __init__(self, constraint, name, param, rank):
        super().__init__(constraint, name, param, Traits(reduces=None))
        self.rows = param.shape[0]
        # a rank at least min(m, k) holds every matrix: nothing to do
        self.active = rank < min(self.rows, param.numel() // self.rows)
        self.rank = rank

    def project_(self, x):
        if self.active:
            _write_(x, truncated_svd(_matrix_view(x, self.rows), self.rank))

    def gap(self, x):
        if not self.active:
            return torch.zeros_like(x)
        return super().gap(x)
