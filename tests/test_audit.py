"""The audit measures what the optimizer did, on the real tensors, against closed forms.

- ``drift``: distance from the set after the wrapped step, before projection;
- ``residual``: distance after projection;
- ``grad_blocked``: ``||g - P_T(g)|| / ||g||``;

and measuring never changes training. Expected values here come from numpy/float64 arithmetic on
the set's definition, or from a bare optimizer replaying the same step, not from the library.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import constrained_optim as co
from constrained_optim.audit import Audit, AuditRecord, ParamSummary
from constrained_optim.constraints.base import Bound, Constraint
from tests.cases import LINEAR_CASES


# -- sets written for these tests ---------------------------------------------------------------------
class UnitSphere(Constraint):
    """``{x : ||x|| = 1}``: not linear, enforced by projection alone (no gradient projection)."""

    def _bind(self, param, name):
        return SphereBound(self, name, param)

    def __repr__(self):
        return "UnitSphere()"


class SphereBound(Bound):
    def project_(self, x):
        x.div_(x.norm())


class HalfHeld(Constraint):
    """Claims ``{x : x[held] = 0}`` but its projection only halves the held entries: inexact, so
    the residual (distance of the result from its own re-projection) must show it."""

    def __init__(self, held):
        self.held = held

    def _bind(self, param, name):
        return HalfHeldBound(self, name, param)

    def __repr__(self):
        return "HalfHeld()"


class HalfHeldBound(Bound):
    def project_(self, x):
        x[self.constraint.held] *= 0.5


def seeded_grad(k, i, p):
    g = torch.Generator().manual_seed(1000 * k + i)
    return torch.randn(p.shape, generator=g, dtype=p.dtype)


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def last(opt, name) -> AuditRecord:
    (r,) = [r for r in opt.audit.last if r.name == name]
    return r


# -- drift ---------------------------------------------------------------------------------------------
def test_drift_from_adamw_decay_on_fixed_value_matches_closed_form():
    # AdamW's decoupled decay moves held entries by lr * wd * value before the projection puts
    # them back: with value v, k held entries, drift = lr*wd*|v|*sqrt(k), drift_max = lr*wd*|v|
    lr, wd, value = 0.1, 0.5, 2.0
    w = nn.Parameter(torch.full((4, 3, 3), value))
    opt = co.ConstrainedOptimizer(torch.optim.AdamW([w], lr=lr, weight_decay=wd), audit_every=1)
    opt.attach(w, co.Fixed((..., 1, 1), value))
    name = "param_groups[0].params[0]"  # no model given: named by position
    for k in range(3):
        step_with(opt, [w], [seeded_grad(k, 0, w)])
        r = last(opt, name)
        per_entry = np.float64(np.float32(value)) - np.float64(np.float32(value) * np.float32(1 - lr * wd))
        assert r.drift == pytest.approx(per_entry * math.sqrt(4), rel=1e-6)
        assert r.drift_max == pytest.approx(per_entry, rel=1e-6)
        assert r.drift > 0
        assert r.residual == 0.0  # held entries written back exactly
        assert float(w.detach()[..., 1, 1].sub(value).abs().max()) == 0.0


def test_drift_off_a_nonlinear_set_matches_a_replayed_bare_step():
    # Adam pushes a unit vector off the sphere; the drift is | ||x_new|| - 1 | where x_new is what
    # a bare Adam produces from the same point and gradient
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4))
    with torch.no_grad():
        w.div_(w.norm())
    twin = nn.Parameter(w.detach().clone())
    opt = co.ConstrainedOptimizer(torch.optim.Adam([w], lr=0.05), audit_every=1)
    opt.attach(w, UnitSphere())
    bare = torch.optim.Adam([twin], lr=0.05)
    for k in range(4):
        g = seeded_grad(k, 0, w)
        with torch.no_grad():
            twin.copy_(w)
        bare.state.clear()
        bare.state[twin] = {
            key: v.clone() if torch.is_tensor(v) else v for key, v in opt.optimizer.state.get(w, {}).items()
        }
        step_with(opt, [w], [g])
        step_with(bare, [twin], [g])
        x = twin.detach().double().numpy()
        gap = x - x / np.linalg.norm(x)
        r = opt.audit.last[0]
        assert r.drift == pytest.approx(np.linalg.norm(gap), rel=1e-4, abs=1e-7)
        assert r.drift_max == pytest.approx(np.abs(gap).max(), rel=1e-4, abs=1e-7)
        assert r.drift > 1e-4
        assert r.residual <= 1e-6  # normalising again moves it by float rounding only
        assert math.isnan(r.grad_blocked)  # the sphere projects no gradient


def test_drift_on_orthogonal_under_adam():
    orthogonal = getattr(co, "Orthogonal", None)
    if orthogonal is None:
        pytest.skip("co.Orthogonal is not in this build")
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4))
    opt = co.ConstrainedOptimizer(torch.optim.Adam([w], lr=0.05), audit_every=1)
    opt.attach(w, orthogonal())
    for k in range(3):
        step_with(opt, [w], [seeded_grad(k, 0, w)])
        r = opt.audit.last[0]
        assert r.drift > 1e-5
        assert r.residual <= 1e-5


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.Adam(ps, lr=0.05),
    ],
    ids=["sgd", "sgd-nesterov", "adam"],
)
def test_drift_is_exactly_zero_where_the_optimizer_cannot_leave_the_set(make_opt):
    # projected gradients + element-wise updates keep linear sets through the origin exactly
    torch.manual_seed(0)
    params = [
        nn.Parameter(torch.randn(3, 4)),
        nn.Parameter(torch.randn(4, 4)),
        nn.Parameter(torch.randn(2, 2, 2)),
        nn.Parameter(torch.randn(2, 3, 3)),
    ]
    opt = co.ConstrainedOptimizer(make_opt(params), audit_every=1)
    opt.attach(params[0], co.Mask(torch.rand(3, 4) > 0.5))
    opt.attach(params[1], co.Symmetric())
    opt.attach(params[2], co.Tied(torch.tensor([[0, 1], [1, 0]])))
    opt.attach(params[3], co.Fixed((..., 1, 1), 0.0))
    for k in range(5):
        step_with(opt, params, [seeded_grad(k, i, p) for i, p in enumerate(params)])
        assert len(opt.audit.last) == 4
        for r in opt.audit.last:
            assert (r.drift, r.drift_max, r.residual) == (0.0, 0.0, 0.0), r


# -- residual ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.id)
def test_residual_of_exact_projections_is_tiny(case):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(case.shape))
    opt = co.ConstrainedOptimizer(torch.optim.Adam([w], lr=0.05), audit_every=1)
    opt.attach(w, case.make())
    for k in range(3):
        step_with(opt, [w], [seeded_grad(k, 0, w)])
        (r,) = opt.audit.last
        if case.exact:  # written back entry by entry: nothing left to measure
            assert r.residual == 0.0, r
        else:  # a re-projection in float32 moves it by rounding only
            assert 0.0 <= r.residual <= 1e-7 * max(1.0, float(w.detach().norm())), r
        assert case.violation(w.detach()) <= 1e-6
        assert math.isfinite(r.drift) and math.isfinite(r.grad_blocked)


def _half_held_setup(**kwargs):
    held = torch.tensor([[False, True, False], [True, False, False]])
    w = nn.Parameter(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([w], lr=0.0), audit_every=1, **kwargs)
    opt.attach(w, HalfHeld(held))  # attach halves held entries: 1.0, 2.0
    return w, opt, held


def test_inexact_projection_shows_its_residual_and_warns_naming_the_parameter():
    w, opt, held = _half_held_setup(tolerance=1e-3, on_violation="warn")
    with pytest.warns(RuntimeWarning, match=r"param_groups\[0\]\.params\[0\].*residual") as caught:
        step_with(opt, [w], [torch.zeros(2, 3)])
    assert caught[0].filename == __file__  # points at the user's step() call
    (r,) = opt.audit.last
    # before the step held entries are 1.0, 2.0 (halved at attach); the step halves them to
    # 0.5, 1.0; the residual is the distance to their re-projection (0.25, 0.5)
    assert r.drift == pytest.approx(math.hypot(0.5, 1.0), rel=1e-7)
    assert r.drift_max == pytest.approx(1.0, rel=1e-7)
    assert r.residual == pytest.approx(math.hypot(0.25, 0.5), rel=1e-7)
    assert r.residual > opt.engine.tolerance


def test_inexact_projection_raises_under_raise_and_still_records():
    w, opt, _ = _half_held_setup(tolerance=1e-3, on_violation="raise")
    with pytest.raises(co.ConstraintViolation, match=r"param_groups\[0\]\.params\[0\].*HalfHeld"):
        step_with(opt, [w], [torch.zeros(2, 3)])
    assert opt.audit.last[0].residual == pytest.approx(math.hypot(0.25, 0.5), rel=1e-7)
    assert opt.audit.summaries["param_groups[0].params[0]"].residual_max == opt.audit.last[0].residual


def test_inexact_projection_is_silent_under_ignore_and_within_tolerance():
    for kwargs in ({"tolerance": 1e-3, "on_violation": "ignore"}, {"tolerance": 10.0}):
        w, opt, _ = _half_held_setup(**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            step_with(opt, [w], [torch.zeros(2, 3)])
        assert opt.audit.last[0].residual > 0.5


def test_default_tolerance_is_relative_to_the_parameter():
    w, opt, _ = _half_held_setup()  # tolerance=None: a few float eps of ||w||
    with pytest.warns(RuntimeWarning, match="residual"):
        step_with(opt, [w], [torch.zeros(2, 3)])


# -- non-finite values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("audit_every", [0, 1])
@pytest.mark.parametrize("on_violation", ["warn", "ignore"])
def test_nonfinite_parameter_is_always_reported_by_name(audit_every, on_violation, caplog):
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(3))
    opt = co.ConstrainedOptimizer(
        torch.optim.SGD([a, b], lr=1.0), audit_every=audit_every, on_violation=on_violation
    )
    opt.attach(a, co.Symmetric()).attach(b, co.Mask(torch.tensor([True, True, False])))
    caplog.set_level("WARNING", logger="constrained_optim")
    with pytest.warns(RuntimeWarning, match=r"non-finite.*params\[1\]") as caught:
        step_with(opt, [a, b], [torch.zeros(2, 2), torch.tensor([0.0, math.inf, 0.0])])
    assert all("param_groups[0].params[0]" not in str(w.message) for w in caught)
    (record,) = [r for r in caplog.records if r.name == "constrained_optim"]
    assert record.levelname == "WARNING" and "param_groups[0].params[1]" in record.getMessage()
    summary = opt.audit.summaries["param_groups[0].params[1]"]
    assert summary.nonfinite == 1
    if audit_every:
        assert math.isnan(last(opt, "param_groups[0].params[1]").drift)


def test_nonfinite_parameter_raises_under_raise():
    w = nn.Parameter(torch.ones(3))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([w], lr=1.0), on_violation="raise")
    opt.attach(w, co.Mask(torch.tensor([True, True, False])))
    with pytest.raises(co.ConstraintViolation, match=r"non-finite.*params\[0\]"):
        step_with(opt, [w], [torch.tensor([math.nan, 0.0, 0.0])])


# -- grad_blocked ------------------------------------------------------------------------------------------
def test_grad_blocked_is_the_share_of_the_gradient_norm_removed():
    g1 = torch.tensor([[3.0, -1.0, 2.0], [0.5, 4.0, -2.0]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    g2 = torch.arange(9.0).view(1, 3, 3) - 3.0
    g3 = torch.tensor([[1.0, 2.0], [5.0, -3.0]])
    g4 = torch.tensor([[1.0, 2.0], [4.0, 3.0]])
    labels = torch.tensor([[0, 1], [1, 0]])
    ps = [nn.Parameter(torch.zeros_like(g)) for g in (g1, g2, g3, g4)]
    opt = co.ConstrainedOptimizer(torch.optim.SGD(ps, lr=0.1), audit_every=1)
    opt.attach(ps[0], co.Mask(mask)).attach(ps[1], co.Fixed((..., 1, 1), 0.0))
    opt.attach(ps[2], co.Symmetric()).attach(ps[3], co.Tied(labels))
    step_with(opt, ps, [g1, g2, g3, g4])

    def share(g, pg):
        g, pg = g.double().numpy(), pg.double().numpy()
        return np.linalg.norm(g - pg) / np.linalg.norm(g)

    tied = g4.clone()
    for v in (0, 1):
        tied[labels == v] = g4[labels == v].mean()
    expected = [
        share(g1, g1 * mask),
        share(g2, torch.where(torch.arange(9).view(1, 3, 3) == 4, 0.0, g2)),
        share(g3, (g3 + g3.T) / 2),
        share(g4, tied),
    ]
    got = [r.grad_blocked for r in sorted(opt.audit.last, key=lambda r: r.name)]
    assert got == pytest.approx(expected, rel=1e-6, abs=0)


def test_grad_blocked_is_nan_without_a_gradient_or_a_gradient_projection():
    a, b, c = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([a, b, c], lr=0.1), audit_every=1)
    keep = torch.tensor([True, False, True])
    opt.attach(a, co.Mask(keep)).attach(b, UnitSphere()).attach(c, co.Mask(keep))
    a.grad, b.grad, c.grad = torch.ones(3), torch.ones(3), None
    opt.step()
    blocked = [r.grad_blocked for r in sorted(opt.audit.last, key=lambda r: r.name)]
    assert blocked[0] == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(blocked[1]) and math.isnan(blocked[2])
    a.grad = torch.zeros(3)  # a zero gradient: nothing to share out
    opt.step()
    assert math.isnan(last(opt, "param_groups[0].params[0]").grad_blocked)


def test_grad_blocked_under_lbfgs_closure():
    w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = co.ConstrainedOptimizer(torch.optim.LBFGS([w], lr=0.5, max_iter=3), audit_every=1)
    opt.attach(w, co.Mask(torch.tensor([True, False, True])))
    target = torch.tensor([0.0, 5.0, -1.0])

    def closure():
        opt.zero_grad()
        loss = (w - target).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    (r,) = opt.audit.last
    assert 0 < r.grad_blocked < 1 and r.drift == 0.0 and r.residual == 0.0
    assert float(w.detach()[1]) == 0.0


# -- measuring does not change training ---------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.sym = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4, bias=False)
        self.span = nn.Linear(2, 4, bias=False)
        self.sphere = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)


def _trained(audit_every, make_opt, steps=7):
    torch.manual_seed(0)
    net = Net()
    inner = make_opt(net.parameters())
    opt = co.ConstrainedOptimizer(inner, net, audit_every=audit_every)
    opt.attach("conv", co.Fixed((..., 1, 1), 0.25))
    opt.attach("sym", co.Symmetric())
    opt.attach("tied", co.Tied(torch.arange(16).view(4, 4) % 5))
    opt.attach("span", co.Subspace(torch.tensor([[1.0, -2.0]])))  # every row along (1, -2)
    opt.attach("sphere.weight", UnitSphere())
    opt.attach("head.weight", co.Mask(torch.rand(2, 3) > 0.3))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 2, 4, 4, generator=gen)
        h = net.conv(x).flatten(1)[:, :4]
        h = net.span(net.tied(net.sym(h))[:, :2])
        net.head(torch.tanh(net.sphere(h))).pow(2).sum().backward()
        opt.step()
    return net, opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False),
        lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=0.01),
    ],
    ids=["adam", "adamw-loop", "sgd-momentum"],
)
def test_auditing_leaves_training_bitwise_identical(make_opt):
    runs = {n: _trained(n, make_opt) for n in (0, 1, 3)}
    ref_net, ref_opt = runs[0]
    for n, (net, opt) in runs.items():
        for (name, a), b in zip(ref_net.named_parameters(), net.parameters()):
            assert torch.equal(_bits(a), _bits(b)), (n, name)  # bit patterns: -0.0 != 0.0 here
        for a, b in zip(ref_net.parameters(), net.parameters()):
            for key, va in ref_opt.optimizer.state[a].items():
                assert torch.equal(torch.as_tensor(va), torch.as_tensor(opt.optimizer.state[b][key]))
    assert runs[0][1].audit.history == []
    assert {r.step for r in runs[1][1].audit.history} == set(range(1, 8))
    assert {r.step for r in runs[3][1].audit.history} == {3, 6}
    assert len(runs[3][1].audit.last) == 6


def test_one_host_read_per_audited_step(monkeypatch):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(300, 300)) for _ in range(3)]
    opt = co.ConstrainedOptimizer(torch.optim.Adam(ps, lr=0.01), audit_every=1)
    for p in ps:
        opt.attach(p, co.Mask(torch.rand(300, 300) > 0.5))
    package = os.path.dirname(co.__file__)
    reads = []

    def counting(method):
        original = getattr(torch.Tensor, method)

        def wrapper(self, *args):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):
                reads.append((method, tuple(self.shape)))
            return original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, wrapper)

    for method in ("tolist", "item", "__float__", "cpu"):
        counting(method)
    step_with(opt, ps, [torch.randn(300, 300) for _ in ps])
    assert reads == [("tolist", (3, 6))]  # one (parameters x measures) table per step


# -- the record store ---------------------------------------------------------------------------------------
def test_history_stays_bounded_over_ten_thousand_steps():
    w = nn.Parameter(torch.ones(3))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([w], lr=0.1), audit_every=1)
    opt.attach(w, co.Mask(torch.tensor([True, False, True])))
    opt.audit.max_history = 64
    g = torch.tensor([1.0, 1.0, 1.0])
    for _ in range(10_000):
        w.grad = g.clone()
        opt.step()
    history = opt.audit.history
    assert len(history) == 64 and history[-1].step == 10_000 and history[0].step == 10_000 - 63
    s = opt.audit.summaries["param_groups[0].params[0]"]
    assert s.audited == 10_000 and s.last_step == 10_000
    assert s.grad_blocked_mean == pytest.approx(1 / math.sqrt(3))
    assert len(opt.audit.state_dict()["history"]) == 64


def _records(rows):
    return [AuditRecord(step, name, "C", d, d / 2, r, b) for step, name, d, r, b in rows]


def test_summary_covers_the_whole_run_not_only_the_kept_history():
    rows = [
        (s, n, d, r, b)
        for s, (d, r, b) in enumerate(
            [(0.5, 0.0, 0.1), (2.0, 1e-9, 0.3), (math.nan, math.nan, math.nan), (1.0, 3e-9, 0.2)], 1
        )
        for n in ("a", "b")
    ]
    full, small = Audit(), Audit(max_history=2)
    for audit in (full, small):
        for step in range(1, 5):
            step_rows = [r for r in _records(rows) if r.step == step]
            audit.add(
                step,
                [r.name for r in step_rows],
                [r.constraint for r in step_rows],
                [(r.drift, r.drift_max, r.residual, r.grad_blocked) for r in step_rows],
            )
        audit.note_nonfinite(3, ["a"], ["C"])
    assert len(small.history) == 2 and [r.step for r in small.last] == [4, 4]
    for audit in (full, small):
        s = audit.summaries["a"]
        assert (s.audited, s.drift_max, s.worst_step, s.nonfinite) == (4, 2.0, 2, 1)
        assert s.drift_mean == pytest.approx((0.5 + 2.0 + 1.0) / 3)
        assert (s.residual_max, s.residual_step) == (3e-9, 4)
        assert s.grad_blocked_mean == pytest.approx(0.2)
        assert audit.summaries["b"].nonfinite == 0


def test_state_dict_round_trip_continues_the_run(tmp_path):
    def fill(audit, steps):
        for step in steps:
            audit.add(step, ["a", "b"], ["C", "D"], [(step, 0.1, 0.0, 0.5), (0.0, 0.0, 1e-9, math.nan)])

    whole, first = Audit(max_history=5), Audit(max_history=5)
    fill(whole, range(1, 9))
    fill(first, range(1, 5))
    path = tmp_path / "audit.pt"
    torch.save(first.state_dict(), path)
    resumed = Audit()
    resumed.load_state_dict(torch.load(path, weights_only=True))  # plain data only
    fill(resumed, range(5, 9))
    assert resumed.max_history == 5
    assert resumed.history == whole.history and resumed.last == whole.last
    assert resumed.summaries == whole.summaries
    # a checkpoint from before summaries existed: rebuilt from its history
    old = Audit()
    old.load_state_dict(
        {"history": [r.to_dict() for r in whole.history], "last": [r.to_dict() for r in whole.last]}
    )
    assert old.summaries["a"].drift_max == 8.0 and old.summaries["a"].audited == 2
    with pytest.raises(ValueError, match="audit state_dict"):
        Audit().load_state_dict({"records": []})
    pickle.loads(pickle.dumps(resumed))


def test_audit_of_a_real_run_round_trips():
    w = nn.Parameter(torch.ones(2, 2))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([w], lr=0.1), audit_every=1)
    opt.attach(w, co.Symmetric())
    step_with(opt, [w], [torch.tensor([[1.0, 2.0], [0.0, 1.0]])])
    other = Audit()
    other.load_state_dict(opt.audit.state_dict())
    assert other.history == opt.audit.history and other.summaries == opt.audit.summaries
    (r,) = other.last
    # g = [[1, 2], [0, 1]]: ||(g - g.T) / 2|| / ||g|| = sqrt(2) / sqrt(6)
    assert r.grad_blocked == pytest.approx(math.sqrt(2 / 6))
    assert isinstance(other.summaries[r.name], ParamSummary)


def test_max_history_is_checked():
    with pytest.raises(ValueError):
        Audit(max_history=-1)
    with pytest.raises(ValueError):
        Audit().max_history = 1.5
