"""The engine's own promises: one engine per optimizer, the same constraint twice is one, bounds
follow casts, the handle's state rides in the optimizer's ``state_dict``, torch's lr=0
initialisation step is not a step, held entries recover from inf, a step GradScaler skips is
not counted, and logging never breaks training."""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings

import pytest
import torch
from torch import nn

import constrained_optim as co


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))


def one_step(model, opt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(5, 6, generator=gen)).square().mean().backward()
    return opt.step()


# -- one engine per optimizer ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "first, second",
    [("wrapper", "wrapper"), ("constrain", "wrapper"), ("constrain", "constrain"), ("wrapper", "constrain")],
)
def test_a_second_engine_on_one_optimizer_is_refused(first, second):
    model = linear_model()
    adam = torch.optim.Adam(model.parameters())
    make = {
        "wrapper": lambda: co.ConstrainedOptimizer(adam, model, {"0.weight": co.Symmetric()}),
        "constrain": lambda: co.constrain(adam, model, {"0.weight": co.Symmetric()}),
    }
    keep = make[first]()
    with pytest.raises(co.ConstraintError, match="already constrained"):
        make[second]()
    assert keep.engine.bounds  # the first still works
    if first == "constrain":
        keep.remove()
        make[second]()  # once removed, another may take it


def test_wrapping_a_wrapper_is_refused():
    model = linear_model()
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(co.ConstraintError, match="already constrained"):
        co.ConstrainedOptimizer(opt, model)


def test_a_discarded_wrapper_frees_its_optimizer():
    import gc

    model = linear_model()
    adam = torch.optim.Adam(model.parameters())
    co.ConstrainedOptimizer(adam, model, {"0.weight": co.Symmetric()})
    gc.collect()
    co.ConstrainedOptimizer(adam, model, {"0.weight": co.Symmetric()})


# -- the same constraint twice ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        co.Orthogonal,
        lambda: co.Mask(torch.arange(36).view(6, 6) % 2 == 0),
        lambda: co.Tied(torch.arange(36).view(6, 6) % 4),
        lambda: co.MaxNorm(1.0) & co.NonNegative(),
    ],
)
def test_attaching_an_equal_constraint_again_changes_nothing(make):
    model = linear_model()
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters()), model)
    opt.attach("0.weight", make())
    bound = opt.engine.bounds[model[0].weight]
    for _ in range(20):
        opt.attach("0.weight", make())
    assert opt.engine.bounds[model[0].weight] is bound
    one_step(model, opt)
    assert math.isfinite(float(model[0].weight.detach().sum()))
    opt.check()


def test_a_different_constraint_still_intersects():
    model = linear_model()
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters()), model)
    opt.attach("0.weight", co.MaxNorm(1.0))
    opt.attach("0.weight", co.MaxNorm(0.5))
    one_step(model, opt)
    assert float(model[0].weight.detach().norm(dim=1).max()) <= 0.5 * (1 + 1e-6)


# -- casts after attach ------------------------------------------------------------------------------
CAST_CASES = {
    "fixed-mask": lambda: co.Fixed(torch.eye(6, dtype=torch.bool), 0.5),
    "subspace": lambda: co.Subspace(torch.randn(3, 6)),
    "orthogonal": co.Orthogonal,
    "nm-fixed": lambda: co.NMSparsity(1, 2, dim=1),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", list(CAST_CASES))
def test_a_parameter_cast_after_attach_keeps_its_constraint(case, dtype):
    model = linear_model()
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model)
    opt.attach("0.weight", CAST_CASES[case]())
    keep = model[0].weight.detach().clone() != 0
    model.to(dtype)  # before the first step: torch's optimizers keep state in the dtype it was made in
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 6, dtype=dtype)).float().square().mean().backward()
        opt.step()
    assert model[0].weight.dtype == dtype
    opt.check()
    if case == "nm-fixed":  # the pattern chosen at attach is the one kept
        assert torch.equal(model[0].weight.detach() != 0, keep)


# -- the handle's state in the optimizer's own state_dict -------------------------------------------
def test_constrain_state_rides_in_the_optimizer_state_dict():
    model = linear_model()
    adam = torch.optim.Adam(model.parameters(), lr=0.05)
    handle = co.constrain(adam, model, {"0.weight": co.NMSparsity(1, 2, dim=1)})
    for k in range(3):
        one_step(model, adam, k)
    saved = copy.deepcopy(adam.state_dict())  # torch's state_dict shares the live state tensors
    assert saved["constraints"]["steps_taken"] == 3
    model_state = {k: v.clone() for k, v in model.state_dict().items()}

    fresh_model = linear_model(seed=7)  # another init: another pattern at attach
    fresh_model.load_state_dict(model_state)
    fresh_adam = torch.optim.Adam(fresh_model.parameters(), lr=0.05)
    with torch.no_grad():
        fresh_model[0].weight.copy_(torch.randn(6, 6))  # a fresh pattern would differ
    fresh = co.constrain(fresh_adam, fresh_model, {"0.weight": co.NMSparsity(1, 2, dim=1)})
    fresh_model.load_state_dict(model_state)
    fresh_adam.load_state_dict(saved)
    assert fresh.steps_taken == 3
    assert len(fresh.audit.history) == len(handle.audit.history)
    for k in range(3, 5):
        one_step(model, adam, k)
        one_step(fresh_model, fresh_adam, k)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


