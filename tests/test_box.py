"""`Box` and `NonNegative`: the clamp, per-entry bounds, the grouped (foreach) path and bad input."""

from __future__ import annotations

import pytest
import torch

import constrained_optim as co
from constrained_optim.constraints.coordinate import BoxBound


def bind(constraint, shape, dtype=torch.float32):
    return constraint.bind(torch.nn.Parameter(torch.zeros(shape, dtype=dtype)), "w")


def test_box_is_the_entrywise_clamp_with_broadcast_bounds():
    low = torch.tensor([[-1.0], [0.0], [0.5]])  # per row
    high = torch.tensor([0.5, 1.0, 2.0, 3.0])  # per column
    x = torch.randn(3, 4) * 3
    y = x.clone()
    bind(co.Box(low, high), (3, 4)).project_(y)
    for i in range(3):
        for j in range(4):
            assert y[i, j] == min(max(float(x[i, j]), float(low[i, 0])), float(high[j]))


@pytest.mark.parametrize("low, high", [(None, 1.0), (-1.0, None), (None, None), (0, 0)])
def test_one_sided_and_degenerate_boxes(low, high):
    x = torch.randn(5) * 3
    y = x.clone()
    bind(co.Box(low, high), (5,)).project_(y)
    expected = x
    if low is not None:
        expected = expected.clamp_min(low)
    if high is not None:
        expected = expected.clamp_max(high)
    assert torch.equal(y, expected)


def test_non_negative_keeps_the_positive_part_and_trains():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    opt.attach("weight", co.NonNegative())
    x = torch.randn(8, 5)
    for _ in range(4):
        opt.zero_grad()
        (model(x) - 1).pow(2).mean().backward()
        opt.step()
        assert float(model.weight.detach().min()) >= 0.0
    assert all(r.residual == 0.0 for r in opt.audit.history)
    assert max(r.drift for r in opt.audit.history) > 0  # Adam pushed entries below 0; they came back


def test_grouped_path_equals_per_tensor_path_with_mixed_bounds():
    """One group holds scalar, tensor and one-sided bounds over tensors of different shapes; the
    foreach path gives bitwise the same result as projecting each tensor alone."""
    specs = [
        (co.Box(-0.5, 0.5), (3, 4)),
        (co.Box(torch.tensor([0.0, -1.0, -2.0]), 1.0), (2, 3)),
        (co.NonNegative(), (7,)),
        (co.Box(high=torch.full((2, 1, 1), 0.25)), (2, 3, 3)),
        (co.NormBall(0.3, p=float("inf")), (4,)),
        (co.Box(-0.5, torch.zeros(130, 1)), (130, 130)),  # large: clamped alone, in one pass
        (co.Box(-0.25, 0.25), (130, 130)),
    ]
    bounds = [bind(c, s) for c, s in specs]
    assert {type(b) for b in bounds} == {BoxBound}
    xs = [torch.randn(s) * 2 for _, s in specs]
    singles = [x.clone() for x in xs]
    for b, x in zip(bounds, singles):
        b.project_(x)
    grouped = [x.clone() for x in xs]
    BoxBound.project_all_(bounds, grouped)
    for a, b in zip(singles, grouped):
        assert torch.equal(a, b)


def test_the_engine_groups_boxes_into_one_foreach_call():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model)
    opt.attach("*.weight", co.Box(-0.1, 0.1)).attach("0.bias", co.NonNegative())
    kinds = [group.kind for group in opt.engine.binding.groups]
    assert kinds == [BoxBound]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert (
        bool((model[0].weight.detach().abs() <= torch.tensor(0.1)).all())
        and float(model[0].bias.detach().min()) >= 0
    )


@pytest.mark.parametrize(
    "low, high, match",
    [
        (1.0, 0.0, "low > high"),
        (torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), "low > high"),
        (torch.zeros(2), torch.ones(3), "do not broadcast"),
        (float("nan"), None, "NaN"),
        (torch.tensor([True]), None, "real number"),
    ],
)
def test_bad_boxes_raise(low, high, match):
    with pytest.raises(co.ConstraintError, match=match):
        co.Box(low, high)


def test_a_bound_that_does_not_fit_the_parameter_is_named_at_attach():
    model = torch.nn.Linear(3, 4)
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(co.ConstraintError, match=r"weight \(shape \(4, 3\).*low of shape \(5,\)"):
        opt.attach("weight", co.Box(torch.zeros(5), 1.0))
