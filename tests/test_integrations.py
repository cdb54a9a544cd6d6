"""What a PyTorch user plugs in keeps working on the wrapper, and keeps doing its own job:
LR schedulers, GradScaler and autocast, gradient accumulation, zero_grad(set_to_none=False),
add_param_group, torch.compile, AveragedModel / EMA. Constraints hold after every step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import constrained_optim as co
from constrained_optim.constraints.base import Bound

FREE = torch.tensor(
    [
        [True, False, True, True],
        [False, True, True, False],
        [True, True, False, True],
        [True, False, True, True],
    ]
)


class TwoPart(nn.Module):
    """``w`` (constrained) and ``v`` (free) with separate losses, so ``v``'s trajectory depends
    only on what the optimizer and its scheduler do, not on the constraint."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.v = nn.Parameter(torch.randn(3))

    def loss(self, k: int):
        g = torch.Generator().manual_seed(k)
        x, y, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(3, generator=g)
        return ((x @ self.w - y) ** 2).mean() + ((self.v - t) ** 2).sum()


def symmetric(model):
    return torch.equal(model.w, model.w.T)


# -- LR schedulers -------------------------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": (
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    ),
    "OneCycleLR": (
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=12),
    ),
    "ReduceLROnPlateau": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
    ),
}


def run_scheduled(name, constrained: bool, steps=12):
    make_opt, make_sched = SCHEDULERS[name]
    torch.manual_seed(0)
    model = TwoPart()
    opt = make_opt(model.parameters())
    if constrained:
        opt = co.ConstrainedOptimizer(opt, model, {"w": co.Symmetric()})
    sched = make_sched(opt)
    lrs, betas = [], []
    for k in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0].get("betas", opt.param_groups[0].get("momentum")))
        opt.zero_grad()
        model.loss(k).backward()
        opt.step()
        sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()
        if constrained:
            assert symmetric(model), f"off the set after step {k}"
    return model, lrs, betas


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_scheduler_drives_the_wrapped_step(name):
    model, lrs, betas = run_scheduled(name, constrained=True)
    plain, plain_lrs, plain_betas = run_scheduled(name, constrained=False)
    assert lrs == plain_lrs and betas == plain_betas
    assert len(set(lrs)) > 1  # the schedule moved the learning rate
    # the free parameter follows the plain optimizer's scheduled trajectory bit for bit
    assert torch.equal(model.v, plain.v)


def test_steplr_values():
    _, lrs, _ = run_scheduled("StepLR", constrained=True)
    assert lrs == pytest.approx([0.1 * 0.5 ** (k // 3) for k in range(12)], rel=1e-12)


# -- GradScaler and autocast ------------------------------------------------------------------------------
def test_gradscaler_skips_inf_steps_consistently():
    """Scaling by powers of two is exact, so the scaled run equals the unscaled one bitwise; the
    step with an inf gradient is skipped: parameters, state and the audit's count stay put."""
    constraints = lambda: {"w": co.Mask(FREE)}  # noqa: E731
    bad_step = 3

    def run(use_scaler):
        torch.manual_seed(0)
        model = TwoPart()
        opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model, constraints())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000, enabled=use_scaler)
        for k in range(6):
            opt.zero_grad()
            scaler.scale(model.loss(k)).backward()
            if k == bad_step:
                model.v.grad[0] = float("inf")
                if not use_scaler:  # the unscaled reference simply leaves this step out
                    continue
                before = (
                    [p.detach().clone() for p in model.parameters()],
                    {k2: v.clone() for k2, v in opt.state[model.w].items()},
                    opt.steps_taken,
                    len(opt.audit.history),
                )
            scaler.step(opt)
            scaler.update()
            assert bool((model.w[~FREE] == 0).all())
            if use_scaler and k == bad_step:
                params, state, steps, records = before
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
                assert all(torch.equal(opt.state[model.w][k2], v) for k2, v in state.items())
                assert opt.steps_taken == steps and len(opt.audit.history) == records
                assert scaler.get_scale() == 2.0**7  # backed off: the scaler did its job
        return model, opt

    scaled, opt = run(True)
    plain, plain_opt = run(False)
    assert opt.steps_taken == plain_opt.steps_taken == 5
    assert [r.step for r in opt.audit.history] == [1, 2, 3, 4, 5]
    for p, q in zip(scaled.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def test_cpu_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = co.ConstrainedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.05),
        model,
        {"0": co.Symmetric(), "2.weight": co.Fixed((..., 0), 0.25)},
    )
    for _ in range(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(8, 4))
        assert out.dtype == torch.bfloat16  # autocast is on
        out.float().square().mean().backward()
        assert model[0].weight.grad.dtype == torch.float32
        opt.step()
        assert torch.equal(model[0].weight, model[0].weight.T)
        assert bool((model[2].weight[:, 0] == 0.25).all())
    opt.check()