def test_a_plain_checkpoint_into_a_constrained_optimizer_is_refused_and_changes_nothing():
    model = linear_model()
    plain = torch.optim.Adam(model.parameters())
    one_step(model, plain)
    saved = plain.state_dict()
    adam = torch.optim.Adam(model.parameters())
    co.constrain(adam, model, {"0.weight": co.Symmetric()})
    with pytest.raises(co.ConstraintError, match="no constraint state"):
        adam.load_state_dict(saved)
    assert not adam.state


# -- wrappers that do not run Optimizer.__init__ -------------------------------------------------------
class WrappingOptimizer(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer: an Optimizer subclass that never runs __init__."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()


def test_constrain_looks_through_a_wrapper_to_the_optimizer_that_steps():
    model = linear_model()
    wrapped = WrappingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    handle = co.constrain(wrapped, model, {"0.weight": co.Symmetric()})
    assert handle.optimizer is wrapped.optimizer
    for k in range(3):
        one_step(model, wrapped, k)
    assert torch.equal(model[0].weight, model[0].weight.T)
    assert handle.steps_taken == 3
    assert "constraints" in wrapped.state_dict()


# -- torch's lr=0 initialisation step -------------------------------------------------------------------
def test_torch_initialisation_step_is_not_counted_audited_or_projected():
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = linear_model()
    opt = co.ConstrainedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.1), model, {"0.weight": co.Symmetric()}
    )
    _init_optim_state(opt)
    assert opt.steps_taken == 0 and not opt.audit.history
    assert opt.state  # the optimizer's state was created
    one_step(model, opt)
    assert opt.steps_taken == 1


def test_a_real_step_at_lr_zero_is_still_a_step():
    """Warm-up schedules start at lr 0: that first step's gradients still get projected."""
    model = linear_model()
    opt = co.ConstrainedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.0), model, {"0.weight": co.Symmetric()}
    )
    one_step(model, opt)
    assert opt.steps_taken == 1
    m = opt.state[model[0].weight]["exp_avg"]
    assert torch.equal(m, m.T)


# -- non-finite values ---------------------------------------------------------------------------------
def test_held_entries_are_exact_zero_again_after_an_inf():
    model = linear_model()
    free = torch.arange(36).view(6, 6) % 3 != 0
    opt = co.ConstrainedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, {"0.weight": co.Mask(free)}, audit_every=0
    )
    one_step(model, opt)
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf  # a held entry
    with pytest.warns(RuntimeWarning, match="non-finite"):
        one_step(model, opt, 1)
    assert bool((model[0].weight[~free] == 0).all())  # exactly 0, not NaN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(model, opt, 2)  # and the next step is clean
    assert bool((model[0].weight[~free] == 0).all())


# -- GradScaler with a fused optimizer -------------------------------------------------------------------
def test_a_step_the_grad_scaler_skips_is_not_counted_for_a_fused_optimizer():
    model = linear_model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    handle = co.constrain(adam, model, {"0.weight": co.Symmetric()})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam.zero_grad()
    scaler.scale(model(torch.randn(5, 6)).square().mean()).backward()
    model[2].weight.grad[0, 0] = math.inf  # the scaler finds it and the fused step skips
    scaler.step(adam)
    scaler.update()
    assert handle.steps_taken == 0 and not handle.audit.history
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    adam.zero_grad()
    scaler.scale(model(torch.randn(5, 6)).square().mean()).backward()
    scaler.step(adam)
    scaler.update()
    assert handle.steps_taken == 1
    assert torch.equal(model[0].weight, model[0].weight.T)


# -- logging --------------------------------------------------------------------------------------------
def test_a_broken_log_handler_never_breaks_training():
    model = linear_model()
    opt = co.ConstrainedOptimizer(
        torch.optim.Adam(model.parameters()), model, {"0.weight": co.Symmetric()}, log_every=1
    )
    stream = io.StringIO()
    stream.close()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("constrained_optim")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    raise_exceptions = logging.raiseExceptions
    logging.raiseExceptions = False
    try:
        for k in range(2):
            one_step(model, opt, k)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logging.raiseExceptions = raise_exceptions
    assert opt.steps_taken == 2


# -- memory ---------------------------------------------------------------------------------------------
def test_a_bool_mask_is_held_without_a_copy():
    """One copy of each mask: the user's bool tensor, read as uint8 (issue: memory to the floor)."""
    model = linear_model()
    free = torch.rand(6, 6) > 0.5
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters()), model, {"0.weight": co.Mask(free)})
    keep = opt.engine.bounds[model[0].weight].keep
    assert keep.dtype == torch.uint8 and keep.data_ptr() == free.data_ptr()
    one_step(model, opt)
    assert bool((model[0].weight[~free] == 0).all())
    # a mask that is not contiguous is copied once, and holds the same
    model2 = linear_model()
    transposed = free.T  # a view with other strides
    opt2 = co.ConstrainedOptimizer(
        torch.optim.Adam(model2.parameters()), model2, {"0.weight": co.Mask(transposed)}
    )
    keep2 = opt2.engine.bounds[model2[0].weight].keep
    assert keep2.data_ptr() != free.data_ptr() and torch.equal(keep2.bool(), transposed)
    one_step(model2, opt2)
    assert bool((model2[0].weight[~transposed] == 0).all())
