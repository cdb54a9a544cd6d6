"""The measuring primitives, against numpy float64 on the same tensors.

Covers each path a tensor can take: large CPU tensors reduced one at a time through the reused
scratch buffer, small ones and tensor subclasses (as an accelerator's tensors) in foreach batches,
empty ones, half precision; direct gap forms
(`Mask`, `Fixed`) and the change-the-projection-makes form (`Tied`, `Symmetric`), as the step's
`AuditWatch` reads them around the one projection.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import constrained_optim as co
from constrained_optim.audit.measure import STREAM_NUMEL, Scratch, all_finite, fetch, norms
from constrained_optim.audit.watch import AuditWatch
from constrained_optim.binding import Group
from constrained_optim.stepping import project_params


def project_measured_(kind, bounds, xs, scratch):
    """The engine's parameter projection under an `AuditWatch`: ``(drift, drift_max)``."""
    watch = AuditWatch(scratch)
    group = Group(kind, bounds, xs, bounds[0].traits.projects_grad, xs[0].device, xs[0].dtype)
    assert project_params([group], watch) is None
    project_measured_.last = watch
    return watch._drift, watch._drift_max


def residuals(bounds, xs):
    """``(residual, ||x||)`` the watch read after the last `project_measured_`."""
    watch = project_measured_.last
    return watch._residual, watch._norms


def project_grads_measured_(kind, bounds, gs, xs, scratch):
    """The engine's gradient projection under an `AuditWatch`: ``(removed, total)``."""
    watch = AuditWatch(scratch)
    token = watch.before_grads(bounds, gs, xs)
    kind.project_grad_all_(bounds, gs, xs)
    watch.after_grads(bounds, gs, token)
    pairs = [watch._blocked[id(b)] for b in bounds]
    return [r for r, _ in pairs], [t for _, t in pairs]


BIG = (300, 300)  # 90,000 entries: above STREAM_NUMEL, through the scratch buffer
assert BIG[0] * BIG[1] >= STREAM_NUMEL


def np64(t):
    return t.detach().double().numpy()


def bind(constraint, x, name="w"):
    return constraint.bind(x, name)


def test_norms_and_maxima_on_every_path():
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(BIG, generator=gen),
        torch.randn(7, generator=gen) * 3,
        torch.zeros(BIG),
        torch.empty(0),
        torch.randn(5, 2, generator=gen).half(),
        torch.full((100_000,), 300.0, dtype=torch.float16),
    ]  # ||.|| = 94868 > fp16's 65504
    ns, ms = norms(iter(tensors), with_max=True)
    assert len(ns) == len(ms) == len(tensors)
    for t, n, m in zip(tensors, ns, ms):
        a = np64(t)
        assert float(n) == pytest.approx(np.linalg.norm(a), rel=1e-4, abs=0)  # float32 sums
        assert float(m) == pytest.approx(np.abs(a).max() if a.size else 0.0, rel=1e-6, abs=0)
        assert n.dtype == torch.float32 and math.isfinite(float(n))
    ns_only, none = norms(tensors)
    assert none == [] and [float(a) for a in ns_only] == [float(b) for b in ns]
    # the batched path (one foreach kernel per batch) reads the same numbers
    batched_n, batched_m = norms([t.as_subclass(Batched) for t in tensors], with_max=True)
    assert [float(a) for a in batched_n] == pytest.approx([float(b) for b in ns], rel=1e-5)
    assert [float(a) for a in batched_m] == [float(b) for b in ms]


class Batched(torch.Tensor):
    """A tensor subclass: `norms` batches it (as it does a DTensor's local tensors or a GPU's)."""


def test_fetch_and_all_finite():
    cols = [
        [torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float64)],
        [torch.tensor(3.0, dtype=torch.float16), torch.tensor(math.nan)],
    ]
    rows = fetch(cols)
    assert rows[0] == [1.0, 3.0] and rows[1][0] == 2.0 and math.isnan(rows[1][1])
    assert all_finite([torch.tensor(1.0), torch.tensor(2.0)])
    assert not all_finite([torch.tensor(1.0), torch.tensor(math.inf)])


def off_set_mask_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(BIG, generator=gen) > 0.5
    xs = [torch.randn(BIG, generator=gen) for _ in range(3)]
    return keep, xs


def test_direct_gap_drift_through_the_scratch_matches_numpy_and_projects_as_usual():
    keep, xs = off_set_mask_case()
    expected_after = [x * keep for x in xs]
    bounds = [bind(co.Mask(keep), x) for x in xs]
    kind = type(bounds[0])
    assert bounds[0].traits.cheap_gap and bounds[0].traits.cheap_grad_gap
    drift, drift_max = project_measured_(kind, bounds, xs, Scratch())
    for x, expected in zip(xs, expected_after):
        assert torch.equal(x, expected)  # the projection ran exactly as it does unaudited
    _, originals = off_set_mask_case()  # the same draws again
    for x, d, m in zip(originals, drift, drift_max):
        held = np64(x)[~keep.numpy()]
        assert float(d) == pytest.approx(np.linalg.norm(held), rel=1e-5)
        assert float(m) == pytest.approx(np.abs(held).max(), rel=1e-6)
    r, n = residuals(bounds, xs)
    assert [float(v) for v in r] == [0.0] * 3
    assert [float(v) for v in n] == pytest.approx([np.linalg.norm(np64(x)) for x in xs], rel=1e-5)


