"""Targets, bad input and the promise that a failed call changes nothing."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import constrained_optim as co


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def warm(model, opt, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8)).pow(2).sum().backward()
        opt.step()


def snapshot(model, inner):
    return copy.deepcopy([p.detach() for p in model.parameters()]), copy.deepcopy(inner.state_dict())


def assert_unchanged(model, inner, snap):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    now = inner.state_dict()
    assert now["param_groups"] == state["param_groups"]
    for key, entry in state["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(now["state"][key][name]), torch.as_tensor(value))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Net()
    inner = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = co.ConstrainedOptimizer(inner, model)
    warm(model, opt)
    return model, inner, opt


@pytest.fixture
def plain():
    """A warm optimizer no engine has taken yet (one engine per optimizer)."""
    torch.manual_seed(0)
    model = Net()
    inner = torch.optim.Adam(model.parameters(), lr=0.1)
    warm(model, inner)
    return model, inner


def bound_names(opt):
    return sorted(b.name for b in opt.engine.bounds.values())


# -- targets ---------------------------------------------------------------------------------------
def test_targets_by_name_module_glob_regex_and_parameter(setup):
    model, _, opt = setup
    opt.attach("features.0.weight", co.Fixed((..., 1, 1)))
    assert bound_names(opt) == ["features.0.weight"]
    opt.attach("head", co.MaxNorm(1.0) if hasattr(co, "MaxNorm") else co.Mask(torch.ones(2, 4)))
    assert "head.weight" in bound_names(opt)
    opt.detach("*")
    opt.attach("features.*.weight", co.Fixed((..., 0, 0), 0.0))
    assert bound_names(opt) == ["features.0.weight", "features.2.weight"]
    opt.detach("features.*")
    opt.attach(re.compile(r"features\.\d\.bias"), co.Mask(torch.tensor([1, 0, 1, 0])))
    assert bound_names(opt) == ["features.0.bias", "features.2.bias"]
    opt.detach(re.compile(".*"))
    opt.attach(model.head.bias, co.Mask(torch.tensor([True, False])))
    assert bound_names(opt) == ["head.bias"]


def test_regex_is_matched_against_the_whole_name(setup):
    _, _, opt = setup
    with pytest.raises(co.ConstraintError, match="matches no parameter"):
        opt.attach(re.compile(r"weight"), co.Fixed((..., 0)))


def test_constraints_argument_is_attach_for_each(plain):
    model, inner = plain
    opt = co.ConstrainedOptimizer(inner, model, {"head": co.Mask(torch.ones(2, 4, dtype=torch.bool))})
    assert bound_names(opt) == ["head.weight"]


@pytest.mark.parametrize("how", ["wrapper", "constrain"])
def test_constraints_argument_is_all_or_nothing(plain, how):
    """One unfit entry in ``constraints`` leaves the others unattached and every tensor as it was."""
    model, inner = plain
    snap = snapshot(model, inner)
    constraints = {"features.0.weight": co.Fixed((..., 1, 1)), "head.weight": co.Symmetric()}
    with pytest.raises(co.ConstraintError, match=r"head\.weight \(shape \(2, 4\)"):
        if how == "wrapper":
            co.ConstrainedOptimizer(inner, model, constraints)
        else:
            co.constrain(inner, model, constraints)
    assert_unchanged(model, inner, snap)
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks
    assert "step" not in vars(inner)  # no step wrapper installed


def test_unknown_target_names_the_closest_parameters(setup):
    model, inner, opt = setup
    snap = snapshot(model, inner)
    with pytest.raises(co.ConstraintError) as err:
        opt.attach("features.0.wieght", co.Fixed((..., 1, 1)))
    assert "features.0.weight" in str(err.value)
    with pytest.raises(co.ConstraintError, match="closest"):
        opt.attach("featurs.*.weight", co.Fixed((..., 1, 1)))
    assert_unchanged(model, inner, snap)
    assert not opt.engine.bounds


def test_parameter_the_optimizer_does_not_hold_is_refused(setup):
    model, inner, _ = setup
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.head.parameters(), lr=0.1), model)
    with pytest.raises(co.ConstraintError, match=r"features\.0\.weight.*not held"):
        opt.attach("features.0.weight", co.Fixed((..., 1, 1)))
    stranger = nn.Parameter(torch.zeros(3))
    with pytest.raises(co.ConstraintError, match="not a parameter of the model"):
        opt.attach(stranger, co.Fixed(0))


def test_without_a_model_parameters_are_named_by_position():
    p, q = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(2))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([p, q], lr=0.1)).attach(p, co.Symmetric())
    assert bound_names(opt) == ["param_groups[0].params[0]"]
    assert torch.equal(p, p.T)


def test_not_a_constraint_is_refused(setup):
    _, _, opt = setup
    with pytest.raises(co.ConstraintError, match="needs a constraint"):
        opt.attach("head", lambda w: w)


# -- shapes and a failed attach changes nothing ------------------------------------------------------
BAD = [
    (
        "head.weight",
        lambda: co.Mask(torch.ones(3, dtype=torch.bool)),
        r"head\.weight \(shape \(2, 4\).*broadcastable",
    ),
    ("head.weight", lambda: co.Fixed(torch.ones(5, dtype=torch.bool)), r"head\.weight \(shape \(2, 4\)"),
    ("head.weight", lambda: co.Fixed((..., 7)), r"head\.weight \(shape \(2, 4\).*does not index"),
    ("head.weight", lambda: co.Fixed((...,), torch.ones(3)), r"head\.weight \(shape \(2, 4\).*value"),
    (
        "head.weight",
        lambda: co.Tied(torch.zeros(3, dtype=torch.long)),
        r"head\.weight \(shape \(2, 4\).*trailing shape",
    ),
    ("head.weight", lambda: co.Symmetric(), r"head\.weight \(shape \(2, 4\).*equal sizes"),
    ("head.weight", lambda: co.Symmetric(dims=(0, 5)), r"head\.weight \(shape \(2, 4\).*out of range"),
    ("head.weight", lambda: co.Subspace(torch.ones(2, 3, 3)), r"head\.weight \(shape \(2, 4\).*basis"),
    (
        "head.weight",
        lambda: co.Affine(torch.ones(1, 4), torch.ones(3)),
        r"head\.weight \(shape \(2, 4\).*offset",
    ),
    ("head.weight", lambda: co.Invariant.rotations(), r"head\.weight \(shape \(2, 4\).*returned"),
    ("head.weight", lambda: co.Invariant([lambda x: x, lambda x: 2 * x]), r"head\.weight.*(norm|group)"),
    ("head.weight", lambda: co.Invariant([lambda x: x, lambda x: x.abs()]), r"head\.weight.*linear"),
    (
        "head.weight",
        lambda: co.Invariant([lambda x: x, lambda x: x.roll(1, -1)]),
        r"head\.weight.*not a group",
    ),
]


@pytest.mark.parametrize("target, make, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_shape_raises_naming_the_parameter_and_changes_nothing(setup, target, make, message):
    model, inner, opt = setup
    opt.attach("features.0.weight", co.Fixed((..., 1, 1)))
    snap = snapshot(model, inner)
    with pytest.raises(co.ConstraintError, match=message):
        opt.attach(target, make())
    assert_unchanged(model, inner, snap)
    assert bound_names(opt) == ["features.0.weight"]


def test_a_glob_with_one_unfit_match_changes_nothing(setup):
    """Symmetric fits features.2.weight (4, 4, 3, 3) but not features.0.weight (4, 3, 3, 3)."""
    model, inner, opt = setup
    snap = snapshot(model, inner)
    with pytest.raises(co.ConstraintError, match=r"features\.0\.weight \(shape \(4, 3, 3, 3\)"):
        opt.attach("features.*.weight", co.Symmetric())
    assert_unchanged(model, inner, snap)
    assert not opt.engine.bounds


def test_integer_parameter_is_refused():
    model = nn.Module()
    model.count = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
    opt = co.ConstrainedOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), model)
    with pytest.raises(co.ConstraintError):
        opt.attach("count", co.Mask(torch.ones(3, dtype=torch.bool)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"audit_every": -1}, "audit_every"),
        ({"log_every": 0}, "log_every"),
        ({"tolerance": -1.0}, "tolerance"),
        ({"on_violation": "explode"}, "on_violation"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(co.ConstraintError, match=message):
        co.ConstrainedOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), **kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: co.Mask(torch.tensor([0, 2])), "bool or 0/1"),
        (lambda: co.Tied(torch.tensor([0.5, 1.0])), "integer"),
        (lambda: co.Fixed(torch.tensor([1, 0])), "bool mask or an index"),
        (lambda: co.Symmetric(dims=(0, 1, 2)), "pair"),
        (lambda: co.Invariant([]), "non-empty"),
        (lambda: co.Subspace(torch.ones(3, dtype=torch.long)), "floating"),
    ],
)
def test_bad_constructor_arguments(make, message):
    with pytest.raises(co.ConstraintError, match=message):
        make()


# -- intersections, detach, check, project_ ---------------------------------------------------------
def test_check_names_each_parameter_off_its_set(setup):
    model, _, opt = setup
    opt.attach("features.0.weight", co.Fixed((..., 1, 1), 0.0)).attach(
        "head.bias", co.Mask(torch.tensor([True, False]))
    )
    opt.check()
    with torch.no_grad():
        model.features[0].weight[0, 0, 1, 1] = 0.5
        model.head.bias[1] = 2.0
    with pytest.raises(co.ConstraintViolation) as err:
        opt.check()
    assert "features.0.weight: distance 0.5" in str(err.value) and "head.bias: distance 2" in str(err.value)
    opt.check(atol=3.0)
    opt.project_()
    opt.check()


def test_detach_stops_enforcing(setup):
    model, _, opt = setup
    opt.attach("head.bias", co.Mask(torch.tensor([True, False])))
    opt.detach("head.bias")
    warm(model, opt, 3)
    assert float(model.head.bias[1].detach().abs()) > 0
    with pytest.raises(co.ConstraintError, match="no constrained parameter"):
        opt.detach("head.bias")


def test_wrapper_shares_the_wrapped_optimizer_objects(setup):
    _, inner, opt = setup
    assert (
        opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    )
    assert isinstance(opt, torch.optim.Optimizer)
    with pytest.raises(TypeError):
        co.ConstrainedOptimizer(object())


def test_sparse_gradients_are_made_dense_for_the_projection():
    """nn.Embedding(sparse=True) gives sparse gradients; the projected one is dense."""
    emb = nn.Embedding(5, 3, sparse=True)
    opt = co.ConstrainedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9), emb)
    opt.attach("weight", co.Mask(torch.tensor([True, False, True])))
    before = emb.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        emb(torch.tensor([1, 2])).sum().backward()
        assert emb.weight.grad.is_sparse
        opt.step()
        assert bool((emb.weight.detach()[:, 1] == 0).all())
    assert torch.equal(emb.weight.detach()[[0, 3, 4]][:, [0, 2]], before[[0, 3, 4]][:, [0, 2]])
    assert not torch.equal(emb.weight.detach()[[1, 2]][:, [0, 2]], before[[1, 2]][:, [0, 2]])


def test_sparse_adam_is_refused():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = co.ConstrainedOptimizer(torch.optim.SparseAdam(emb.parameters()), emb)
    with pytest.raises(co.ConstraintError, match="SparseAdam"):
        opt.attach("weight", co.Mask(torch.tensor([True, False, True])))
