"""The masked optimizer step with and without the second-moment filler (`constrained_optim.filler`).

Two `ConstrainedOptimizer`s on copies of one model, the same random 50% `Mask` on every weight,
one built with the filler disabled; every round both get the same gradients and their steps are
timed interleaved (the order alternating), audit off. Reported: the median step of each and the
median of the per-round ratio filled / unfilled. Parameters are checked bitwise equal at the end.

    PYTHONPATH=. python benchmarks/bench_filler.py [--repeats 30] [--threads 1] [--layers 8] [--dim 1024]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import constrained_optim as co
from constrained_optim import filler

OPTIMIZERS = {
    "Adam(foreach)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "Adam(for-loop)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
    "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}


def build(model, make, masks, fill: bool):
    saved = filler.FILLED
    if not fill:
        filler.FILLED = {}
    try:
        return co.ConstrainedOptimizer(
            make(model.parameters()), model, {n: co.Mask(m) for n, m in masks.items()}, audit_every=0
        )
    finally:
        filler.FILLED = saved


def compare(name, make, layers, dim, repeats, warmup=3):
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(dim, dim, bias=False) for _ in range(layers)])
    masks = {n: torch.rand(p.shape) > 0.5 for n, p in base.named_parameters()}
    grads = [torch.randn(p.shape) * 1e-2 for p in base.parameters()]
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    opts = [build(models[0], make, masks, True), build(models[1], make, masks, False)]
    times: list[list[float]] = [[], []]
    for r in range(warmup + repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            for p, g in zip(models[i].parameters(), grads):
                p.grad = g.clone()
            t = time.perf_counter()
            opts[i].step()
            if r >= warmup:
                times[i].append(time.perf_counter() - t)
    same = all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    ratio = statistics.median(a / b for a, b in zip(*times))
    filled_ms, plain_ms = (1e3 * statistics.median(t) for t in times)
    print(
        f"{name:16s} filled {filled_ms:8.2f} ms   unfilled {plain_ms:8.2f} ms   "
        f"ratio {ratio:.2f}   bitwise equal: {same}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("optimizers", nargs="*", default=list(OPTIMIZERS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.layers} x Linear({args.dim}, {args.dim}), Mask 50%, {args.threads} thread(s), audit off")
    for name in args.optimizers:
        compare(name, OPTIMIZERS[name], args.layers, args.dim, args.repeats)


if __name__ == "__main__":
    main()
