"""A malformed checkpoint is refused whole: every field of the constraint state wrong in type,
value or shape, and the format version missing, other or newer, raises `ConstraintError` naming
what is wrong, and nothing changes (parameters, optimizer state, bounds, audit, step count)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import constrained_optim as co

from test_transactions import assert_same, snapshot


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(8, 4))
    opt = co.ConstrainedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.05),
        model,
        {
            "0.weight": co.Mask(torch.rand(4, 4) > 0.5),
            "1.weight": co.Tied(torch.arange(16).view(4, 4) % 5),
            "2.weight": co.Subspace(torch.randn(3, 8, 4)),
            "3.weight": co.Fixed(torch.rand(4, 8) > 0.7, 0.25),
        },
    )
    for k in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(k))).square().mean().backward()
        opt.step()
    return model, opt


def tensors(sd, name):
    return sd["constraints"]["parameters"][name]["tensors"]


def set_path(sd, path, value):
    node = sd
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


DELETE = object()
C = ("constraints",)
P = C + ("parameters",)

BAD = {
    # the format version
    "version missing": (C + ("version",), DELETE, "no format version"),
    "version newer": (C + ("version",), 99, "newer"),
    "version other": (C + ("version",), 0, "format 0"),
    "version a string": (C + ("version",), "1", "must be an int"),
    # the step count
    "steps_taken negative": (C + ("steps_taken",), -1, "steps_taken"),
    "steps_taken a float": (C + ("steps_taken",), 2.5, "steps_taken"),
    "steps_taken a bool": (C + ("steps_taken",), True, "steps_taken"),
    # the audit
    "audit not a dict": (C + ("audit",), [1, 2], "audit"),
    "audit history not a list": (C + ("audit", "history"), "x", "history"),
    "audit record step a string": (C + ("audit", "history", 0, "step"), "x", "step must be an int"),
    "audit record name not a string": (C + ("audit", "last", 0, "name"), 3, "name must be a string"),
    "audit record drift negative": (C + ("audit", "history", 0, "drift"), -1.0, "drift"),
    "audit record missing a field": (C + ("audit", "history", 0, "residual"), DELETE, "expected the fields"),
    "audit max_history negative": (C + ("audit", "max_history"), -3, "max_history"),
    # the parameters' entries
    "parameters not a dict": (P, [], "parameters must be a dict"),
    "entry not a dict": (P + ("0.weight",), "Mask", "expected a dict"),
    "entry type other": (P + ("0.weight", "type"), "Tied", "constraint type"),
    "entry shape other": (P + ("0.weight", "shape"), (4, 5), "shape (4, 5)"),
    "entry shape not ints": (P + ("0.weight", "shape"), ("a", 4), "tuple of ints"),
    "entry missing": (P + ("1.weight",), DELETE, "has no constraint on it"),
    "entry extra": (
        P + ("9.weight",),
        {"type": "Mask", "constraint": "Mask()", "shape": (1,), "tensors": {}},
        "here it has no constraint",
    ),
    # each family's data
    "mask of 7s": (
        P + ("0.weight", "tensors", "keep"),
        torch.full((4, 4), 7, dtype=torch.uint8),
        "only 0 and 1",
    ),
    "mask of another shape": (
        P + ("0.weight", "tensors", "keep"),
        torch.ones(4, 5, dtype=torch.uint8),
        "shape",
    ),
    "mask of another dtype": (P + ("0.weight", "tensors", "keep"), torch.ones(4, 4), "dtype"),
    "mask not a tensor": (P + ("0.weight", "tensors", "keep"), [[1] * 4] * 4, "tensor"),
    "mask key missing": (P + ("0.weight", "tensors", "keep"), DELETE, "expected"),
    "tied label negative": (
        P + ("1.weight", "tensors", "group_ids"),
        -torch.ones(16, dtype=torch.long),
        "group",
    ),
    "tied label too large": (
        P + ("1.weight", "tensors", "group_ids"),
        torch.full((16,), 99, dtype=torch.long),
        "group",
    ),
    "basis not orthonormal": (P + ("2.weight", "tensors", "*"), None, "orthonormal"),
    "basis with nan": (P + ("2.weight", "tensors", "*"), "nan", "non-finite"),
    "fixed values inf": (P + ("3.weight", "tensors", "values"), "inf", "non-finite"),
}


def broken(sd, path, value):
    sd = copy.deepcopy(sd)
    if value is None:  # a basis scaled off orthonormality
        node = sd
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = node[path[-1]] * 2
    elif value in ("nan", "inf"):
        node = sd
        for key in path[:-1]:
            node = node[key]
        t = node[path[-1]].clone()
        t.view(-1)[0] = float(value)
        node[path[-1]] = t
    else:
        set_path(sd, path, value)
    return sd


@pytest.mark.parametrize("what", list(BAD))
def test_malformed_checkpoint_is_refused_naming_what_is_wrong_and_changes_nothing(what):
    path, value, message = BAD[what]
    model, opt = make()
    good = opt.state_dict()
    if path[-1] == "*":  # the subspace's one tensor, whatever the family calls it
        (key,) = tensors(good, "2.weight")
        path = path[:-1] + (key,)
    bad = broken(good, path, value)
    before = snapshot(opt, model)
    with pytest.raises(co.ConstraintError, match=re.escape(message)):
        opt.load_state_dict(bad)
    assert_same(before, snapshot(opt, model))
    opt.load_state_dict(good)  # the good one still loads


def test_optimizer_state_of_a_constrained_parameter_with_another_shape_is_refused():
    model, opt = make()
    bad = opt.state_dict()
    bad["state"][0]["exp_avg"] = torch.zeros(5, 5)
    before = snapshot(opt, model)
    with pytest.raises(co.ConstraintError, match="exp_avg of shape"):
        opt.load_state_dict(bad)
    assert_same(before, snapshot(opt, model))


def test_every_family_data_round_trips_through_validation():
    model, opt = make()
    sd = opt.state_dict()
    for name in sd["constraints"]["parameters"]:
        assert tensors(sd, name)
    opt.load_state_dict(sd)
    opt.check()
