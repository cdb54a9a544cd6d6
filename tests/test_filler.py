"""The second-moment filler (`constrained_optim.filler`): parameters bit for bit as without it,
and never seen from outside (state dicts, checkpoints, detach, remove, attach, repair)."""

from __future__ import annotations

import contextlib
import copy
import gc

import pytest
import torch

import constrained_optim as co
from constrained_optim import filler

MASK = torch.rand(8, 16, generator=torch.Generator().manual_seed(1)) < 0.5
FREE0 = MASK.clone()
FREE0[:, 0] = True  # column 0 free, so a Fixed on it can hold another value
SECOND = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")

OPTIMIZERS = {
    # beta2 / alpha small enough that the filler is put back several times in the run
    "adam": lambda p, **kw: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.3), weight_decay=0.1, **kw),
    "adamw": lambda p, **kw: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, **kw),
    "amsgrad": lambda p, **kw: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.4), amsgrad=True, **kw),
    "rmsprop": lambda p, **kw: torch.optim.RMSprop(p, lr=0.01, alpha=0.3, momentum=0.5, centered=True, **kw),
    "adagrad": lambda p, **kw: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.01, **kw),
    "nadam": lambda p, **kw: torch.optim.NAdam(p, lr=0.01, weight_decay=0.1, **kw),
    "radam": lambda p, **kw: torch.optim.RAdam(p, lr=0.01, **kw),
    "adadelta": lambda p, **kw: torch.optim.Adadelta(p, lr=1.0, **kw),
    "sgd": lambda p, **kw: torch.optim.SGD(p, lr=0.05, momentum=0.9, **kw),
}
FUSED_ON_CPU = {"adam", "adamw", "amsgrad", "adagrad", "sgd"}
FILLS = {"adam", "adamw", "amsgrad", "rmsprop", "adagrad", "nadam", "radam"}


def batch():
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(2))


def train(opt, model, steps, x=None):
    x = batch() if x is None else x
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@contextlib.contextmanager
def filling(fill: bool):
    """Engines made inside fill (the default) or not (no optimizer class is planned)."""
    saved = filler.FILLED
    if not fill:
        filler.FILLED = {}
    try:
        yield
    finally:
        filler.FILLED = saved


def run(make, constraint, *, fill=True, steps=55, **kw):
    with filling(fill):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 8)
        opt = co.ConstrainedOptimizer(make(model.parameters(), **kw), model, {"weight": constraint})
        train(opt, model, steps)
        return model, opt


def filled(opt) -> bool:
    return any(r.filled for r in opt.engine._filler.records.values())


def assert_same_state(a: dict, b: dict):
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        x, y = a["state"][pid], b["state"][pid]
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), (pid, k)


def variants():
    for name in OPTIMIZERS:
        yield name, {"foreach": True}
        yield name, {"foreach": False}
        if name in FUSED_ON_CPU:
            yield name, {"fused": True}


@pytest.mark.parametrize(("name", "kw"), list(variants()))
def test_parameters_bitwise_equal_with_and_without_the_filler(name, kw):
    make = OPTIMIZERS[name]
    m1, o1 = run(make, co.Mask(MASK), **kw)
    m2, o2 = run(make, co.Mask(MASK), fill=False, **kw)
    assert torch.equal(m1.weight, m2.weight) and torch.equal(m1.bias, m2.bias)
    assert_same_state(o1.state_dict(), o2.state_dict())
    assert filled(o1) == (name in FILLS)
    if name in FILLS:  # the live state holds the filler; the state dict the true 0
        live = [v for k, v in o1.state[m1.weight].items() if k in SECOND]
        assert live and all(bool((v[~MASK] > 0).all()) for v in live)
        sd = o1.optimizer.state_dict()["state"][0]
        assert all(bool((sd[k][~MASK] == 0).all()) for k in sd if k in SECOND)


def test_parameters_match_plain_torch_fed_projected_gradients():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    ref = torch.nn.Linear(16, 8)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.weight.mul_(MASK)
    opt = co.ConstrainedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01), model, {"weight": co.Mask(MASK)}
    )
    plain = torch.optim.Adam(ref.parameters(), lr=0.01)
    x = batch()
    for _ in range(60):
        opt.zero_grad()
        plain.zero_grad()
        model(x).pow(2).mean().backward()
        ref(x).pow(2).mean().backward()
        ref.weight.grad.mul_(MASK)
        opt.step()
        plain.step()
        with torch.no_grad():
            ref.weight.mul_(MASK)
    assert filled(opt)
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)
    assert_same_state(opt.optimizer.state_dict(), plain.state_dict())


