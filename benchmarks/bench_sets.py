"""What the non-linear sets' fast paths buy, as ratios measured in one run (A and B interleaved,
medians):

- ``Box``: the grouped path (one ``torch._foreach_clamp_*`` call per side for small tensors, one
  fused clamp per large tensor) vs one clamp per tensor, and vs ``_foreach`` for every size;
- ``MaxNorm``: one ``vector_norm(keepdim=True)`` and an in-place scale vs a loop over units;
- ``Simplex``: the batched sort-based projection vs the same formula per unit;
- ``Orthogonal``: the gradient projection at the parameter it just projected (no SVD) vs at a
  point it must first project (one SVD).

    python benchmarks/bench_sets.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import constrained_optim as co
from constrained_optim.constraints.coordinate import BoxBound
from constrained_optim.constraints.norms import simplex_rows


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name, a, b, repeats):
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
    print(f"{name:<44} {ma:>9.3f} {mb:>9.3f} {mb / ma:>7.2f}x")


def bind(constraint, p):
    return constraint.bind(torch.nn.Parameter(p), "w")


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':<44} {'A ms':>9} {'B ms':>9} {'B / A':>8}")

    for count, shape in ((512, (32, 32)), (64, (256, 256))):
        xs = [torch.randn(shape) for _ in range(count)]
        bounds = [bind(co.Box(-0.5, 0.5), x.clone()) for x in xs]
        compare(
            f"Box, {count} x {shape}: grouped (A) / loop (B)",
            lambda bounds=bounds, xs=xs: BoxBound.project_all_(bounds, xs),
            lambda bounds=bounds, xs=xs: [b.project_(x) for b, x in zip(bounds, xs)],
            args.repeats,
        )
        compare(
            f"Box, {count} x {shape}: grouped (A) / two foreach (B)",
            lambda bounds=bounds, xs=xs: BoxBound.project_all_(bounds, xs),
            lambda xs=xs: (torch._foreach_clamp_min_(xs, -0.5), torch._foreach_clamp_max_(xs, 0.5)),
            args.repeats,
        )

    w = torch.randn(1024, 512, 3, 3)
    bound = bind(co.MaxNorm(1.0), w.clone())

    def loop_max_norm():
        for row in w:
            n = row.norm()
            if n > 1.0:
                row.mul_(1.0 / n)

    compare(
        "MaxNorm, (1024, 512, 3, 3): batched (A) / loop (B)",
        lambda: bound.project_(w),
        loop_max_norm,
        args.repeats,
    )

    s = torch.randn(2048, 64)
    sbound = bind(co.Simplex(), s.clone())
    compare(
        "Simplex, (2048, 64): batched (A) / per unit (B)",
        lambda: sbound.project_(s.clone()),
        lambda: [simplex_rows(row.view(1, -1), 1.0) for row in s],
        args.repeats,
    )

    p = torch.randn(512, 4608)
    obound = bind(co.Orthogonal(), p.clone())
    obound.project_(p)
    off = p + 1e-3 * torch.randn_like(p)
    g = torch.randn_like(p)
    compare(
        "Orthogonal grad, (512, 4608): on (A) / off (B)",
        lambda: obound.project_grad_(g.clone(), p),
        lambda: obound.project_grad_(g.clone(), off),
        args.repeats,
    )


if __name__ == "__main__":
    main()