def test_fixed_reads_only_its_held_entries():
    x = torch.randn(4, 3, 3)
    b = bind(co.Fixed((..., 1, 1), 0.5), x)
    assert b.gap_entries(x).shape == (4,)
    before = x.clone()
    (d,), (m,) = project_measured_(type(b), [b], [x], Scratch())
    held = np64(before)[..., 1, 1] - 0.5
    assert float(d) == pytest.approx(np.linalg.norm(held), rel=1e-6)
    assert float(m) == pytest.approx(np.abs(held).max(), rel=1e-6)
    assert torch.all(x[..., 1, 1] == 0.5)


@pytest.mark.parametrize(
    "make", [lambda: co.Tied(torch.arange(300) % 7), lambda: co.Symmetric()], ids=["tied", "symmetric"]
)
def test_drift_and_residual_of_families_without_a_gap_form(make):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(BIG, generator=gen) for _ in range(2)]
    originals = [x.clone() for x in xs]
    bounds = [bind(make(), x) for x in xs]
    kind = type(bounds[0])
    reference = [x.clone() for x in xs]
    kind.project_all_(bounds, reference)  # what the projection alone produces
    drift, drift_max = project_measured_(kind, bounds, xs, Scratch())
    for x, ref, x0, d, m in zip(xs, reference, originals, drift, drift_max):
        assert torch.equal(x, ref)
        gap = np64(x0) - np64(ref)
        assert float(d) == pytest.approx(np.linalg.norm(gap), rel=1e-5)
        assert float(m) == pytest.approx(np.abs(gap).max(), rel=1e-5)
    r, _ = residuals(bounds, xs)
    assert all(0 <= float(v) <= 1e-6 * float(x.norm()) for v, x in zip(r, xs))


def test_grad_measures_on_both_paths():
    gen = torch.Generator().manual_seed(2)
    keep = torch.rand(BIG, generator=gen) > 0.3
    gs = [torch.randn(BIG, generator=gen) for _ in range(2)]
    xs = [torch.zeros(BIG) for _ in gs]
    mask_bounds = [bind(co.Mask(keep), x) for x in xs]
    originals = [g.clone() for g in gs]
    removed, total = project_grads_measured_(type(mask_bounds[0]), mask_bounds, gs, xs, Scratch())
    for g, g0, rm, t in zip(gs, originals, removed, total):
        assert torch.equal(g, g0 * keep)
        assert float(rm) == pytest.approx(np.linalg.norm(np64(g0)[~keep.numpy()]), rel=1e-5)
        assert float(t) == pytest.approx(np.linalg.norm(np64(g0)), rel=1e-5)
    sym_bounds = [bind(co.Symmetric(), x) for x in xs]
    gs = [g0.clone() for g0 in originals]
    removed, total = project_grads_measured_(type(sym_bounds[0]), sym_bounds, gs, xs, Scratch())
    for g, g0, rm in zip(gs, originals, removed):
        a = np64(g0)
        assert float(rm) == pytest.approx(np.linalg.norm((a - a.T) / 2), rel=1e-5)
        assert torch.equal(g, g.T)


def test_scratch_views_are_reused_and_grow():
    s = Scratch()
    a = s.like(torch.empty(BIG))
    assert a is s.like(torch.empty(BIG)) and a.shape == BIG
    bigger = s.like(torch.empty(400, 400))
    assert bigger.shape == (400, 400) and s.like(torch.empty(BIG)).data_ptr() == bigger.data_ptr()
    assert s.like(torch.empty(10)) is None and s.like(torch.empty(STREAM_NUMEL)) is not None
    assert s.like(torch.empty(BIG, dtype=torch.float64)).dtype == torch.float64


