"""The guarantees on a CUDA device (skipped without one): every constraint holds after every step
with CUDA's foreach and fused optimizers, resume is bitwise, and a step reads the device once
(no per-parameter host syncs)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import constrained_optim as co

from cases import CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

O = torch.optim  # noqa: E741 - as in the optimizer tests
CUDA_OPTIMIZERS = {
    "SGD-momentum-foreach": lambda p: O.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "SGD-momentum-fused": lambda p: O.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "Adam-foreach": lambda p: O.Adam(p, lr=0.05, foreach=True),
    "Adam-fused": lambda p: O.Adam(p, lr=0.05, fused=True),
    "AdamW-fused": lambda p: O.AdamW(p, lr=0.05, weight_decay=0.1, fused=True),
    "RMSprop-foreach": lambda p: O.RMSprop(p, lr=0.01, momentum=0.9, foreach=True),
}


def loss_fn(p, target):
    return ((p - target) ** 2).sum() + 0.1 * p.sin().sum() + p.sum() ** 2 / p.numel()


@pytest.mark.parametrize("opt_name", list(CUDA_OPTIMIZERS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_constraint_holds_after_every_step_on_cuda(case, opt_name):
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(case.shape, generator=gen).cuda())
    target = (torch.randn(case.shape, generator=gen) * 2).cuda()
    model = nn.Module()
    model.w = p
    opt = co.ConstrainedOptimizer(CUDA_OPTIMIZERS[opt_name]([p]), model)
    for _warm in range(2):  # a warm optimizer: state off the set before the attach
        opt.zero_grad()
        loss_fn(p, target).backward()
        opt.step()
    opt.attach("w", case.make())
    start = p.detach().clone()
    for _ in range(4):
        opt.zero_grad()
        loss_fn(p, target).backward()
        opt.step()
        x = p.detach().cpu()
        assert bool(x.isfinite().all())
        v = case.violation(x)
        limit = 0.0 if case.exact else case.rtol * max(1.0, float(x.abs().max()))
        assert v <= limit, f"violation {v}"
    assert not torch.equal(p.detach(), start)


def model_and_optimizer(seed=0, audit_every=1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8)).cuda()
    opt = co.ConstrainedOptimizer(
        O.Adam(model.parameters(), lr=0.01, fused=True),
        model,
        {
            "0.weight": co.Mask(torch.rand(32, 32, generator=torch.Generator().manual_seed(1)) > 0.5),
            "2.weight": co.Symmetric(),
            "4.weight": co.MaxNorm(0.5) & co.Fixed((..., 0), 0.0),
            "0.bias": co.NonNegative(),
            "2.bias": co.Tied(torch.arange(32) % 4),
        },
        audit_every=audit_every,
    )
    return model, opt


def train(model, opt, steps, first=0):
    for k in range(first, first + steps):
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(16, 32, generator=gen).cuda()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_resume_on_cuda_is_bitwise(tmp_path):
    full, opt_full = model_and_optimizer()
    train(full, opt_full, 10)
    half, opt_half = model_and_optimizer()
    train(half, opt_half, 5)
    torch.save({"model": half.state_dict(), "opt": opt_half.state_dict()}, tmp_path / "ckpt.pt")
    fresh, opt_fresh = model_and_optimizer(seed=3)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh.load_state_dict(saved["model"])
    opt_fresh.load_state_dict(saved["opt"])
    train(fresh, opt_fresh, 5, first=5)
    for p, q in zip(full.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    opt_fresh.check()


@pytest.mark.parametrize("audit_every", [0, 1])
def test_a_step_reads_the_device_once(audit_every):
    """Whatever the number of constrained parameters: one host read per step (the non-finite
    check or the audit's numbers), never one per parameter."""
    model, opt = model_and_optimizer(audit_every=audit_every)
    train(model, opt, 2)
    x = torch.randn(16, 32).cuda()
    opt.zero_grad()
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
