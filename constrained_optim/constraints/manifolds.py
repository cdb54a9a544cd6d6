"""Matrix manifolds of a weight viewed as ``(shape[0], -1)``: `Orthogonal` and `LowRank`.

A conv weight ``(out, in, kh, kw)`` is the matrix ``(out, in * kh * kw)``: one row per output
unit. Both projections are the nearest point in the Frobenius norm: the polar factor ``U V^T``
(orthonormal rows or columns; from a near point, every step after the first, by a polynomial
iteration on the Gram matrix with no SVD, see `polar_near`) and the truncated SVD (Eckart-Young).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    From a point near the manifold (every step after the first) by the iteration of `polar_near`;
    by the SVD otherwise, polished by the same iteration."""
    return polar(w)[0]


def polar(w: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """`polar_factor` ``Q``; whether ``Q`` is on the manifold to rounding, verified or proved by
    `polar_near`'s iteration (False only for an SVD the iteration could not polish); and, where
    the iteration measured it, the distance of ``Q`` to the manifold, ``||Q Q^T - I||_F / 2``
    (0-d, from the Gram matrix that verified it, see `stiefel_distance`), else None."""
    near = _polar_near(w)
    if near is not None:
        return near[0], True, near[1]
    u, _, vh = svd(w)
    q = u @ vh
    # a float32 SVD on CUDA leaves U V^T off the manifold by more than rounding (a 1024 x 1024
    # polar factor at 2.6e-5 per entry on an H200; 8.6e-5 in the row sums of W W^T - I on a
    # CPU): the iteration polishes it to rounding
    polished = _polar_near(q)
    return (q, False, None) if polished is None else (polished[0], True, polished[1])


#: the iteration gives up to the SVD where ``max |W W^T - I|`` (a lower bound on the spectral norm
#: of the symmetric ``E = W W^T - I``) is at least this, where an iteration does not shrink its
#: bound ``r`` on ``||E||_2``, or after `NEWTON_MAX_ITER` iterations
NEWTON_START = 0.5
NEWTON_MAX_ITER = 4
#: the iterate is accepted, without a further correction, where ``r = min(||E||_inf, ||E||_F)`` of
#: its computed ``E = X X^T - I`` (a bound on ``||E||_2``, so every singular value is within about
#: ``r / 2`` of 1) is within ``NEWTON_ACCEPT eps sqrt(max(m, k))``: rounding in the Gram matrix
#: alone (a polar factor computed to rounding measures 0.3 to 10 eps sqrt(max(m, k)), float32
#: and float64, 3x5 to 1024x1024). This implies `on_stiefel`'s test on the same Gram matrix.
NEWTON_ACCEPT = 16

# Taylor coefficients of (1 + e)^(-1/2): 1, -1/2, 3/8, -5/16, 35/128
_C2, _C3, _C4 = 3 / 8, -5 / 16, 35 / 128


def polar_near(w: torch.Tensor) -> torch.Tensor | None:
    """The polar factor of ``w`` from a point near the manifold, or None (use the SVD) when ``w``
    is too far from it or the iteration has not converged.

    With ``E = W W^T - I`` (of the smaller side; ``W^T W - I`` for a tall ``w``) the polar factor
    is ``(I + E)^(-1/2) W``. Each iteration computes ``E`` (one Gram matrix) and reads ``r =
    min(||E||_inf, ||E||_F)`` (``||E||_inf`` the max row sum of ``|E|``; both bound the spectral
    norm of the symmetric ``E``) and ``max |E|`` from the host once (non-finite, ``max |E| >=
    NEWTON_START`` or an ``r`` that did not shrink: None), then:

    - ``r <= NEWTON_ACCEPT eps sqrt(max(m, k))`` (not on the first iteration): the iterate is on
      the manifold to rounding, verified by this Gram matrix; returned as it is;
    - ``(3/4) r^2 + r^3/4 <= eps``: one Newton-Schulz step ``W - E W / 2`` (one product) reaches
      rounding, proven: it leaves ``E' = -(3/4) E^2 + E^3/4``, of spectral norm at most that
      bound (plus the rounding of that product, a few eps); returned without another Gram
      matrix;
    - otherwise the degree-4 Taylor polynomial of ``(I + E)^(-1/2)`` (``E^2``, one product by it,
      one by ``W``: three products) leaves every singular value ``s = sqrt(1 + e)`` at ``1 +
      O(e^5)`` (``0.25 e^5``: 1.2e-7 from ``|e| = 0.055``, an Adam step on a 1024 x 1024 weight),
      and the next iteration measures the result.

    Every singular vector is kept; only the singular values move to 1."""
    out = _polar_near(w)
    return None if out is None else out[0]


def _gram_error(x: torch.Tensor, rows: bool) -> torch.Tensor:
    e = x @ x.T if rows else x.T @ x
    e.diagonal().sub_(1.0)
    return e


def _polar_near(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if w.numel() == 0 or not w.is_floating_point():
        return None
    rows = w.shape[0] <= w.shape[1]
    eps = torch.finfo(w.dtype).eps
    accept = NEWTON_ACCEPT * eps * math.sqrt(max(w.shape))
    x = w
    e = _gram_error(x, rows)
    last = math.inf
    for it in range(NEWTON_MAX_ITER + 1):
        a = e.abs()
        stats = torch.stack([a.sum(1).max(), a.max(), torch.linalg.vector_norm(e)])
        inf, biggest, fro = stats.tolist()  # one host read
        r = min(inf, fro)  # both bound the spectral norm of the symmetric E
        if not math.isfinite(inf + fro) or biggest >= NEWTON_START or r >= last:
            return None  # NaN or inf, far from the manifold, or not converging
        if it > 0 and r <= accept:
            return x, stats[2] * 0.5
        if 0.75 * r * r + 0.25 * r**3 <= eps:
            return x - (e @ x if rows else x @ e).mul_(0.5), None
        if it == NEWTON_MAX_ITER:
            return None
        e2 = e @ e
        # (I - E/2 + 3/8 E^2) + E^2 (-5/16 E + 35/128 E^2): all polynomials in E, so symmetric
        p = e2 @ (e2 * _C4).add_(e, alpha=_C3)
        p.add_(e2, alpha=_C2).add_(e, alpha=-0.5).diagonal().add_(1.0)
        x = p @ x if rows else x @ p
        e = _gram_error(x, rows)
        last = r
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


#: `stiefel_distance` reads the distance from the Gram matrix where ``||W W^T - I||`` is within this
DISTANCE_NEAR = 1e-3


def stiefel_distance(w: torch.Tensor, far: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The distance of ``w`` (``(m, k)``) to the matrices with orthonormal rows (or columns), from
    one Gram matrix: for ``w = U S V^T`` it is ``||S - I||_F`` (to its polar factor ``U V^T``), and
    each ``s_i - 1 = e_i / (1 + s_i)`` for the eigenvalues ``e_i = s_i^2 - 1`` of ``E = W W^T - I``,
    so ``||E||_F / 2`` (0-d) is that distance within a factor ``1 +- ||E||_2 / 4``, plus the
    rounding of the Gram matrix itself (a few eps sqrt(max(m, k)) of the distance's scale). Where
    ``min(||E||_inf, ||E||_F)`` (a bound on ``||E||_2``) is above `DISTANCE_NEAR`, ``far()``: a
    tensor whose norm is the distance (the caller's ``x - P(x)``)."""
    e = _gram_error(w, w.shape[0] <= w.shape[1])
    fro = torch.linalg.vector_norm(e)
    if not bool(torch.minimum(e.abs().sum(1).max(), fro) <= DISTANCE_NEAR):  # NaN: far
        return far()
    return fro * 0.5


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
    is on the manifold to rounding, else at its polar factor (a closure optimizer such as LBFGS
    evaluates gradients between its own updates, off the manifold).

    Whether ``x`` is on the manifold is read from ``x``: either it is bitwise the matrix this
    bound's last projection wrote, which the projection verified (its Gram matrix, the one
    `on_stiefel` computes, within `polar_near`'s acceptance, tighter than `on_stiefel`'s limit) or
    proved (a Newton-Schulz step from ``||E|| <= r`` with ``(3/4) r^2 + r^3/4 <= eps``) to be on
    it, or `on_stiefel` says so (one Gram matrix). The comparison is of values (one pass over
    ``x``, one host read), not of autograd's version counter, so writes through ``.data`` cannot
    fool it, and a bound rebuilt from a checkpoint (which remembers nothing) decides the same by
    `on_stiefel`. The bound holds the last projected matrix for this (one copy of the
    parameter). On a projected ``x`` the tangent projections at ``x`` and at its recomputed polar
    factor differ by a few eps of the gradient's norm (at most 10 eps measured, 3x5 to 512x4608,
    float32 and float64).

    The residual the audit reports is ``||X X^T - I||_F / 2`` (`stiefel_distance`), the distance
    to the manifold to float rounding, read from the Gram matrix that verified the projection
    where it did, so an audited step costs no second polar decomposition."""

    def __init__(self, constraint, name, param):
        super().__init__(constraint, name, param, Traits(projects_grad=True, reduces=None))
        self.rows = param.shape[0]
        # the matrix the last projection wrote and its measured distance (None: proved, not
        # measured); dropped by a projection that falls back to the SVD unpolished
        self._last: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def project_(self, x):
        q, on, distance = polar(_matrix_view(x, self.rows))
        _write_(x, q)
        self._last = (q, distance) if on else None

    def gap(self, x):
        return x - polar_factor(_matrix_view(x, self.rows)).view(x.shape)

    def residual(self, x, out=None):
        w = _matrix_view(x, self.rows)
        last = self._known(w)
        if last is not None and last[1] is not None:
            return last[1]
        return stiefel_distance(w, lambda: self.gap(x))

    def _known(self, w: torch.Tensor):
        """The last projection's record when ``w`` is bitwise the matrix it wrote, else None."""
        last = self._last
        if last is None:
            return None
        q = last[0]
        if q.shape != w.shape or q.dtype != w.dtype or q.device != w.device or not torch.equal(q, w):
            return None
        return last

    def _on_manifold(self, x) -> torch.Tensor:
        w = _matrix_view(x, self.rows)
        return w if self._known(w) is not None or on_stiefel(w) else polar_factor(w)

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
