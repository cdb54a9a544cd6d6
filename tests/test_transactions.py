"""Attach, load and step are transactions: on any exception, KeyboardInterrupt included, attach and
load change nothing, and a step leaves every constrained parameter on its set with ``steps_taken``
counting the inner steps that completed.

Interruptions are raised deterministically at the n-th torch call by a ``TorchFunctionMode``, for
every n the operation makes, so every point at which Ctrl-C could land is tried.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import constrained_optim as co

#: grad-mode switches are torch calls too, but not state a transaction owns (an interrupt inside
#: ``no_grad().__exit__`` would leave autograd off for the whole test process)
NOT_COUNTED = {"_set_grad_enabled", "is_grad_enabled"}


class InterruptAt(TorchFunctionMode):
    """Raise ``exc`` at the ``n``-th torch call (1-based) made inside the mode, once."""

    def __init__(self, n: int, exc=KeyboardInterrupt):
        super().__init__()
        self.n, self.exc, self.calls = n, exc, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in NOT_COUNTED:
            return func(*args, **(kwargs or {}))
        self.calls += 1
        if self.calls == self.n:
            raise self.exc(f"interrupted at torch call {self.n}")
        return func(*args, **(kwargs or {}))


def calls_made(operation) -> int:
    """How many (counted) torch calls ``operation()`` makes, run on a twin of the objects."""
    mode = InterruptAt(0)
    with mode:
        operation()
    return mode.calls


def points(total: int, edge: int = 32, inside: int = 32) -> list[int]:
    """Every call near the start and the end (the checks and the commit), and ``inside`` spread
    between: trying every one of several hundred calls would cost O(n^2)."""
    middle = range(edge + 1, max(edge + 1, total - edge))
    stride = max(1, len(middle) // inside)
    return sorted(
        {*range(1, min(edge, total) + 1), *middle[::stride], *range(max(1, total - edge), total + 1)}
    )


def snapshot(opt, model):
    """Everything a transaction may not leave half-changed, as plain copies."""
    engine = opt.engine
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "state": {
            id(p): {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
            for p, s in opt.optimizer.state.items()
        },
        "bounds": {
            id(p): (b, {k: v.clone() for k, v in b.state_tensors().items()}) for p, b in engine.bounds.items()
        },
        "audit": copy.deepcopy(engine.audit.state_dict()),
        "steps": engine.steps_taken,
    }


def assert_same(before, after):
    assert before["params"].keys() == after["params"].keys()
    for name in before["params"]:
        assert torch.equal(before["params"][name], after["params"][name]), name
    assert before["state"].keys() == after["state"].keys()
    for pid, state in before["state"].items():
        other = after["state"][pid]
        assert state.keys() == other.keys()
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, other[k]), k
            else:
                assert v == other[k], k
    assert before["bounds"].keys() == after["bounds"].keys()
    for pid, (bound, data) in before["bounds"].items():
        other_bound, other_data = after["bounds"][pid]
        assert bound is other_bound
        for k in data:
            assert torch.equal(data[k], other_data[k])
    assert before["audit"] == after["audit"]
    assert before["steps"] == after["steps"]


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 4), nn.Linear(4, 4))
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model)
    return model, opt


def train(model, opt, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 2, 6, 6, generator=gen)).square().mean().backward()
        opt.step()


def warm():
    """A warm optimizer with one constraint attached and an audit to lose."""
    model, opt = make()
    opt.attach("3.weight", co.Symmetric())
    train(model, opt)
    return model, opt


ITEMS = {"0.weight": co.Fixed((..., 1, 1), 0.5), "2.weight": co.Orthogonal(), "3.weight": co.MaxNorm(0.3)}


def test_attach_interrupted_at_every_torch_call_changes_nothing():
    twin_model, twin = warm()
    total = calls_made(lambda: twin.engine.attach_all(list(ITEMS.items())))
    assert total > 100
    model, opt = warm()
    for n in points(total):  # an interrupted attach changed nothing: each try starts alike
        before = snapshot(opt, model)
        with pytest.raises(KeyboardInterrupt), InterruptAt(n):
            opt.engine.attach_all(list(ITEMS.items()))
        assert_same(before, snapshot(opt, model))
    opt.engine.attach_all(list(ITEMS.items()))
    opt.check()  # the uninterrupted attach holds
    assert len(opt.engine.bounds) == 3


def test_constrain_interrupted_at_every_torch_call_changes_nothing_and_installs_nothing():
    model, _ = make()
    adam = torch.optim.Adam(model.parameters(), lr=0.05)
    model(torch.randn(3, 2, 6, 6)).square().mean().backward()
    adam.step()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = copy.deepcopy(adam.state_dict())
    twin = make()[0]
    total = calls_made(lambda: co.constrain(torch.optim.Adam(twin.parameters()), twin, ITEMS))
    for n in points(total):
        with pytest.raises(KeyboardInterrupt), InterruptAt(n):
            co.constrain(adam, model, ITEMS)
        for k, v in model.named_parameters():
            assert torch.equal(v, params[k])
        assert repr(adam.state_dict()) == repr(state)
        assert "step" not in vars(adam)  # no step wrapper, and (next try) no engine left
    co.constrain(adam, model, ITEMS).check()


def test_failed_attach_of_a_user_projection_changes_nothing():
    model, opt = warm()
    calls = []

    def project(x):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("refuses the second parameter")
        return x

    before = snapshot(opt, model)
    with pytest.raises(co.ConstraintError, match="refuses the second"):
        opt.attach("*.weight", co.Projection(project))
    assert_same(before, snapshot(opt, model))
    train(model, opt, steps=1)  # and the engine still works
    opt.check()


def test_constrain_that_fails_installs_nothing_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    adam.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(adam.state_dict())
    with pytest.raises(co.ConstraintError):
        co.constrain(
            adam, model, {"weight": co.Mask(torch.zeros(3, 4, dtype=torch.bool)), "bias": co.Symmetric()}
        )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert repr(adam.state_dict()) == repr(state)
    assert "step" not in vars(adam)  # no step wrapper left behind
    co.constrain(adam, model, {"weight": co.Mask(torch.zeros(3, 4, dtype=torch.bool))})  # and it can


def test_load_interrupted_at_every_torch_call_changes_nothing():
    model, opt = warm()
    checkpoint = opt.state_dict()
    train(model, opt, steps=2, seed=5)  # move on, so the load has something to change
    n, completed = 1, False
    while not completed:
        before = snapshot(opt, model)
        try:
            with InterruptAt(n):
                opt.load_state_dict(checkpoint)
            completed = True
        except KeyboardInterrupt:
            assert_same(before, snapshot(opt, model))
        n += 1
    assert n > 5
    assert opt.steps_taken == 3


def test_state_dict_is_not_changed_by_later_steps_or_loads():
    model, opt = warm()
    best = opt.state_dict()
    frozen = copy.deepcopy(best)
    train(model, opt, steps=2, seed=3)
    opt.load_state_dict(opt.state_dict())
    train(model, opt, steps=1, seed=4)
    flat_best, spec_best = torch.utils._pytree.tree_flatten(best)
    flat_frozen, spec_frozen = torch.utils._pytree.tree_flatten(frozen)
    assert spec_best == spec_frozen
    for a, b in zip(flat_best, flat_frozen):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b or (a != a and b != b)  # nan == nan


def constrained_for_steps():
    model, opt = make()
    opt.attach("0.weight", co.Fixed((..., 1, 1), 0.5))
    opt.attach("2.weight", co.MaxNorm(0.3))
    opt.attach("3.weight", co.Symmetric())
    train(model, opt, steps=1)  # Adam's own state initialisation is not a transaction of ours
    return model, opt


def backward(model, opt):
    opt.zero_grad()
    model(torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(9))).square().mean().backward()


def test_step_interrupted_anywhere_leaves_every_parameter_on_its_set():
    twin_model, twin = constrained_for_steps()
    backward(twin_model, twin)
    total = calls_made(twin.step)
    model, opt = constrained_for_steps()
    inner_steps = []
    opt.optimizer.register_step_post_hook(lambda *a: inner_steps.append(1))
    for n in points(total):
        backward(model, opt)
        steps_before, inner_before = opt.steps_taken, len(inner_steps)
        mode = InterruptAt(n)
        try:
            with mode:
                opt.step()
        except KeyboardInterrupt:
            pass
        else:  # a step may make fewer calls than the twin's (the audit skips a pass when nothing is off)
            assert mode.calls < n
        opt.check()  # never half-projected: every constrained parameter on its set
        assert torch.equal(model[3].weight, model[3].weight.T)
        assert opt.steps_taken - steps_before <= len(inner_steps) - inner_before <= 1
    backward(model, opt)
    opt.step()
    opt.check()


def test_exception_after_the_inner_step_still_projects_and_counts():
    model, opt = make()
    opt.attach("3.weight", co.Symmetric())
    opt.attach("2.weight", co.MaxNorm(0.01))
    hook_raises = [False]

    def post_hook(optimizer, args, kwargs):
        if hook_raises[0]:
            raise RuntimeError("post-hook failed")

    opt.optimizer.register_step_post_hook(post_hook)
    train(model, opt, steps=1)
    hook_raises[0] = True
    opt.zero_grad()
    model(torch.randn(3, 2, 6, 6)).square().mean().backward()
    with pytest.raises(RuntimeError, match="post-hook failed"):
        opt.step()
    assert opt.steps_taken == 2  # the inner step completed
    opt.check()
    assert float(model[2].weight.detach().norm(dim=1).max()) <= 0.01 * (1 + 1e-6)


def test_failing_projection_of_one_group_does_not_skip_the_others():
    model, opt = make()
    fail = [False]

    def project(x):
        if fail[0]:
            raise RuntimeError("user projection failed")
        return x.clamp(-1, 1)

    opt.attach("0.weight", co.Projection(project, name="clamp"))
    opt.attach("2.weight", co.MaxNorm(0.01))
    opt.attach("3.weight", co.Symmetric())
    train(model, opt, steps=1)
    fail[0] = True
    opt.zero_grad()
    model(torch.randn(3, 2, 6, 6)).square().mean().backward()
    with pytest.raises(RuntimeError, match="user projection failed"):
        opt.step()
    assert opt.steps_taken == 2
    assert float(model[2].weight.detach().norm(dim=1).max()) <= 0.01 * (1 + 1e-6)
    assert torch.equal(model[3].weight, model[3].weight.T)


def test_symmetric_projection_interrupted_is_never_half_written():
    """``W + W^T`` is symmetric too: a projection cut between its add and its halving would pass
    check() at twice the scale. Interrupted at every torch call, W is either as it was or
    projected."""
    w0 = torch.randn(5, 5)
    bound = co.Symmetric().bind(nn.Parameter(w0.clone()), "w")
    expected = (w0 + w0.T) / 2
    n, completed = 1, False
    while not completed:
        x = w0.clone()
        try:
            with InterruptAt(n), torch.no_grad():
                bound.project_(x)
            completed = True
        except KeyboardInterrupt:
            assert torch.equal(x, w0) or torch.equal(x, expected)
        n += 1
    assert torch.equal(x, expected)
