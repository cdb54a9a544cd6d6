"""Spans of given tensors: `Subspace` (``span(basis)``) and `Affine` (``offset + span(basis)``).

The basis is orthonormalised once at attach (an SVD in float64, which also drops dependent
directions), so each step is two matrix products: ``x <- (x Q) Q^T``.
"""

from __future__ import annotations

import torch

from ..errors import ConstraintError, describe
from .base import Bound, Constraint, TensorLike, Traits, finite_or_raise, trailing_or_full

SPAN = Traits(linear=True, convex=True, projects_grad=True, reduces=None)


# -- pure maths ---------------------------------------------------------------------------------
def orthonormal_basis(basis: torch.Tensor) -> torch.Tensor:
    """``Q`` of shape ``(n, r)`` with orthonormal columns spanning the ``k`` rows of ``basis``
    (``(k, n)``); ``r <= k`` is its numerical rank."""
    b = basis.to(torch.float64)
    if b.numel() == 0:  # no directions, or directions in an empty space
        return b.new_zeros(b.shape[1], 0)
    u, s, _ = torch.linalg.svd(b.T, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return u[:, :0]
    rank = int((s > s[0] * max(b.shape) * torch.finfo(torch.float64).eps).sum())
    return u[:, :rank]


def subspace_values(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The projection onto ``{x : x = Q c}`` row-wise, ``(x Q) Q^T`` with ``x`` viewed as
    ``(lead, n)``, as a new tensor shaped like ``x``."""
    if x.numel() == 0:
        return x.clone()
    flat = x.reshape(-1, q.shape[0])
    return ((flat @ q) @ q.T).view(x.shape)


def subspace_project_(x: torch.Tensor, q: torch.Tensor) -> None:
    """``x <- (x Q) Q^T``, written back once."""
    x.copy_(subspace_values(x, q))


def affine_project_(x: torch.Tensor, q: torch.Tensor, offset_perp: torch.Tensor) -> None:
    """Project onto ``{o + Q c}``: ``x <- (x Q) Q^T + o_perp``, ``o_perp = o - (o Q) Q^T``,
    written back once."""
    x.copy_(subspace_values(x, q).add_(offset_perp))


# -- classes -----------------------------------------------------------------------------------------
class Subspace(Constraint):
    """The span of the basis tensors: ``{W : W = sum_k c_k B_k}`` (orthogonal projection).

    ``basis`` has shape ``(k, *shape)`` with ``shape`` the parameter's (one span for the whole
    tensor) or its trailing shape (the same span independently for each leading index). The
    basis need not be orthonormal or independent, but must be finite. With an orthonormal
    basis, SGD on ``W`` under this constraint gives the same iterates as SGD on ``theta`` of
    ``W = Q theta``.

    The kernel ``[[a+b, a-b], [a-b, a+b]]`` is the span of ``[[1, 1], [1, 1]]`` and
    ``[[1, -1], [-1, 1]]``:

    >>> import torch, constrained_optim as co
    >>> basis = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]]])
    >>> w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [4.0, 3.0]]))
    >>> with torch.no_grad():
    ...     co.Subspace(basis).bind(w, "w").project_(w)
    >>> w.data
    tensor([[2., 3.],
            [3., 2.]])
    """

    linear = True

    def __init__(self, basis: TensorLike) -> None:
        basis = torch.as_tensor(basis)
        if basis.dim() < 1 or not basis.is_floating_point():
            raise ConstraintError(
                f"{type(self).__name__}: basis must be a floating tensor of shape (k, *shape), "
                f"got {basis.dtype} of shape {tuple(basis.shape)}"
            )
        finite_or_raise(basis, type(self).__name__, "basis")
        self.basis = basis

    def _span(self, param, name):
        k, pattern = self.basis.shape[0], tuple(self.basis.shape[1:])
        if trailing_or_full(param.shape, pattern) < 0:
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} has basis tensors of shape {pattern}, "
                "expected the parameter's shape or its trailing shape"
            )
        try:
            q = orthonormal_basis(self.basis.reshape(k, -1))
        except torch.linalg.LinAlgError as err:
            raise ConstraintError(
                f"{describe(name, param)}: {self!r}: the SVD of the basis failed ({err})"
            ) from None
        return q.to(device=param.device, dtype=param.dtype).contiguous(), pattern

    def _bind(self, param, name, owner):
        q, _ = self._span(param, name)
        return SubspaceBound(self, name, param, q)

    def __repr__(self):
        return f"{type(self).__name__}({self.basis.shape[0]} x {tuple(self.basis.shape[1:])})"


class Affine(Subspace):
    """``offset + span(basis)``: ``{W : W = O + sum_k c_k B_k}`` (orthogonal projection).

    ``offset`` is finite and broadcastable to the parameter; ``basis`` as in `Subspace`.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> with torch.no_grad():
    ...     co.Affine(torch.tensor([[1.0, -1.0]]), torch.tensor([1.0, 1.0])).bind(w, "w").project_(w)
    >>> w.data
    tensor([1., 1.])
    """

    def __init__(self, basis: TensorLike, offset: TensorLike) -> None:
        super().__init__(basis)
        self.offset = torch.as_tensor(offset, dtype=self.basis.dtype)
        finite_or_raise(self.offset, "Affine", "offset")

    def _bind(self, param, name, owner):
        q, _ = self._span(param, name)
        try:
            offset = self.offset.to(device=param.device, dtype=param.dtype).expand(param.shape)
        except RuntimeError:
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} has an offset of shape "
                f"{tuple(self.offset.shape)}, expected one broadcastable to {tuple(param.shape)}"
            ) from None
        return AffineBound(self, name, param, q, offset - subspace_values(offset, q))


def _orthonormal(q: torch.Tensor) -> bool:
    """``Q^T Q = I`` to about a thousand rounding errors of ``Q``'s dtype."""
    q64 = q.double()
    gram = q64.T @ q64
    error = (gram - torch.eye(gram.shape[0], dtype=torch.float64, device=q.device)).abs()
    return not error.numel() or float(error.max()) <= 1e3 * torch.finfo(q.dtype).eps


