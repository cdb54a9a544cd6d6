"""What the constraints cost per step, next to the wrapped optimizer's own step.

A: the bare optimizer step. B: the same step through `ConstrainedOptimizer` with the audit off
(gradient projection + post-step projection + the non-finite check). A starts from B's model and
optimizer state and sees the same gradient zeros, so the difference is the library's own work
(Adam's step itself is slower on exact zeros: ``sqrt`` of 0 takes a slow path on this CPU).
Interleaved A/B, medians.

    python benchmarks/bench_step.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import constrained_optim as co


def bare_copy(model, opt):
    """The same model and optimizer state, without the wrapper."""
    twin = copy.deepcopy(model)
    inner = torch.optim.Adam(twin.parameters(), lr=1e-3, foreach=True)
    inner.load_state_dict(opt.optimizer.state_dict())
    for p in twin.parameters():
        p.grad = torch.zeros_like(p)
    return twin, inner


def make(kind: str, constrained: bool, audit_every: int = 0):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(8)])
    inner = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    inner.step()  # state exists before timing
    if not constrained:
        return model, inner
    opt = co.ConstrainedOptimizer(inner, model, audit_every=audit_every)
    for name, p in model.named_parameters():
        if kind == "mask":
            opt.attach(name, co.Mask(torch.rand(p.shape) > 0.5))
        elif kind == "tied":
            opt.attach(name, co.Tied(torch.arange(1024) // 2))
        elif kind == "symmetric":
            opt.attach(name, co.Symmetric())
        elif kind == "fixed-columns":
            opt.attach(name, co.Fixed((..., slice(0, 64)), 0.0))
    return model, opt


def time_step(opt, model, keeps=None) -> float:
    for i, p in enumerate(model.parameters()):
        p.grad.normal_()
        if keeps is not None:  # the bare step sees the same zeros (Adam's own cost depends on them)
            p.grad.mul_(keeps[i])
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "8 x Linear(1024, 1024), Adam(foreach=True)"
    )
    print(f"{'constraint':<14} {'bare step ms':>12} {'constrained ms':>15} {'overhead':>9}")
    for kind in ("mask", "fixed-columns", "tied", "symmetric"):
        model, opt = make(kind, True)
        bare_model, bare = bare_copy(model, opt)
        keeps = [b.keep for b in opt.engine.bounds.values()] if kind == "mask" else None
        a, b = [], []
        for _ in range(args.repeats):  # interleaved so drift in machine speed hits both alike
            a.append(time_step(bare, bare_model, keeps))
            b.append(time_step(opt, model))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{kind:<14} {ma * 1e3:>12.2f} {mb * 1e3:>15.2f} {(mb - ma) / ma:>8.2f}x")


if __name__ == "__main__":
    main()