@pytest.mark.parametrize(
    "constraint",
    [
        co.Fixed((..., slice(0, 5)), 0.0),
        co.Fixed(MASK, torch.where(MASK, 0.0, 0.5)),  # held at 0 where the mask says, else 0.5
        co.NMSparsity(2, 4),
        co.Mask(MASK) & co.NonNegative(),
        co.Mask(MASK) & co.MaxNorm(0.5),
        co.Mask(FREE0) & co.Fixed((..., 0), 0.25),
    ],
    ids=repr,
)
def test_held_families_bitwise_equal(constraint):
    m1, o1 = run(OPTIMIZERS["adam"], constraint)
    m2, o2 = run(OPTIMIZERS["adam"], constraint, fill=False)
    assert torch.equal(m1.weight, m2.weight)
    assert_same_state(o1.state_dict(), o2.state_dict())
    assert filled(o1)


def test_held_entries_are_views_resolved_once():
    w = torch.nn.Parameter(torch.randn(8, 16))
    mask = MASK.clone()
    held = co.Mask(mask).bind(w, "w").held_zeros()
    assert held.free.data_ptr() == mask.data_ptr() and held.free.dtype == torch.bool
    fixed = co.Fixed((..., 1), 0.0).bind(w, "w").held_zeros()
    assert fixed.index is not None
    assert co.Mask(torch.ones(8, 16, dtype=torch.bool)).bind(w, "w").held_zeros() is None
    assert co.Fixed((..., 1), 2.0).bind(w, "w").held_zeros() is None
    assert co.MaxNorm(1.0).bind(w, "w").held_zeros() is None


def test_state_dict_is_true_and_later_steps_do_not_change_it():
    model, opt = run(OPTIMIZERS["adam"], co.Mask(MASK), steps=20)
    live = opt.state[model.weight]["exp_avg_sq"]
    before = live.clone()
    inner_sd = opt.optimizer.state_dict()
    outer_sd = opt.state_dict()
    assert torch.equal(live, before)  # the live state is not touched
    for sd in (inner_sd, outer_sd):
        assert bool((sd["state"][0]["exp_avg_sq"][~MASK] == 0).all())
    kept = inner_sd["state"][0]["exp_avg_sq"].clone()
    train(opt, model, 5)
    assert torch.equal(inner_sd["state"][0]["exp_avg_sq"], kept)
    assert bool((opt.optimizer.state_dict()["state"][0]["exp_avg_sq"][~MASK] == 0).all())


def test_constrain_handle_checkpoints_are_true():
    def go(fill):
        with filling(fill):
            torch.manual_seed(0)
            model = torch.nn.Linear(16, 8)
            adam = torch.optim.Adam(model.parameters(), lr=0.01)
            co.constrain(adam, model, {"weight": co.Mask(MASK)})
            train(adam, model, 30)
            return model, adam

    (m1, a1), (m2, a2) = go(True), go(False)
    assert torch.equal(m1.weight, m2.weight)
    s1, s2 = a1.state_dict(), a2.state_dict()
    assert_same_state(s1, s2)
    assert "constraints" in s1
    assert bool((a1.state[m1.weight]["exp_avg_sq"][~MASK] > 0).all())


def test_checkpoint_of_a_filled_run_in_a_plain_optimizer_and_resumed():
    model, opt = run(OPTIMIZERS["adam"], co.Mask(MASK), steps=30)
    checkpoint = opt.state_dict()
    ref_model, ref_opt = run(OPTIMIZERS["adam"], co.Mask(MASK), steps=30, fill=False)
    assert_same_state(checkpoint, ref_opt.state_dict())
    # into a plain torch optimizer: the same state as the unfilled run's
    plain = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.3), weight_decay=0.1)
    plain.load_state_dict({k: v for k, v in checkpoint.items() if k != "constraints"})
    assert bool((plain.state[model.weight]["exp_avg_sq"][~MASK] == 0).all())
    # resumed with the library: bitwise the straight run, and filled again
    straight, straight_opt = run(OPTIMIZERS["adam"], co.Mask(MASK), steps=60)
    torch.manual_seed(0)
    fresh = torch.nn.Linear(16, 8)
    fresh.load_state_dict(model.state_dict())
    resumed = co.ConstrainedOptimizer(
        OPTIMIZERS["adam"](fresh.parameters()), fresh, {"weight": co.Mask(MASK)}
    )
    resumed.load_state_dict(checkpoint)
    train(resumed, fresh, 30)
    assert filled(resumed)
    assert torch.equal(fresh.weight, straight.weight)
    assert_same_state(resumed.state_dict(), straight_opt.state_dict())


