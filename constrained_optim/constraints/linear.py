"""Spans of given tensors: `Subspace` (``span(basis)``) and `Affine` (``offset + span(basis)``).

The basis is orthonormalised once at attach (an SVD in float64, which also drops dependent
directions), so each step is two matrix products: ``x <- (x Q) Q^T``.
"""

from __future__ import annotations

import torch

from ..errors import ConstraintError, describe
from .base import Bound, Constraint, trailing_or_full


# -- pure maths ---------------------------------------------------------------------------------
def orthonormal_basis(basis: torch.Tensor) -> torch.Tensor:
    """``Q`` of shape ``(n, r)`` with orthonormal columns spanning the ``k`` rows of ``basis``
    (``(k, n)``); ``r <= k`` is its numerical rank."""
    b = basis.to(torch.float64)
    u, s, _ = torch.linalg.svd(b.T, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return u[:, :0]
    rank = int((s > s[0] * max(b.shape) * torch.finfo(torch.float64).eps).sum())
    return u[:, :rank]


def subspace_project_(x: torch.Tensor, q: torch.Tensor) -> None:
    """Project onto ``{x : x = Q c}`` row-wise: ``x <- (x Q) Q^T`` with ``x`` viewed as ``(lead, n)``."""
    flat = x.reshape(-1, q.shape[0])
    x.copy_(((flat @ q) @ q.T).view(x.shape))


def affine_project_(x: torch.Tensor, q: torch.Tensor, offset_perp: torch.Tensor) -> None:
    """Project onto ``{o + Q c}``: ``x <- (x Q) Q^T + o_perp``, ``o_perp = o - (o Q) Q^T``."""
    subspace_project_(x, q)
    x.add_(offset_perp)


# -- classes -----------------------------------------------------------------------------------------
class Subspace(Constraint):
    """The span of the basis tensors: ``{W : W = sum_k c_k B_k}`` (orthogonal projection).

    ``basis`` has shape ``(k, *shape)`` with ``shape`` the parameter's (one span for the whole
    tensor) or its trailing shape (the same span independently for each leading index). The
    basis need not be orthonormal or independent. With an orthonormal basis, SGD on ``W``
    under this constraint gives the same iterates as SGD on ``theta`` of ``W = Q theta``.

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

    def __init__(self, basis):
        basis = torch.as_tensor(basis)
        if basis.dim() < 1 or not basis.is_floating_point():
            raise ConstraintError(
                f"{type(self).__name__}: basis must be a floating tensor of shape (k, *shape), "
                f"got {basis.dtype} of shape {tuple(basis.shape)}"
            )
        self.basis = basis

    def _resolve(self, param, name):
        k, pattern = self.basis.shape[0], tuple(self.basis.shape[1:])
        if trailing_or_full(param.shape, pattern) < 0:
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} has basis tensors of shape {pattern}, "
                "expected the parameter's shape or its trailing shape"
            )
        q = orthonormal_basis(self.basis.reshape(k, -1))
        return q.to(device=param.device, dtype=param.dtype), pattern

    def _bind(self, param, name):
        q, _ = self._resolve(param, name)
        return SubspaceBound(self, name, param, q)

    def __repr__(self):
        return f"{type(self).__name__}({self.basis.shape[0]} x {tuple(self.basis.shape[1:])})"


class Affine(Subspace):
    """``offset + span(basis)``: ``{W : W = O + sum_k c_k B_k}`` (orthogonal projection).

    ``offset`` is broadcastable to the parameter; ``basis`` as in `Subspace`.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> with torch.no_grad():
    ...     co.Affine(torch.tensor([[1.0, -1.0]]), torch.tensor([1.0, 1.0])).bind(w, "w").project_(w)
    >>> w.data
    tensor([1., 1.])
    """

    def __init__(self, basis, offset):
        super().__init__(basis)
        self.offset = torch.as_tensor(offset, dtype=self.basis.dtype)

    def _bind(self, param, name):
        q, _ = self._resolve(param, name)
        try:
            offset = self.offset.to(device=param.device, dtype=param.dtype).expand(param.shape)
        except RuntimeError:
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} has an offset of shape "
                f"{tuple(self.offset.shape)}, expected one broadcastable to {tuple(param.shape)}"
            ) from None
        offset_perp = offset.clone()
        offset_perp.sub_((offset.reshape(-1, q.shape[0]) @ q @ q.T).view(param.shape))
        return AffineBound(self, name, param, q, offset_perp)


class SubspaceBound(Bound):
    projects_grad = True

    def __init__(self, constraint, name, param, q):
        super().__init__(constraint, name, param)
        self.q = q

    def project_(self, x):
        subspace_project_(x, self.q)

    def project_grad_(self, g, x):
        subspace_project_(g, self.q)

    def state_tensors(self):
        return {"basis": self.q}


class AffineBound(SubspaceBound):
    def __init__(self, constraint, name, param, q, offset_perp):
        super().__init__(constraint, name, param, q)
        self.offset_perp = offset_perp

    def project_(self, x):
        affine_project_(x, self.q, self.offset_perp)

    def state_tensors(self):
        return {"basis": self.q, "offset": self.offset_perp}