def test_half_precision_parameters_do_not_read_as_nonfinite():
    w = nn.Parameter(torch.full((100_000,), 300.0, dtype=torch.float16))  # ||w|| > fp16 max
    opt = co.ConstrainedOptimizer(torch.optim.SGD([w], lr=0.0), audit_every=1)
    opt.attach(w, co.Mask(torch.arange(100_000) % 2 == 0))
    w.grad = torch.ones_like(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    (r,) = opt.audit.last
    assert r.drift == 0.0 and r.grad_blocked == pytest.approx(math.sqrt(0.5), rel=1e-4)
    assert opt.audit.summaries[r.name].nonfinite == 0


# -- measures taken without forming the gap: an L2 ball's, an intersection's ---------------------------
@pytest.mark.parametrize(
    "make, dims",
    [
        (lambda: co.MaxNorm(1.5), (1,)),  # per output row of a (300, 300) weight
        (lambda: co.NormBall(40.0), None),  # the whole tensor
        (lambda: co.MaxNorm(1e6), (1,)),  # every row inside: nothing off
    ],
    ids=["rows", "whole", "inside"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_ball_drift_and_residual_from_unit_norms_match_numpy(make, dims, dtype):
    gen = torch.Generator().manual_seed(3)
    scales = torch.rand(BIG[0], 1, generator=gen, dtype=dtype) * 0.2  # some rows in, some out
    xs = [torch.randn(BIG, generator=gen, dtype=dtype) * scales for _ in range(2)]
    originals = [x.clone() for x in xs]
    bounds = [bind(make(), x) for x in xs]
    assert bounds[0].traits.cheap_gap
    drift, drift_max = project_measured_(type(bounds[0]), bounds, xs, Scratch())
    radius = bounds[0].radius
    for x, x0, d, m in zip(xs, originals, drift, drift_max):
        a = np64(x0)
        norm = np.linalg.norm(a, axis=1, keepdims=True) if dims else np.linalg.norm(a)
        expected = a - a * np.minimum(1.0, radius / norm)  # the gap, formed in float64
        assert float(d) == pytest.approx(np.linalg.norm(expected), rel=1e-5, abs=1e-12)
        assert float(m) == pytest.approx(np.abs(expected).max(), rel=1e-5, abs=1e-12)
        assert np.allclose(np64(x), a - expected, rtol=1e-5, atol=1e-12)  # projected as usual
    residual, _ = residuals(bounds, xs)
    for x, r in zip(xs, residual):
        a = np64(x)
        norm = np.linalg.norm(a, axis=1) if dims else np.linalg.norm(a)
        assert float(r) == pytest.approx(np.linalg.norm(np.maximum(norm - radius, 0.0)), abs=1e-5 * radius)
        assert float(r) <= 4 * torch.finfo(dtype).eps * radius * math.sqrt(BIG[0])


def brute_distance_to_members(bound, x):
    """``sqrt(sum_i ||x - P_i(x)||^2)`` with every member projecting a float64 copy."""
    total = 0.0
    for member in bound.members:
        y = x.detach().double().clone()
        member_64 = member.constraint.bind(y, "w")
        member_64.project_(y)
        total += float(((x.double() - y) ** 2).sum())
    return math.sqrt(total)


def test_intersection_residual_and_removed_gradient_against_its_members():
    gen = torch.Generator().manual_seed(4)
    w = nn.Parameter(torch.randn(64, 32, 3, 3, generator=gen))
    both = co.MaxNorm(2.0) & co.Fixed((..., 1, 1), 0.0)
    bound = bind(both, w)
    # the tangent projection is the Fixed's alone, so its cheap measure serves the audit
    assert bound.traits.cheap_grad_gap and not bound.traits.exact
    g = torch.randn(w.shape, generator=gen)
    g0 = g.clone()
    removed, total = project_grads_measured_(type(bound), [bound], [g], [w.detach()], Scratch())
    assert float(removed[0]) == pytest.approx(np.linalg.norm(np64(g0)[..., 1, 1]), rel=1e-6)
    assert float(total[0]) == pytest.approx(np.linalg.norm(np64(g0)), rel=1e-6)
    assert torch.equal(g[..., 1, 1], torch.zeros(64, 32)) and torch.equal(g[..., 0, :], g0[..., 0, :])
    # off the set: the residual is the distance to each member, as brute force measures it
    x = torch.randn(w.shape, generator=gen)
    assert float(torch.linalg.vector_norm(bound.residual(x))) == pytest.approx(
        brute_distance_to_members(bound, x), rel=1e-5
    )
    # one pass lands on both sets: the centre exactly 0, every filter's norm <= 2 to rounding
    y = x.clone()
    bound.project_(y)
    rows = np.linalg.norm(np64(y).reshape(64, -1), axis=1)
    assert torch.equal(y[..., 1, 1], torch.zeros(64, 32)) and rows.max() <= 2.0 * (1 + 1e-6)
    a = np64(x).copy()
    a[..., 1, 1] = 0.0
    norm = np.linalg.norm(a.reshape(64, -1), axis=1)[:, None, None, None]
    assert np.allclose(np64(y), a * np.minimum(1.0, 2.0 / norm), rtol=1e-6, atol=1e-7)
    assert float(torch.linalg.vector_norm(bound.residual(y))) <= 1e-5


def test_symmetric_projects_a_parameter_whose_transpose_is_its_own_memory():
    base = torch.randn(5, 5)
    w = nn.Parameter(base.T)  # non-contiguous: w.T is contiguous and shares w's memory
    expected = (np64(base.T) + np64(base)) / 2
    with torch.no_grad():
        bind(co.Symmetric(), w).project_(w)
    assert torch.equal(w, w.T)
    assert np.allclose(np64(w), expected, rtol=1e-6, atol=1e-7)