class SubspaceBound(Bound):
    """``span(Q)`` for ``Q`` (``(n, r)``, orthonormal columns), row-wise over leading dims. The
    checkpoint holds ``basis`` (``Q``)."""

    def __init__(self, constraint, name, param, basis):
        super().__init__(constraint, name, param, SPAN)
        self.basis = basis

    def project_(self, x):
        subspace_project_(x, self.basis)

    def project_grad_(self, g, x):
        subspace_project_(g, self.basis)

    def state_tensors(self):
        return {"basis": self.basis}

    def check_values(self, tensors):
        if not _orthonormal(tensors["basis"]):
            return False, "basis must have orthonormal columns"
        return True, ""


class AffineBound(SubspaceBound):
    """``offset + span(Q)`` with ``offset`` (shaped like the parameter) orthogonal to the span."""

    def __init__(self, constraint, name, param, basis, offset):
        super().__init__(constraint, name, param, basis)
        self.offset = offset

    def project_(self, x):
        affine_project_(x, self.basis, self.offset)

    def state_tensors(self):
        return {"basis": self.basis, "offset": self.offset}

    def check_values(self, tensors):
        ok, reason = super().check_values(tensors)
        if not ok or not tensors["offset"].numel():
            return ok, reason
        basis, offset = tensors["basis"].double(), tensors["offset"].double()
        along = offset.reshape(-1, basis.shape[0]) @ basis
        limit = 1e3 * torch.finfo(tensors["offset"].dtype).eps * max(1.0, float(offset.abs().max()))
        if along.numel() and float(along.abs().max()) > limit:
            return False, "offset must be orthogonal to the basis"
        return True, ""
