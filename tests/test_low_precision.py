"""Half-precision parameters (bfloat16, float16) are projected in float32 and written back rounded
once: held entries stay exactly at their value and tied entries exactly equal, after every step."""

from __future__ import annotations

import pytest
import torch

import constrained_optim as co
from constrained_optim.constraints.base import LowPrecisionBound

DTYPES = [torch.bfloat16, torch.float16]
LABELS = torch.tensor([[0, 1, 2], [1, 0, 2]])
MASK = torch.tensor([[True, False, True], [True, True, False]])


def sym_flip(w):
    return w.transpose(0, 1).flip(2, 3)


CHECKS = {  # name: (constraint, shape, check(w) -> bool, exact after every step)
    "Mask": (lambda: co.Mask(MASK), (4, 2, 3), lambda w: bool((w[:, ~MASK] == 0).all())),
    "Fixed": (
        lambda: co.Fixed((..., 1, 1), 0.3),
        (3, 2, 3, 3),
        lambda w: bool((w[..., 1, 1] == torch.tensor(0.3, dtype=w.dtype)).all()),
    ),
    "Tied": (
        lambda: co.Tied(LABELS),
        (5, 2, 3),
        lambda w: all(bool((w[:, LABELS == v] == w[:, LABELS == v][:, :1]).all()) for v in range(3)),
    ),
    "Symmetric-flip": (
        lambda: co.Symmetric(flip=(2, 3)),
        (3, 3, 3, 3),
        lambda w: torch.equal(w, sym_flip(w)),
    ),
    "NMSparsity": (
        lambda: co.NMSparsity(2, 4),
        (3, 8),
        lambda w: bool(((w.view(-1, 4) != 0).sum(1) <= 2).all()),
    ),
    "Mask&Tied": (
        lambda: co.Mask(MASK) & co.Tied(LABELS),
        (4, 2, 3),
        lambda w: (
            bool((w[:, ~MASK] == 0).all())
            and all(bool((w[:, LABELS == v] == w[:, LABELS == v][:, :1]).all()) for v in range(3))
        ),
    ),
    "Box": (
        lambda: co.Box(-0.25, 0.5),
        (4, 5),
        lambda w: bool((w >= -0.25).all()) and bool((w <= 0.5).all()),
    ),
}


@pytest.mark.parametrize("opt_name", ["Adam", "SGD-momentum"])
@pytest.mark.parametrize("name", list(CHECKS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_held_and_tied_entries_are_exact_after_every_step(dtype, name, opt_name):
    make, shape, check = CHECKS[name]
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    target = torch.randn(shape)
    # float16 Adam needs an eps float16 can hold: 1e-8 rounds to 0, and a held entry's zeroed
    # second moment then gives 0 / 0
    eps = 1e-4 if dtype == torch.float16 else 1e-8
    inner = (
        torch.optim.Adam([p], lr=0.05, eps=eps)
        if opt_name == "Adam"
        else torch.optim.SGD([p], lr=0.05, momentum=0.9)
    )
    opt = co.ConstrainedOptimizer(inner)
    for _ in range(2):  # warm, unconstrained
        opt.zero_grad()
        (p.float() - target).pow(2).sum().backward()
        opt.step()
    opt.attach(p, make())
    assert isinstance(opt.engine.bounds[p], LowPrecisionBound)
    start = p.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        ((p.float() - target).pow(2).sum() + p.float().sum() ** 2).backward()
        opt.step()
        assert p.dtype == dtype
        assert check(p.detach()), name
    assert not torch.equal(p.detach(), start)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "constraint, shape",
    [
        (co.Tied(torch.zeros(256, dtype=torch.long)), (2, 256)),  # a long sum: float32, then one rounding
        (co.Subspace(torch.randn(3, 4, 4)), (2, 4, 4)),
        (co.UnitNorm(), (3, 64)),
        (co.Simplex(), (2, 50)),
        (co.Orthogonal(), (4, 9)),
    ],
    ids=lambda v: repr(v) if isinstance(v, co.Constraint) else str(v),
)
def test_projection_is_the_float32_projection_rounded_once(dtype, constraint, shape):
    x = torch.randn(shape).to(dtype)
    low = constraint.bind(torch.nn.Parameter(torch.zeros(shape, dtype=dtype)), "w")
    full = constraint.bind(torch.nn.Parameter(torch.zeros(shape)), "w")
    y = x.clone()
    low.project_(y)
    ref = x.float()
    full.project_(ref)
    assert torch.equal(y, ref.to(dtype))
    # the audit measures the rounded point's distance in float32
    assert low.gap(y).dtype == torch.float32


def test_errors_name_the_half_precision_dtype():
    p = torch.nn.Parameter(torch.zeros(3, 6, dtype=torch.bfloat16))
    with pytest.raises(co.ConstraintError, match=r"shape \(3, 6\), torch.bfloat16"):
        co.NMSparsity(2, 4).bind(p, "w")


def test_half_precision_gradients_are_projected_in_float32():
    p = torch.nn.Parameter(torch.linalg.qr(torch.randn(5, 3))[0].T.contiguous().to(torch.bfloat16))
    bound = co.Orthogonal().bind(p, "w")
    g = torch.randn(3, 5).to(torch.bfloat16)
    ref = g.float()
    co.Orthogonal().bind(torch.nn.Parameter(p.detach().float()), "w").project_grad_(ref, p.detach().float())
    bound.project_grad_(g, p.detach())
    assert torch.equal(g, ref.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_path_equals_per_tensor_path(dtype):
    """Half-precision bounds of several families share an engine group; its grouped projection
    (each family's own grouped path, in float32) equals projecting each tensor alone."""
    specs = [
        (co.Mask(MASK), (4, 2, 3)),
        (co.Box(-0.3, 0.3), (5,)),
        (co.Mask(MASK), (2, 3)),
        (co.Tied(LABELS), (3, 2, 3)),
        (co.NonNegative(), (2, 2)),
    ]
    bounds = [c.bind(torch.nn.Parameter(torch.zeros(s, dtype=dtype)), "w") for c, s in specs]
    assert {type(b) for b in bounds} == {LowPrecisionBound}  # one kind, whatever the family
    xs = [torch.randn(s).to(dtype) for _, s in specs]
    singles = [x.clone() for x in xs]
    for b, x in zip(bounds, singles):
        b.project_(x)
    grouped = [x.clone() for x in xs]
    LowPrecisionBound.project_all_(bounds, grouped)
    assert all(torch.equal(a, b) for a, b in zip(singles, grouped))


def test_two_attaches_on_a_half_precision_parameter_intersect_in_float32():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 2, 3).to(torch.bfloat16))
    opt = (
        co.ConstrainedOptimizer(torch.optim.Adam([p], lr=0.05))
        .attach(p, co.Mask(MASK))
        .attach(p, co.Tied(LABELS))
    )
    bound = opt.engine.bounds[p]
    assert isinstance(bound, LowPrecisionBound) and bound.inner.linear
    check = CHECKS["Mask&Tied"][2]
    for _ in range(4):
        opt.zero_grad()
        (p.float() - 1).pow(2).sum().backward()
        opt.step()
        assert check(p.detach())
    assert opt.audit.last[0].residual == 0.0
