"""Every torch.optim optimizer keeps every constraint after every step, attached cold or to a warm
optimizer mid-training; exact sets hold bitwise, the others to their case's tolerance."""

from __future__ import annotations

import inspect

import pytest
import torch

import constrained_optim as co
from constrained_optim.audit.watch import FiniteWatch

from cases import CASES

O = torch.optim  # noqa: E741 - short for the optimizer table below


def configs():
    """(id, factory(params), needs_closure, needs_2d) for every optimizer, foreach on and off."""
    out = []

    base = [
        ("SGD", lambda p, **k: O.SGD(p, lr=0.05, **k)),
        ("SGD-momentum", lambda p, **k: O.SGD(p, lr=0.05, momentum=0.9, **k)),
        (
            "SGD-nesterov-wd",
            lambda p, **k: O.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, **k),
        ),
        ("Adam", lambda p, **k: O.Adam(p, lr=0.05, **k)),
        ("Adam-wd", lambda p, **k: O.Adam(p, lr=0.05, weight_decay=0.1, **k)),
        ("AdamW", lambda p, **k: O.AdamW(p, lr=0.05, weight_decay=0.1, **k)),
        ("AMSGrad", lambda p, **k: O.Adam(p, lr=0.05, amsgrad=True, **k)),
        ("NAdam", lambda p, **k: O.NAdam(p, lr=0.05, **k)),
        ("RAdam", lambda p, **k: O.RAdam(p, lr=0.05, **k)),
        ("Adamax", lambda p, **k: O.Adamax(p, lr=0.05, **k)),
        ("Adagrad", lambda p, **k: O.Adagrad(p, lr=0.05, **k)),
        ("Adadelta", lambda p, **k: O.Adadelta(p, lr=1.0, **k)),
        ("RMSprop-momentum-centered", lambda p, **k: O.RMSprop(p, lr=0.01, momentum=0.9, centered=True, **k)),
        ("Rprop", lambda p, **k: O.Rprop(p, lr=0.01, **k)),
        ("ASGD", lambda p, **k: O.ASGD(p, lr=0.05, **k)),
    ]
    if hasattr(O, "Adafactor"):
        base.append(("Adafactor", lambda p, **k: O.Adafactor(p, lr=0.05, **k)))
    for name, make in base:
        for foreach in (False, True):
            out.append(
                (f"{name}-foreach={foreach}", lambda p, m=make, f=foreach: m(p, foreach=f), False, False)
            )
    out.append(("LBFGS", lambda p: O.LBFGS(p, lr=0.5, max_iter=4, history_size=5), True, False))
    out.append(
        ("LBFGS-wolfe", lambda p: O.LBFGS(p, lr=1, max_iter=4, line_search_fn="strong_wolfe"), True, False)
    )
    if hasattr(O, "Muon"):  # its update is not element-wise; it takes 2-D parameters only
        out.append(("Muon", lambda p: O.Muon(p, lr=0.05, momentum=0.9), False, True))
    return out


CONFIGS = configs()


def loss_fn(p, target):
    # the sum term couples entries, so projecting some moves the optimum of the others
    return ((p - target) ** 2).sum() + 0.1 * p.sin().sum() + 0.01 * (p**4).sum() + p.sum() ** 2 / p.numel()


def run(case, config, warm: bool, steps=4, dtype=torch.float32):
    name, make, needs_closure, _ = config
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(case.shape, generator=gen, dtype=dtype))
    target = torch.randn(case.shape, generator=gen, dtype=dtype) * 2
    model = torch.nn.Module()
    model.w = p
    inner = make([p])
    opt = co.ConstrainedOptimizer(inner, model)

    def closure():
        opt.zero_grad()
        loss = loss_fn(p, target)
        loss.backward()
        return loss

    def step():
        if needs_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()

    if warm:  # train unconstrained first, so momentum and second moments hold off-set values
        for _ in range(3):
            step()
    opt.attach("w", case.make())
    start = p.detach().clone()
    for _ in range(steps):
        step()
        assert bool(p.isfinite().all()), f"{name}: diverged"
        v = case.violation(p.detach())
        limit = 0.0 if case.exact else case.rtol * max(1.0, float(p.detach().abs().max()))
        assert v <= limit, f"{name}: violation {v} after a step"
    assert not torch.equal(p.detach(), start), f"{name}: the constrained parameter did not train"


MATRIX = [  # Muon takes 2-D parameters only
    pytest.param(case, config, id=f"{case.id}-{config[0]}")
    for case in CASES
    for config in CONFIGS
    if not (config[3] and len(case.shape) != 2)
]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("case, config", MATRIX)
def test_constraint_holds_after_every_step(case, config, warm):
    run(case, config, warm)


