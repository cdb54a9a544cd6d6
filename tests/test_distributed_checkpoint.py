"""``torch.distributed.checkpoint`` in one process: ``get_state_dict`` / ``dcp.save`` / ``dcp.load`` /
``set_state_dict`` carry the constraint state of the wrapper and of the ``constrain()`` handle (the
sharded cases run in `test_distributed.py`)."""

from __future__ import annotations

import pytest
import torch

import constrained_optim as co

dcp = pytest.importorskip("torch.distributed.checkpoint")
state_dict_api = pytest.importorskip("torch.distributed.checkpoint.state_dict")

FREE = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.4


def constraints():
    return {
        "0.weight": co.Mask(FREE),
        "0.bias": co.Fixed(slice(0, 2), 0.5),
        "2.weight": co.NMSparsity(2, 4),
        "2.bias": co.NormBall(0.5),
    }


def build(handle: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    adam = torch.optim.Adam(model.parameters(), lr=0.05)
    if handle:
        return model, adam, co.constrain(adam, model, constraints())
    opt = co.ConstrainedOptimizer(adam, model, constraints())
    return model, opt, opt


def train(model, opt, steps):
    for k in steps:
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def save(model, opt, path):
    msd, osd = state_dict_api.get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    return osd


def load(model, opt, path):
    msd, osd = state_dict_api.get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    state_dict_api.set_state_dict(
        model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


@pytest.mark.parametrize("handle", [False, True], ids=["wrapper", "handle"])
def test_dcp_resume_equals_the_uninterrupted_run_bitwise(handle, tmp_path):
    model, opt, holder = build(handle)
    train(model, opt, range(4))
    first, opt_a, holder_a = build(handle)
    train(first, opt_a, range(2))
    saved = save(first, opt_a, tmp_path)
    keys = {k for entry in saved["state"].values() for k in entry}
    assert {"constraint.spec", "constraint.steps_taken", "constraint.audit", "constraint.data.keep"} <= keys
    assert "constraints" not in saved
    resumed, opt_b, holder_b = build(handle, seed=7)  # another init: the checkpoint replaces it
    load(resumed, opt_b, tmp_path)
    assert holder_b.steps_taken == 2
    train(resumed, opt_b, range(2, 4))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert repr(holder.audit.state_dict()) == repr(holder_b.audit.state_dict())
    assert holder_b.steps_taken == 4
    # the plain state_dict keeps its own layout: no per-parameter constraint keys
    plain = opt_b.state_dict()
    assert "constraints" in plain and not any(
        isinstance(k, str) and k.startswith("constraint.") for e in plain["state"].values() for k in e
    )


@pytest.mark.parametrize("handle", [False, True], ids=["wrapper", "handle"])
def test_dcp_checkpoint_of_other_constraints_is_refused_and_nothing_changes(handle, tmp_path):
    model, opt, _ = build(handle)
    train(model, opt, range(2))
    save(model, opt, tmp_path)
    torch.manual_seed(3)
    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    adam = torch.optim.Adam(other.parameters(), lr=0.05)
    wrong = {**constraints(), "0.weight": co.MaxNorm(1.0)}
    holder = co.constrain(adam, other, wrong) if handle else co.ConstrainedOptimizer(adam, other, wrong)
    stepper = adam if handle else holder
    train(other, stepper, range(1))
    before = [p.detach().clone() for p in other.parameters()]
    state_before = {k: v.clone() for k, v in adam.state[next(iter(other.parameters()))].items()}
    # the optimizer's part only: DCP loads a model's state in place, into its parameters
    osd = state_dict_api.get_optimizer_state_dict(other, stepper)
    dcp.load({"optim": osd}, checkpoint_id=tmp_path)
    with pytest.raises(co.ConstraintError, match="0.weight"):
        state_dict_api.set_optimizer_state_dict(other, stepper, optim_state_dict=osd)
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), before))
    assert holder.steps_taken == 1
    if not handle:  # a raw optimizer's state_dict holds its live tensors, which DCP loads into
        now = adam.state[next(iter(other.parameters()))]
        assert all(torch.equal(now[k], v) for k, v in state_before.items())
