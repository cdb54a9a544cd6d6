"""Checkpoints: save after k steps, load into fresh objects, continue: bitwise the same run.

A checkpoint whose constraints differ from the attached ones is refused, saying what differs,
and nothing is loaded. The model's own ``state_dict`` never changes, so a model trained under
constraints loads into a plain model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import constrained_optim as co

HALF = 10

_g = torch.Generator().manual_seed(7)
FREE = torch.rand(6, 8, generator=_g) > 0.4
HELD = torch.rand(6, 8, generator=_g) > 0.7
HELD_VALUES = torch.randn(6, 8, generator=_g)


class Net(nn.Module):
    def __init__(self, hidden=6):
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def needs(name):
    return pytest.mark.skipif(
        getattr(co, name, None) is None, reason=f"co.{name} is not in this build of the library"
    )


# (id, constraints, check(model) -> bool that the model is on the sets, marks)
CASES = [
    ("Mask", lambda: {"fc1.weight": co.Mask(FREE)}, lambda m: bool((m.fc1.weight[~FREE] == 0).all()), ()),
    (
        "Fixed",
        lambda: {"fc1.weight": co.Fixed(HELD, HELD_VALUES), "fc2.bias": co.Fixed(slice(0, 2), 0.5)},
        lambda m: bool((m.fc1.weight[HELD] == HELD_VALUES[HELD]).all() and (m.fc2.bias[:2] == 0.5).all()),
        (),
    ),
    (
        "Symmetric",
        lambda: {"fc2.weight": co.Symmetric()},
        lambda m: torch.equal(m.fc2.weight, m.fc2.weight.T),
        (),
    ),
    (
        "MaxNorm",
        lambda: {"fc1.weight": co.MaxNorm(0.5)},
        lambda m: bool((m.fc1.weight.norm(dim=1) <= 0.5 * (1 + 1e-6)).all()),
        (needs("MaxNorm"),),
    ),
    (
        "NMSparsity-fixed",
        lambda: {"fc1.weight": co.NMSparsity(2, 4, fixed=True)},
        lambda m: bool(((m.fc1.weight.reshape(6, 2, 4) != 0).sum(-1) <= 2).all()),
        (needs("NMSparsity"),),
    ),
]

OPTIMIZERS = {
    "Adam": lambda p: torch.optim.Adam(p, lr=0.02),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
}


def build(seed, constraints, make_opt, hidden=6):
    torch.manual_seed(seed)
    model = Net(hidden)
    opt = co.ConstrainedOptimizer(make_opt(model.parameters()), model, constraints)
    return model, opt


def train(model, opt, steps, holds=None):
    for k in steps:
        g = torch.Generator().manual_seed(1000 + k)
        x, y = torch.randn(5, 8, generator=g), torch.randn(5, 3, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if holds is not None:
            assert holds(model), f"off the set after step {k}"


def flat_state(opt):
    """Every tensor of the wrapped optimizer's state, in parameter order, as its state_dict gives
    them: the true values (the live state may hold the CPU second-moment filler on held entries,
    put there at other steps in a resumed run)."""
    state = opt.optimizer.state_dict()["state"]
    return [
        (k, v) for i in range(len(opt.param_groups[0]["params"])) for k, v in sorted(state.get(i, {}).items())
    ]


def assert_same_run(m1, o1, m2, o2):
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
    s1, s2 = flat_state(o1), flat_state(o2)
    assert [k for k, _ in s1] == [k for k, _ in s2]
    for (k, a), (_, b) in zip(s1, s2):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), k
    assert o1.steps_taken == o2.steps_taken == 2 * HALF
    assert repr(o1.audit.history) == repr(o2.audit.history)  # repr: nan == nan, floats exact


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=c[3]) for c in CASES])
def test_resume_is_bitwise_identical(case, opt_name, tmp_path):
    _, constraints, holds, _ = case
    make_opt = OPTIMIZERS[opt_name]

    model, opt = build(0, constraints(), make_opt)
    train(model, opt, range(2 * HALF), holds)

    model_a, opt_a = build(0, constraints(), make_opt)
    train(model_a, opt_a, range(HALF), holds)
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")

    model_b, opt_b = build(1, constraints(), make_opt)  # another random init
    attached_data = {
        b.name: {k: v.clone() for k, v in b.state_tensors().items()} for b in opt_b.engine.bounds.values()
    }
    ckpt = torch.load(tmp_path / "ckpt.pt")  # weights_only: the checkpoint is plain data
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.steps_taken == HALF
    for bound in opt_b.engine.bounds.values():  # the data chosen at attach is the checkpoint's
        for key, value in bound.state_tensors().items():
            assert torch.equal(value, ckpt["opt"]["constraints"]["parameters"][bound.name]["tensors"][key])
    if case[0] == "NMSparsity-fixed":  # the fresh init chose another pattern, which was replaced
        assert any(
            not torch.equal(v, attached_data["fc1.weight"][k])
            for k, v in opt_b.engine.bounds[model_b.fc1.weight].state_tensors().items()
        )
    train(model_b, opt_b, range(HALF, 2 * HALF), holds)

    assert_same_run(model, opt, model_b, opt_b)


def test_model_trained_under_constraints_loads_into_a_plain_model():
    model, opt = build(0, {"fc1.weight": co.Mask(FREE), "fc2.weight": co.Symmetric()}, OPTIMIZERS["Adam"])
    train(model, opt, range(3))
    torch.manual_seed(5)
    plain = Net()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_loads_into_the_plain_wrapped_optimizer():
    model, opt = build(0, {"fc2.weight": co.Symmetric()}, OPTIMIZERS["Adam"])
    train(model, opt, range(3))
    plain = torch.optim.Adam(model.parameters(), lr=0.02)
    plain.load_state_dict(opt.state_dict())
    for (k, a), (_, b) in zip(
        flat_state(opt), [(k, v) for p in model.parameters() for k, v in sorted(plain.state[p].items())]
    ):
        assert torch.equal(a, b), k


def test_tied_labels_from_the_checkpoint_bring_their_group_sizes():
    """The checkpoint's data replaces the attached data; derived sizes follow it."""
    labels_a = torch.tensor([0, 0, 0, 0, 0, 1])
    labels_b = torch.tensor([0, 1, 1, 1, 1, 1])  # same number of groups, other sizes
    model_a, opt_a = build(0, {"fc2.bias": co.Tied(labels_a)}, OPTIMIZERS["SGD-momentum"])
    model_b, opt_b = build(1, {"fc2.bias": co.Tied(labels_b)}, OPTIMIZERS["SGD-momentum"])
    opt_b.load_state_dict(opt_a.state_dict())
    with torch.no_grad():
        model_b.fc2.bias.copy_(torch.arange(6.0))
    opt_b.project_()
    assert model_b.fc2.bias.tolist() == [2.0] * 5 + [5.0]  # means of labels_a's groups