# -- gradient accumulation and zero_grad ------------------------------------------------------------------
def test_gradient_accumulation_is_one_step_on_the_whole_batch():
    def run(micro):
        torch.manual_seed(0)
        model = TwoPart()
        opt = co.ConstrainedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, {"w": co.Mask(FREE)}
        )
        for step in range(3):
            opt.zero_grad()
            ks = [10 * step + i for i in range(4)]
            if micro:
                for k in ks:
                    (model.loss(k) / 4).backward()
            else:
                (sum(model.loss(k) for k in ks) / 4).backward()
            opt.step()
            assert bool((model.w[~FREE] == 0).all())
            assert bool((opt.state[model.w]["momentum_buffer"][~FREE] == 0).all())
        return model, opt

    accumulated, opt = run(micro=True)
    whole, _ = run(micro=False)
    assert opt.steps_taken == 3
    for p, q in zip(accumulated.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_zero_grad_set_to_none_false_keeps_grad_tensors():
    def run(set_to_none):
        torch.manual_seed(0)
        model = TwoPart()
        opt = co.ConstrainedOptimizer(
            torch.optim.Adam(model.parameters(), lr=0.05), model, {"w": co.Symmetric()}
        )
        grads = []
        for k in range(4):
            opt.zero_grad(set_to_none=set_to_none)
            if not set_to_none and k:
                assert model.w.grad is grads[-1] and not model.w.grad.any()
            model.loss(k).backward()
            grads.append(model.w.grad)
            opt.step()
            assert symmetric(model)
        return model

    kept, dropped = run(False), run(True)
    for p, q in zip(kept.parameters(), dropped.parameters()):
        assert torch.equal(p, q)


# -- add_param_group ------------------------------------------------------------------------------------
def test_add_param_group_then_attach():
    torch.manual_seed(0)
    model = TwoPart()
    opt = co.ConstrainedOptimizer(torch.optim.SGD([model.w], lr=0.05), model, {"w": co.Mask(FREE)})
    with pytest.raises(co.ConstraintError, match="add_param_group"):
        opt.attach("v", co.Fixed(0, 1.0))
    opt.add_param_group({"params": [model.v], "lr": 0.2})
    assert len(opt.optimizer.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.2
    opt.attach("v", co.Fixed(0, 1.0))
    assert model.v[0] == 1.0
    start = model.v.detach().clone()
    for k in range(3):
        opt.zero_grad()
        model.loss(k).backward()
        expected = start - 0.2 * model.v.grad  # the new group's own lr, held entry put back
        expected[0] = 1.0
        opt.step()
        torch.testing.assert_close(model.v.detach(), expected, rtol=1e-6, atol=1e-7)
        start = model.v.detach().clone()
        assert bool((model.w[~FREE] == 0).all()) and model.v[0] == 1.0


# -- torch.compile -----------------------------------------------------------------------------------------
def test_compiled_model():
    """aot_eager traces forward and backward like inductor but skips code generation (inductor
    takes ~20 s to compile here); the wrapper touches no forward, so any backend works alike."""

    def run(compile_it):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        net = torch.compile(model, backend="aot_eager") if compile_it else model
        opt = co.ConstrainedOptimizer(
            torch.optim.Adam(net.parameters(), lr=0.05),
            net,
            {"0": co.Symmetric(), "2.weight": co.Mask(FREE[:2])},
        )
        for k in range(3):
            g = torch.Generator().manual_seed(k)
            opt.zero_grad()
            net(torch.randn(8, 4, generator=g)).square().mean().backward()
            opt.step()
            assert torch.equal(model[0].weight, model[0].weight.T)
            assert bool((model[2].weight[~FREE[:2]] == 0).all())
        return model, opt

    model, opt = run(True)
    eager, _ = run(False)
    assert sorted(b.name for b in opt.engine.bounds.values()) == ["0.weight", "2.weight"]  # no _orig_mod.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- AveragedModel / EMA -----------------------------------------------------------------------------------
class Sphere(co.Constraint):
    """The unit sphere ``{W : ||W|| = 1}``: not convex, so averages of its points leave it."""

    def _bind(self, param, name):
        return SphereBound(self, name, param)


class SphereBound(Bound):
    def project_(self, x):
        x.div_(x.norm())


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("kind", ["SWA", "EMA"])
def test_averages_of_a_convex_set_stay_in_it(kind):
    torch.manual_seed(0)
    model = Model()
    opt = co.ConstrainedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        model,
        {"a.weight": co.Symmetric(), "b.weight": co.Mask(FREE), "b.bias": co.Fixed(slice(0, 2), 0.5)},
    )
    avg_fn = get_ema_multi_avg_fn(0.8) if kind == "EMA" else None
    averaged = AveragedModel(model, multi_avg_fn=avg_fn)
    snapshots = []  # the copy made at construction is replaced by the first update
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        averaged.update_parameters(model)
        snapshots.append(model.b.weight.detach().clone())
        a = averaged.module
        # exact: each entry of an average is the same function of the same (tied or held) entries
        assert torch.equal(a.a.weight, a.a.weight.T)
        assert bool((a.b.weight[~FREE] == 0).all()) and bool((a.b.bias[:2] == 0.5).all())
    if kind == "SWA":  # it really is the running mean of the iterates
        torch.testing.assert_close(averaged.module.b.weight, torch.stack(snapshots).mean(0))
    assert not torch.equal(averaged.module.b.weight, model.b.weight)
    before = [p.detach().clone() for p in averaged.parameters()]
    opt.project_module_(averaged)  # a no-op on points of the sets (exact projections)
    assert all(torch.equal(p, q) for p, q in zip(averaged.parameters(), before))


def test_project_module_puts_an_average_of_a_nonconvex_set_back():
    torch.manual_seed(0)
    model = Model()
    opt = co.ConstrainedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.3), model, {"a.weight": Sphere(), "b.weight": co.Symmetric()}
    )
    averaged = AveragedModel(model)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        averaged.update_parameters(model)
        assert float(model.a.weight.detach().norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(averaged.module.a.weight.detach().norm()) < 1 - 1e-4  # the average left the sphere
    bias = averaged.module.a.bias.detach().clone()
    opt.project_module_(averaged)
    assert float(averaged.module.a.weight.detach().norm()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(averaged.module.b.weight, averaged.module.b.weight.T)
    assert torch.equal(averaged.module.a.bias, bias)  # unconstrained: untouched


def test_project_module_refuses_a_module_without_the_names():
    torch.manual_seed(0)
    model = Model()
    opt = co.ConstrainedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.3), model, {"a.weight": Sphere(), "b.weight": co.Symmetric()}
    )
    other = nn.Sequential()
    other.add_module("b", nn.Linear(4, 4))
    before = other.b.weight.detach().clone()
    with pytest.raises(co.ConstraintError, match="a.weight: no parameters of that name"):
        opt.project_module_(other)
    assert torch.equal(other.b.weight, before)  # b.weight was not projected either