def test_matrix_covers_every_torch_optimizer():
    """A new optimizer in torch.optim shows up here rather than going untested."""
    covered = {c[0].split("-")[0] for c in CONFIGS} | {"Adam", "SGD", "RMSprop"}
    in_torch = {
        n
        for n, c in vars(O).items()
        if inspect.isclass(c) and issubclass(c, O.Optimizer) and c is not O.Optimizer
    }
    assert in_torch - covered <= {"SparseAdam"}, in_torch - covered  # SparseAdam takes sparse grads


@pytest.mark.parametrize("name", ["SGD-momentum", "Adam", "AdamW"])
def test_warm_state_is_projected_at_attach(name):
    """Held entries' momentum and second moments are cleared and tied entries' moments agree, so
    the very next update of a feasible point stays in the set without the post-step projection."""
    make = {
        "SGD-momentum": lambda p: O.SGD(p, lr=0.1, momentum=0.9),
        "Adam": lambda p: O.Adam(p, lr=0.1),
        "AdamW": lambda p: O.AdamW(p, lr=0.1),
    }[name]
    p = torch.nn.Parameter(torch.randn(3, 4))
    q = torch.nn.Parameter(torch.randn(3, 4))
    inner = make([p, q])
    for _ in range(3):
        inner.zero_grad()
        (p.pow(2).sum() + q.sin().sum() * 3).backward()
        inner.step()
    mask = torch.rand(3, 4) > 0.5
    labels = torch.tensor([0, 0, 1, 1])
    opt = co.ConstrainedOptimizer(inner).attach(p, co.Mask(mask)).attach(q, co.Tied(labels))
    for key, value in inner.state[p].items():
        if torch.is_tensor(value) and value.shape == p.shape:
            assert bool((value[~mask] == 0).all()), key
    for key, value in inner.state[q].items():
        if torch.is_tensor(value) and value.shape == q.shape:
            assert torch.equal(value[:, 0], value[:, 1]) and torch.equal(value[:, 2], value[:, 3]), key
    # the wrapped step alone (no projection afterwards) keeps the set
    opt.zero_grad()
    (p.pow(2).sum() + q.sin().sum() * 3).backward()
    opt.engine._project_grads(FiniteWatch())  # the step's gradient projection alone
    inner.step()
    assert bool((p[~mask] == 0).all())
    assert torch.equal(q[:, 0], q[:, 1]) and torch.equal(q[:, 2], q[:, 3])


def test_fixed_nonzero_value_survives_weight_decay():
    """Decay pulls held entries toward 0 inside the wrapped step; the projection puts them back."""
    p = torch.nn.Parameter(torch.randn(2, 3, 3))
    opt = co.ConstrainedOptimizer(O.AdamW([p], lr=0.1, weight_decay=0.5)).attach(
        p, co.Fixed((..., 1, 1), 0.75)
    )
    for _ in range(5):
        opt.zero_grad()
        p.pow(2).sum().backward()
        opt.step()
        assert bool((p[..., 1, 1] == 0.75).all())


@pytest.mark.parametrize(
    "make",
    [
        lambda: co.Mask(torch.rand(8, 8, 3, 3, generator=torch.Generator().manual_seed(0)) > 0.5),
        lambda: co.Fixed((..., 1, 1), 0.25),
        lambda: co.Tied(torch.tensor([[0, 1, 0], [1, 2, 1], [0, 1, 0]])),
        lambda: co.Symmetric(dims=(0, 1), flip=(2, 3)),
        lambda: co.Invariant.rotations(),
        lambda: co.Orthogonal(),
        lambda: co.NMSparsity(2, 4, dim=1),
    ],
    ids=["Mask", "Fixed", "Tied", "Symmetric", "rotations", "Orthogonal", "NMSparsity"],
)
def test_channels_last_weights_keep_their_layout_and_their_set(make):
    """A channels_last conv weight is not contiguous; projections write through its strides."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3).to(memory_format=torch.channels_last)
    reference = torch.nn.Conv2d(8, 8, 3)
    reference.load_state_dict(conv.state_dict())
    opts = [
        co.ConstrainedOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2), m, on_violation="raise").attach(
            "weight", make()
        )
        for m in (conv, reference)
    ]
    for step in range(3):
        x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(step))
        for m, opt in zip((conv, reference), opts):
            opt.zero_grad()
            m(x.contiguous(memory_format=torch.channels_last) if m is conv else x).pow(2).mean().backward()
            opt.step()
        opts[0].check()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv.weight.detach(), reference.weight.detach(), rtol=1e-5, atol=1e-6)
