"""`co.constrain`: the same constraints installed as step hooks on an optimizer one cannot wrap.
The same engine does the work, so it gives the wrapper's parameters and audit bit for bit."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import constrained_optim as co

FREE = torch.tensor([[True, False, True, True], [False, True, True, False], [True, True, False, True]])


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))


def constraints():
    return {"0.weight": co.Symmetric(), "2.weight": co.Mask(FREE), "2.bias": co.Fixed(0, 0.5)}


def batch(k):
    g = torch.Generator().manual_seed(k)
    return torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)


def loss_of(model, k):
    x, y = batch(k)
    return ((model(x) - y) ** 2).mean()


OPTIMIZERS = {
    "Adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3, history_size=4),
}


def run(kind, opt_name, steps=6, closure_as="kwarg"):
    model = make_model()
    inner = OPTIMIZERS[opt_name](model.parameters())
    if kind == "wrapper":
        opt = co.ConstrainedOptimizer(inner, model, constraints(), log_every=None)
        stepper, engine = opt, opt
    else:
        engine = co.constrain(inner, model, constraints())
        stepper = inner
    sched = torch.optim.lr_scheduler.StepLR(stepper, step_size=2, gamma=0.7)
    for k in range(steps):
        if opt_name == "LBFGS":

            def closure(k=k):
                stepper.zero_grad()
                loss = loss_of(model, k)
                loss.backward()
                return loss

            stepper.step(closure=closure) if closure_as == "kwarg" else stepper.step(closure)
        else:
            stepper.zero_grad()
            loss_of(model, k).backward()
            stepper.step()
        sched.step()
        assert torch.equal(model[0].weight, model[0].weight.T)
        assert bool((model[2].weight[~FREE] == 0).all()) and model[2].bias[0] == 0.5
    return model, inner, engine


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_constrain_equals_the_wrapper(opt_name):
    wrapped, wrapped_inner, opt = run("wrapper", opt_name)
    hooked, hooked_inner, handle = run("hooks", opt_name)
    for p, q in zip(wrapped.parameters(), hooked.parameters()):
        assert torch.equal(p, q)
    assert handle.steps_taken == opt.steps_taken == 6
    assert repr(handle.audit.history) == repr(opt.audit.history)
    assert not any(r.grad_blocked != r.grad_blocked for r in handle.audit.history)  # measured, not nan
    handle.check()


def test_closure_passed_positionally():
    by_keyword, _, _ = run("hooks", "LBFGS", closure_as="kwarg")
    by_position, _, _ = run("hooks", "LBFGS", closure_as="positional")
    for p, q in zip(by_keyword.parameters(), by_position.parameters()):
        assert torch.equal(p, q)


def test_remove_stops_it():
    model, inner, handle = run("hooks", "Adam", steps=2)
    handle.remove()
    assert not handle.active
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks
    loss_of(model, 99).backward()
    inner.step()
    assert handle.steps_taken == 2  # no longer counted or audited
    assert not bool((model[2].weight[~FREE] == 0).all())  # Adam moved the held entries
    with pytest.raises(co.ConstraintViolation, match="2.weight"):
        handle.check()
    with pytest.raises(co.ConstraintError, match="removed"):
        handle.attach("0.bias", co.Fixed(0, 0.0))


def test_handle_checkpoint_resumes_bitwise(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
        inner = OPTIMIZERS["Adam"](model.parameters())
        return model, inner, co.constrain(inner, model, constraints())

    def train(model, inner, steps):
        for k in steps:
            inner.zero_grad()
            loss_of(model, k).backward()
            inner.step()

    full, _, full_handle = build(0)
    train(full, full_handle.optimizer, range(8))

    model, inner, handle = build(0)
    train(model, inner, range(4))
    torch.save(
        {"model": model.state_dict(), "opt": inner.state_dict(), "constraints": handle.state_dict()},
        tmp_path / "ckpt.pt",
    )
    fresh, fresh_inner, fresh_handle = build(3)  # another init
    ckpt = torch.load(tmp_path / "ckpt.pt")
    fresh.load_state_dict(ckpt["model"])
    fresh_inner.load_state_dict(ckpt["opt"])
    fresh_handle.load_state_dict(ckpt["constraints"])
    train(fresh, fresh_inner, range(4, 8))
    for p, q in zip(full.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert fresh_handle.steps_taken == 8
    assert repr(fresh_handle.audit.history) == repr(full_handle.audit.history)


def test_constrain_refuses_a_wrapper_and_a_failed_attach_installs_nothing():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(co.ConstraintError, match="already constrained"):
        co.constrain(co.ConstrainedOptimizer(inner, model), model)
    with pytest.raises(co.ConstraintError, match="2.weight"):
        co.constrain(inner, model, {"2.weight": co.Symmetric()})  # (3, 4) is not square
    gc.collect()  # the refused wrapper's engine, and with it its step hook
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks
