"""Bad arguments to the non-linear sets raise `ConstraintError` saying what is wrong; a failed
attach names the parameter and its shape and leaves parameters and optimizer state untouched."""

from __future__ import annotations

import math

import pytest
import torch

import constrained_optim as co


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: co.NormBall(0.0), "radius must be a positive"),
        (lambda: co.NormBall(-1.0, p=1), "radius must be a positive"),
        (lambda: co.NormBall(math.inf), "finite"),
        (lambda: co.NormBall(1.0, p=3), "p must be 1, 2 or inf"),
        (lambda: co.NormBall(1.0, p=0.5), "p must be 1, 2 or inf"),
        (lambda: co.NormBall("big"), "radius must be a positive number"),
        (lambda: co.MaxNorm(0), "max_value must be a positive"),
        (lambda: co.MaxNorm(-3.0), "max_value must be a positive"),
        (lambda: co.Simplex(radius=0.0), "radius must be a positive"),
        (lambda: co.Simplex(dim=None), "dim must be"),
        (lambda: co.Box(2.0, 1.0), "low > high"),
        (lambda: co.LowRank(0), "rank must be an int >= 1"),
        (lambda: co.NMSparsity(0, 4), "1 <= n <= m"),
        (lambda: co.NMSparsity(5, 4), "1 <= n <= m"),
        (lambda: co.Projection("not callable"), "callable"),
        (lambda: co.Intersection(), "at least one"),
    ],
    ids=lambda v: None,
)
def test_constructors_reject_bad_arguments(make, match):
    with pytest.raises(co.ConstraintError, match=match):
        make()


@pytest.mark.parametrize(
    "constraint, target, match",
    [
        (co.Orthogonal(), "bias", r"bias \(shape \(4,\), torch.float32\).*at least 2 dims"),
        (co.LowRank(2), "bias", r"bias \(shape \(4,\), torch.float32\).*at least 2 dims"),
        (
            co.NMSparsity(2, 4),
            "weight",
            r"weight \(shape \(4, 6\), torch.float32\).*size 6 is not a multiple of 4",
        ),
        (co.NMSparsity(2, 4, dim=0), "weight", None),  # 4 rows: fits
        (co.NormBall(1.0, dim=3), "weight", r"weight \(shape \(4, 6\).*dim 3 is out of range"),
        (co.MaxNorm(1.0, dim=(1, 1)), "weight", r"weight \(shape \(4, 6\).*repeat"),
        (co.Box(torch.zeros(3), 1.0), "weight", r"weight \(shape \(4, 6\).*low of shape \(3,\)"),
        (co.Simplex(dim=2), "bias", r"bias \(shape \(4,\).*dim 2 is out of range"),
    ],
)
def test_attach_names_the_parameter_and_what_is_wrong(constraint, target, match):
    model = torch.nn.Linear(6, 4)
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    if match is None:
        opt.attach(target, constraint)
        return
    with pytest.raises(co.ConstraintError, match=match):
        opt.attach(target, constraint)


def warm(model, opt, steps=2):
    x = torch.randn(4, 6)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
        for n, p in model.named_parameters()
    }
    return params, state


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(pa[n], pb[n]) for n in pa) and all(
        torch.equal(sa[n][k], sb[n][k]) if torch.is_tensor(sa[n][k]) else sa[n][k] == sb[n][k]
        for n in sa
        for k in sa[n]
    )


@pytest.mark.parametrize(
    "constraint",
    [co.Orthogonal(), co.LowRank(1), co.NMSparsity(2, 4, dim=0), co.UnitNorm() & co.Orthogonal()],
    ids=repr,
)
def test_a_failed_attach_changes_nothing(constraint):
    """The glob matches the weight (which the set takes) and the bias (which it cannot): nothing
    is projected, not even the weight, and the warm Adam state is as it was."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    model.bias = torch.nn.Parameter(torch.randn(3))  # no N:M or matrix structure
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    model.forward = lambda x: x @ model.weight.T + model.bias.sum()
    warm(model, opt)
    before = snapshot(model, opt)
    with pytest.raises(co.ConstraintError, match="bias"):
        opt.attach("*", constraint)
    assert same(before, snapshot(model, opt))
    assert not opt.engine.bounds


def test_a_failed_second_attach_keeps_the_first_constraint():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    warm(model, opt)
    opt.attach("weight", co.MaxNorm(0.5))
    bound = opt.engine.bounds[model.weight]
    before = snapshot(model, opt)
    with pytest.raises(co.ConstraintError, match="not a multiple"):
        opt.attach("weight", co.NMSparsity(2, 4))
    assert opt.engine.bounds[model.weight] is bound
    assert same(before, snapshot(model, opt))
