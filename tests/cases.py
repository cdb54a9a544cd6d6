"""Every constraint, as a case the shared contract suite (`test_contract.py`) runs over.

A case builds the constraint and names a parameter shape it takes. ``violation(x)`` measures how
far ``x`` is off the set, written from the set's mathematical definition, independently of the
library's projection code, so "the projection lands in the set" is checked against the maths.
``feasible(gen, shape)`` draws points of the set, for the nearest-point property of convex sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import constrained_optim as co


@dataclass
class Case:
    id: str
    make: Callable[[], co.Constraint]
    shape: tuple[int, ...]
    violation: Callable[[torch.Tensor], float]
    linear: bool = False  # a linear or affine set: P is an orthogonal (affine) projection
    convex: bool = False
    feasible: Callable[[torch.Generator, tuple, torch.dtype], torch.Tensor] | None = None
    tangent_violation: Callable[[torch.Tensor, torch.Tensor], float] | None = None  # (g, x)
    exact: bool = False  # after every optimizer step the violation is exactly 0.0 (bitwise)
    rtol: float = 1e-6  # otherwise violation <= rtol * max(1, |x|_max) after every step
    extra: dict = field(default_factory=dict)


def _max(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


# -- shared data ----------------------------------------------------------------------------------
MASK = torch.tensor([[True, False, True], [False, True, True]])
CENTRE_HELD = torch.zeros(3, 3, dtype=torch.bool)
CENTRE_HELD[1, 1] = True
FIXED_VALUE = torch.arange(9.0).view(3, 3) / 4
TIED_LABELS = torch.tensor([[0, 1], [1, 0]])
SUBSPACE_BASIS = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]]])
AFFINE_OFFSET = torch.tensor([[0.5, -1.0], [2.0, 0.25]])


def _with(x, index, value):
    x[index] = value
    return x


def _plus(a, t):
    return a + t(a)


def _rot_violation(x, dims=(-2, -1)):
    return max(_max(x - torch.rot90(x, k, dims)) for k in range(1, 4))


def _sym_violation(x, dims=(0, 1), flip=()):
    t = x.transpose(*dims) if dims else x
    return _max(x - (t.flip(flip) if flip else t))


def _tied_violation(x, labels):
    flat = x.reshape(-1, labels.numel())
    lab = labels.flatten()
    return max(_max(flat[:, lab == v] - flat[:, lab == v][:, :1]) for v in lab.unique())


def _in_span(x, basis, offset=None):
    k = basis.shape[0]
    b = basis.reshape(k, -1).double()
    flat = x.double().reshape(-1, b.shape[1])
    if offset is not None:
        flat = flat - offset.double().expand(x.shape).reshape(-1, b.shape[1])
    coef = torch.linalg.lstsq(b.T, flat.T).solution
    return _max(flat.T - b.T @ coef)


def _sign_flip_group():
    return [lambda x: x, lambda x: -x.flip(-1)]


LINEAR_CASES = [
    Case("Mask", lambda: co.Mask(MASK), (4, 2, 3), lambda x: _max(x[..., ~MASK]), exact=True, linear=True,
         convex=True, feasible=lambda g, s, d: torch.randn(s, generator=g, dtype=d) * MASK),
    Case("Fixed-index", lambda: co.Fixed((..., 1, 1), 0.0), (3, 2, 3, 3),
         lambda x: _max(x[..., 1, 1]), exact=True, linear=True, convex=True,
         feasible=lambda g, s, d: _with(torch.randn(s, generator=g, dtype=d), (..., 1, 1), 0.0)),
    Case("Fixed-mask-value", lambda: co.Fixed(CENTRE_HELD, FIXED_VALUE), (2, 3, 3),
         lambda x: _max(x[..., CENTRE_HELD] - FIXED_VALUE[CENTRE_HELD].to(x.dtype)),
         exact=True, linear=True, convex=True,
         feasible=lambda g, s, d: torch.where(CENTRE_HELD, FIXED_VALUE.to(d), torch.randn(s, generator=g, dtype=d))),
    Case("Tied", lambda: co.Tied(TIED_LABELS), (3, 2, 2),
         lambda x: _tied_violation(x, TIED_LABELS), exact=True, linear=True, convex=True,
         feasible=lambda g, s, d: torch.randn(s[0], 2, generator=g, dtype=d)[:, TIED_LABELS]),
    Case("Symmetric", lambda: co.Symmetric(), (4, 4), _sym_violation, exact=True, linear=True, convex=True,
         feasible=lambda g, s, d: _plus(torch.randn(s, generator=g, dtype=d), lambda a: a.T)),
    Case("Symmetric-flip", lambda: co.Symmetric(dims=(0, 1), flip=(2, 3)), (3, 3, 3, 3),
         lambda x: _sym_violation(x, (0, 1), (2, 3)), exact=True, linear=True, convex=True,
         feasible=lambda g, s, d: _plus(torch.randn(s, generator=g, dtype=d), lambda a: a.transpose(0, 1).flip(2, 3))),
    Case("Invariant-rotations", lambda: co.Invariant.rotations(), (2, 3, 3), _rot_violation,
         linear=True, convex=True,
         feasible=lambda g, s, d: sum(torch.rot90(a, k, (-2, -1)) for a in [torch.randn(s, generator=g, dtype=d)] for k in range(4))),
    Case("Invariant-signed", lambda: co.Invariant(_sign_flip_group()), (2, 5),
         lambda x: _max(x + x.flip(-1)), linear=True, convex=True,
         feasible=lambda g, s, d: _plus(torch.randn(s, generator=g, dtype=d), lambda a: -a.flip(-1))),
    Case("Invariant-callables", lambda: co.Invariant([lambda x: x, lambda x: x @ REFLECT_60.to(x)]),
         (3, 2), lambda x: _max(x - x @ REFLECT_60.to(x)), linear=True, convex=True,
         feasible=lambda g, s, d: _plus(torch.randn(s, generator=g, dtype=d), lambda a: a @ REFLECT_60.to(a))),
    Case("Subspace", lambda: co.Subspace(SUBSPACE_BASIS), (3, 2, 2),
         lambda x: _in_span(x, SUBSPACE_BASIS), linear=True, convex=True,
         feasible=lambda g, s, d: torch.einsum("lk,k...->l...", torch.randn(s[0], 2, generator=g, dtype=d), SUBSPACE_BASIS.to(d))),
    Case("Affine", lambda: co.Affine(SUBSPACE_BASIS, AFFINE_OFFSET), (3, 2, 2),
         lambda x: _in_span(x, SUBSPACE_BASIS, AFFINE_OFFSET), linear=True, convex=True,
         feasible=lambda g, s, d: AFFINE_OFFSET.to(d) + torch.einsum("lk,k...->l...", torch.randn(s[0], 2, generator=g, dtype=d), SUBSPACE_BASIS.to(d))),
]

# a reflection of the plane (axis at 30 degrees), acting on the last dim of a (..., 2) tensor:
# orthogonal but not a permutation, so `Invariant` takes its general group-average path
REFLECT_60 = torch.tensor([[0.5, 3**0.5 / 2], [3**0.5 / 2, -0.5]], dtype=torch.float64)

# the non-linear sets (Box, norm balls, simplex, manifolds, sparsity, custom and composite)
NONLINEAR_CASES: list[Case] = []

CASES = LINEAR_CASES + NONLINEAR_CASES
