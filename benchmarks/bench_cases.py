"""Step ratios of the issue's cases against plain torch fed the same projected gradients.

Each case builds a model, a plain optimizer (A) and a `ConstrainedOptimizer` (B) from the same
start; every round gives both the same gradient (projected once, for A, by the bound's own
gradient projection) and times their steps interleaved, the order alternating. Reported: the
median of B / A per round. Timings on a shared machine are noisy: read ratios, not times.

    PYTHONPATH=. python benchmarks/bench_cases.py [case ...] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import constrained_optim as co


def linears(n=8, d=1024):
    return nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(n)])


def convs(n=8, c=256):
    return nn.Sequential(*[nn.Conv2d(c, c, 3, bias=False) for _ in range(n)])


def resnet18_convs():
    chans = [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4
    layers = [nn.Conv2d(3, 64, 7, bias=False)]
    cin = 64
    for c in chans:
        layers.append(nn.Conv2d(cin, c, 3, bias=False))
        cin = c
    return nn.Sequential(*layers)


def adam(ps):
    return torch.optim.Adam(ps, lr=1e-3, foreach=True)


def adamw(ps):
    return torch.optim.AdamW(ps, lr=1e-3, foreach=True)


def sgdm(ps):
    return torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True)


def _mask(p):
    return co.Mask(torch.rand(p.shape) > 0.5)


CASES = {
    "mask-off": (linears, adam, lambda n, p: _mask(p), 0),
    "mask-audit": (linears, adam, lambda n, p: _mask(p), 1),
    "symmetric": (linears, adam, lambda n, p: co.Symmetric(), 1),
    "fixed-centre": (convs, adam, lambda n, p: co.Fixed((..., 1, 1), 0.0), 1),
    "nm24": (linears, adam, lambda n, p: co.NMSparsity(2, 4, fixed=False), 1),
    "resnet-maxnorm-fixed": (
        resnet18_convs,
        sgdm,
        lambda n, p: (co.MaxNorm(1.0) & co.Fixed((..., 1, 1), 0.0)) if p.shape[-1] == 3 else None,
        1,
    ),
    "small-masks-off": (lambda: linears(48, 64), adamw, lambda n, p: _mask(p), 0),
    "small-masks-audit": (lambda: linears(48, 64), adamw, lambda n, p: _mask(p), 1),
    "orthogonal": (lambda: linears(1, 1024), adam, lambda n, p: co.Orthogonal(), 1),
}


def build(case):
    make_model, make_opt, constraint, audit = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    opt = co.ConstrainedOptimizer(make_opt(model.parameters()), model, audit_every=audit)
    for name, p in model.named_parameters():
        c = constraint(name, p)
        if c is not None:
            opt.attach(name, c)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()  # state exists; the parameters are on their sets
    twin = copy.deepcopy(model)
    bare = make_opt(twin.parameters())
    bare.load_state_dict(opt.optimizer.state_dict())
    return model, opt, twin, bare


def grads_for(model, opt):
    gs = []
    bounds = opt.engine.bounds
    with torch.no_grad():
        for p in model.parameters():
            g = torch.randn_like(p) * 1e-2
            b = bounds.get(p)
            if b is not None and b.traits.projects_grad:
                b.project_grad_(g, p)
            gs.append(g)
    return gs


def timed(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def ratio(case, repeats, patch=None):
    model, opt, twin, bare = build(case)
    ratios = []
    for r in range(repeats + 2):
        gs = grads_for(model, opt)
        for p, q, g in zip(model.parameters(), twin.parameters(), gs):
            p.grad, q.grad = g.clone(), g.clone()
        if r % 2:
            a = timed(bare.step)
            b = timed(opt.step)
        else:
            b = timed(opt.step)
            a = timed(bare.step)
        if r >= 2:
            ratios.append(b / a)
    return statistics.median(ratios)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for case in args.cases:
        print(f"{case:<24} {ratio(case, args.repeats):6.2f}x", flush=True)


if __name__ == "__main__":
    main()