# -- mismatched checkpoints ---------------------------------------------------------------------------
def snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        copy.deepcopy([(k, v) for k, v in flat_state(opt)]),
        copy.deepcopy(opt.param_groups[0]["lr"]),
        opt.steps_taken,
        repr(opt.audit.history),
        {b.name: {k: v.clone() for k, v in b.state_tensors().items()} for b in opt.engine.bounds.values()},
    )


def assert_unchanged(model, opt, snap):
    params, state, lr, steps, audit, data = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    now = flat_state(opt)
    assert [k for k, _ in now] == [k for k, _ in state]
    for (k, a), (_, b) in zip(now, state):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), k
    assert opt.param_groups[0]["lr"] == lr
    assert opt.steps_taken == steps
    assert repr(opt.audit.history) == audit
    for bound in opt.engine.bounds.values():
        for key, value in bound.state_tensors().items():
            assert torch.equal(value, data[bound.name][key])


def saved_and_fresh(saved_constraints, fresh_constraints, hidden=6, fresh_lr=0.02):
    model_a, opt_a = build(0, saved_constraints, OPTIMIZERS["Adam"])
    train(model_a, opt_a, range(3))
    model_b, opt_b = build(1, fresh_constraints, lambda p: torch.optim.Adam(p, lr=fresh_lr), hidden)
    train(model_b, opt_b, range(2))  # warm, so "unchanged" covers real state
    return opt_a.state_dict(), model_b, opt_b


@pytest.mark.parametrize(
    "saved, fresh, hidden, expected",
    [
        pytest.param(
            {"fc1.weight": co.Fixed((..., 0), 0.0)},
            {"fc3.weight": co.Fixed((..., 0), 0.0)},
            6,
            [
                "fc1.weight: the checkpoint constrains it to Fixed((..., 0), 0.0); here it has no constraint",
                "fc3.weight: constrained to Fixed((..., 0), 0.0) here; the checkpoint has no constraint",
            ],
            id="other-target",
        ),
        pytest.param(
            {"fc2.weight": co.Symmetric()},
            {"fc2.weight": co.Symmetric()},
            7,
            ["fc2.weight: shape (6, 6) in the checkpoint, (7, 7) here"],
            id="other-shape",
        ),
        pytest.param(
            {"fc2.weight": co.Symmetric()},
            {"fc2.weight": co.Mask(torch.ones(6, 6, dtype=torch.bool))},
            6,
            [
                "fc2.weight: constraint type Symmetric (Symmetric(dims=(0, 1))) in the checkpoint, "
                "Mask (Mask(36/36 free)) here"
            ],
            id="other-type",
        ),
        pytest.param(
            {"fc2.weight": co.Symmetric()},
            {"fc2.weight": co.Symmetric(dims=None, flip=(1,))},
            6,
            ["fc2.weight: Symmetric(dims=(0, 1)) in the checkpoint, Symmetric(dims=(), flip=(1,)) here"],
            id="other-arguments",
        ),
        pytest.param(
            {"fc2.weight": co.Symmetric(), "fc1.weight": co.Mask(FREE)},
            {"fc2.weight": co.Mask(torch.ones(6, 6, dtype=torch.bool)), "fc3.bias": co.Fixed(0, 1.0)},
            6,
            [
                "fc2.weight: constraint type Symmetric",
                "fc1.weight: the checkpoint constrains it",
                "fc3.bias: constrained to Fixed(0, 1.0) here",
            ],
            id="all-differences-listed",
        ),
    ],
)
def test_mismatched_checkpoint_says_what_differs_and_changes_nothing(saved, fresh, hidden, expected):
    checkpoint, model, opt = saved_and_fresh(saved, fresh, hidden, fresh_lr=0.5)
    snap = snapshot(model, opt)
    with pytest.raises(co.ConstraintError, match="do not match the attached ones") as err:
        opt.load_state_dict(checkpoint)
    for line in expected:
        assert line in str(err.value)
    assert_unchanged(model, opt, snap)