def test_loaded_state_not_zero_on_held_entries_is_left_alone():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    train(plain, model, 3)  # unconstrained: exp_avg_sq is positive everywhere
    checkpoint = plain.state_dict()
    opt = co.ConstrainedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01), model, {"weight": co.Mask(MASK)}
    )
    opt.optimizer.load_state_dict(checkpoint)
    true = opt.state[model.weight]["exp_avg_sq"].clone()
    opt.zero_grad()
    model(batch()).pow(2).mean().backward()
    opt.step()
    assert not filled(opt)
    assert torch.equal(opt.state[model.weight]["exp_avg_sq"][~MASK], true[~MASK] * 0.999)


def test_detach_remove_and_a_collected_engine_write_the_true_zero_back():
    model, opt = run(OPTIMIZERS["adam"], co.Mask(MASK), steps=10)
    state = opt.state[model.weight]
    assert bool((state["exp_avg_sq"][~MASK] > 0).all())
    opt.detach("weight")
    assert bool((state["exp_avg_sq"][~MASK] == 0).all())

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    handle = co.constrain(adam, model, {"weight": co.Mask(MASK)})
    train(adam, model, 10)
    assert bool((adam.state[model.weight]["exp_avg_sq"][~MASK] > 0).all())
    handle.remove()
    assert bool((adam.state[model.weight]["exp_avg_sq"][~MASK] == 0).all())

    model, opt = run(OPTIMIZERS["adam"], co.Mask(MASK), steps=10)
    inner = opt.optimizer
    assert bool((inner.state[model.weight]["exp_avg_sq"][~MASK] > 0).all())
    del opt
    gc.collect()
    assert bool((inner.state[model.weight]["exp_avg_sq"][~MASK] == 0).all())
    assert not inner._optimizer_state_dict_post_hooks


@pytest.mark.parametrize("second", [co.NonNegative(), co.Tied(torch.arange(16) // 2)], ids=repr)
def test_attach_on_a_filled_parameter_reads_the_true_state(second):
    def go(fill):
        model, opt = run(OPTIMIZERS["adam"], co.Mask(MASK), steps=10, fill=fill)
        opt.attach("weight", second)
        after_attach = copy.deepcopy(opt.optimizer.state_dict())  # torch's own entries are references
        train(opt, model, 20)
        return model, opt, after_attach

    (m1, o1, a1), (m2, o2, a2) = go(True), go(False)
    assert_same_state(a1, a2)
    assert torch.equal(m1.weight, m2.weight)
    assert_same_state(o1.state_dict(), o2.state_dict())


def test_attach_is_all_or_nothing_with_the_filler():
    model, opt = run(OPTIMIZERS["adam"], co.Mask(MASK), steps=10)
    live = opt.state[model.weight]["exp_avg_sq"].clone()
    records = dict(opt.engine._filler.records)
    with pytest.raises(co.ConstraintError):
        opt.engine.attach_all(
            [("bias", co.NonNegative()), ("weight", co.Mask(torch.ones(3, dtype=torch.bool)))]
        )
    assert torch.equal(opt.state[model.weight]["exp_avg_sq"], live)
    assert opt.engine._filler.records == records


def test_repair_of_non_finite_values_with_the_filler():
    def go(fill):
        model, opt = run(OPTIMIZERS["adam"], co.Mask(MASK), steps=10, fill=fill)
        x = batch()
        for i in range(10):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if i == 3:  # inf on a held entry: the masked gradient is NaN there (inf * 0)
                r, c = (~MASK).nonzero()[0].tolist()
                model.weight.grad[r, c] = float("inf")
            with pytest.warns(RuntimeWarning, match="non-finite") if i == 3 else _nothing():
                opt.step()
            if i == 3:
                st = opt.state[model.weight]
                assert all(bool((st[k][~MASK] == 0).all()) for k in ("exp_avg", "exp_avg_sq"))
        return model, opt

    (m1, o1), (m2, o2) = go(True), go(False)
    assert bool(m1.weight.isfinite().all()) and bool((m1.weight[~MASK] == 0).all())
    assert torch.equal(m1.weight, m2.weight)
    assert_same_state(o1.state_dict(), o2.state_dict())
    assert filled(o1)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