def test_plain_optimizer_checkpoint_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    other = Net()
    plain = torch.optim.Adam(other.parameters(), lr=0.5)
    other(torch.randn(2, 8)).sum().backward()
    plain.step()
    _, model, opt = saved_and_fresh({}, {"fc2.weight": co.Symmetric()})
    snap = snapshot(model, opt)
    with pytest.raises(co.ConstraintError, match="holds no constraint state"):
        opt.load_state_dict(plain.state_dict())
    assert_unchanged(model, opt, snap)


def test_other_parameter_groups_are_refused_and_change_nothing():
    checkpoint, model, opt = saved_and_fresh({"fc2.weight": co.Symmetric()}, {"fc2.weight": co.Symmetric()})
    checkpoint["param_groups"] = [dict(checkpoint["param_groups"][0], params=[0, 1, 2])]
    snap = snapshot(model, opt)
    with pytest.raises(co.ConstraintError, match=r"hold \[3\] parameters.*hold \[6\]"):
        opt.load_state_dict(checkpoint)
    assert_unchanged(model, opt, snap)


def test_malformed_audit_is_refused_and_changes_nothing():
    checkpoint, model, opt = saved_and_fresh({"fc2.weight": co.Symmetric()}, {"fc2.weight": co.Symmetric()})
    checkpoint["constraints"]["audit"] = {"history": [{"step": 1}], "last": []}
    snap = snapshot(model, opt)
    with pytest.raises(co.ConstraintError, match="audit state cannot be loaded"):
        opt.load_state_dict(checkpoint)
    assert_unchanged(model, opt, snap)


def test_resume_with_an_lr_scheduler(tmp_path):
    """The wrapped optimizer's load_state_dict replaces its param_groups; the wrapper and a
    scheduler built on it before loading still drive the same groups."""
    constraints = lambda: {"fc2.weight": co.Symmetric(), "fc1.weight": co.Mask(FREE)}  # noqa: E731

    def build_scheduled(seed):
        model, opt = build(seed, constraints(), OPTIMIZERS["SGD-momentum"])
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)

    def train_scheduled(model, opt, sched, steps):
        for k in steps:
            train(model, opt, [k])
            sched.step()

    model, opt, sched = build_scheduled(0)
    train_scheduled(model, opt, sched, range(2 * HALF))

    model_a, opt_a, sched_a = build_scheduled(0)
    train_scheduled(model_a, opt_a, sched_a, range(HALF))
    torch.save(
        {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()},
        tmp_path / "ckpt.pt",
    )
    model_b, opt_b, sched_b = build_scheduled(1)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    assert opt_b.param_groups is opt_b.optimizer.param_groups
    train_scheduled(model_b, opt_b, sched_b, range(HALF, 2 * HALF))
    assert opt_b.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.05 * 0.5**5
    assert_same_run(model, opt, model_b, opt_b)


def test_fixed_mask_positions_come_from_the_checkpoint():
    """A Fixed given as a bool mask saves its held positions: loading puts them back even when
    the fresh attach was given another mask with as many held entries."""
    first = torch.tensor([[True, False, False], [False, False, True]])
    other = torch.tensor([[False, True, False], [True, False, False]])
    saved_model = torch.nn.Linear(3, 2)
    saved = co.ConstrainedOptimizer(torch.optim.SGD(saved_model.parameters(), lr=0.1), saved_model)
    saved.attach("weight", co.Fixed(first, 0.5))
    model = torch.nn.Linear(3, 2)
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    opt.attach("weight", co.Fixed(other, 0.5))
    opt.load_state_dict(saved.state_dict())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert bool((model.weight.detach()[first] == 0.5).all())
    with pytest.raises(co.ConstraintError, match="mask of 1 held"):
        third = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        third.attach("weight", co.Fixed(torch.tensor([[True, False, False], [False, False, False]]), 0.5))
        third.load_state_dict(saved.state_dict())
