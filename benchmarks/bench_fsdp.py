"""Per-rank memory and ``opt.step()`` time of constrained FSDP2 against plain FSDP2 (CPU, gloo).

    PYTHONPATH=. python benchmarks/bench_fsdp.py [--dims 512 1024] [--worlds 2 3] [--steps 5]

A model of 8 ``nn.Linear(d, d)`` layers, each ``fully_shard``-ed (and the root), trained with Adam
for a few steps; per rank, for plain FSDP2 and for ``Mask`` and ``MaxNorm`` on every weight with
the default audit (every step):

- ``peak MiB``: the most memory in use by the process's allocator (glibc ``mallinfo2``: heap plus
  mmapped blocks) at any op boundary of a training iteration (forward, backward and
  ``opt.step()``), read after each op by a dispatch mode, counted from before the model was built
  (parameters, gradients, Adam's state, FSDP's buffers, activations, the constraints' data and
  the step's temporaries); ``extra MiB``: its excess over the plain run's peak (the constraints'
  data and the step's temporaries); ``ratio``: peak / plain peak;
- ``held MiB``: memory in use after the step, less the plain run's (what stays between steps:
  each rank's slice of the masks);
- ``step ms``: the median wall time of ``opt.step()`` (measured without the dispatch mode);
- ``coll. bytes``: bytes handed to collectives inside one ``opt.step()`` (all-reduce, gather,
  scatter and DTensor's functional collectives), and how many all-gathers.

Each world size runs in its own gloo process group on 127.0.0.1 (a free port chosen at run time).
Targets (issue #10): ratio <= 1.10, collective bytes <= 64 KiB, extra memory shrinking as 1/W.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

LAYERS = 8


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.mallinfo2.restype = _MallInfo2


def in_use() -> int:
    """Bytes the process's malloc has handed out and not taken back (heap and mmapped blocks)."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_during(fn):
    """``fn()``'s peak of `in_use` at op boundaries (read after every op, by a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    top = [in_use()]

    class Peak(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            top[0] = max(top[0], in_use())
            return out

    with Peak():
        fn()
    top[0] = max(top[0], in_use())
    return top[0]


def model(d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(LAYERS)])


def constraints(kind: str, d: int) -> dict:
    import constrained_optim as co

    if kind == "plain":
        return {}
    if kind == "Mask":
        keep = torch.rand(d, d, generator=torch.Generator().manual_seed(1)) > 0.5
        return {f"{i}.weight": co.Mask(keep) for i in range(LAYERS)}
    return {f"{i}.weight": co.MaxNorm(1.0) for i in range(LAYERS)}


def run_rank(d: int, kind: str, steps: int, rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import constrained_optim as co

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from distributed_worker import counting, gathers

    gc.collect()
    start = in_use()  # the process before this run: its memory is measured from here
    net = model(d)
    mesh = init_device_mesh("cpu", (world,))
    for layer in net:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    wanted = constraints(kind, d)
    opt = co.ConstrainedOptimizer(torch.optim.Adam(net.parameters(), lr=1e-3), net, wanted)
    del wanted  # the user's masks are the user's: what the library keeps is measured
    rows = 4
    times, peaks, held, sizes, gathered = [], [], [], [], []

    def iteration(k):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(rows * world, d, generator=g)[rank * rows : (rank + 1) * rows]
        opt.zero_grad()
        net(x).square().mean().backward()

    for k in range(steps):
        phase = k % 3
        if phase == 0:  # the time of the step alone
            iteration(k)
            start_t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start_t)
        elif phase == 1:  # the peak of a whole iteration: forward, backward and step
            peaks.append(peak_during(lambda k=k: (iteration(k), opt.step())))
            held.append(in_use())
        else:  # what the step hands to collectives
            iteration(k)
            with counting() as (calls, nbytes):
                opt.step()
            sizes.append(sum(nbytes.values()))
            gathered.append(gathers(calls))
    result = {
        "peak": max(peaks) - start,
        "held": max(held) - start,
        "ms": 1e3 * statistics.median(times),
        "bytes": max(sizes),
        "gathers": max(gathered),
    }
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, dims, steps: int) -> dict:
    out = tempfile.mkdtemp()
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank-of",
                str(world),
                "--dims",
                *map(str, dims),
                "--steps",
                str(steps),
                "--out",
                out,
            ],
            env=dict(env, RANK=str(r)),
        )
        for r in range(world)
    ]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a rank of world {world} failed")
    return {r: torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)}


def worker(world: int, dims, steps: int, out: str) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for d in dims:
        run_rank(d, "plain", 3, rank, world)  # warm-up: first-time allocations stay with the process
        for kind in ("plain", "Mask", "MaxNorm"):
            results[(d, kind)] = run_rank(d, kind, steps, rank, world)
            gc.collect()
            dist.barrier()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--rank-of", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_of is not None:
        return worker(args.rank_of, args.dims, args.steps, args.out)
    mib = 2**20
    print(f"{LAYERS} x Linear(d, d), Adam, FSDP2 on CPU/gloo; worst rank shown; torch {torch.__version__}")
    print(
        f"{'d':>5} {'W':>2} {'set':>8} {'peak MiB':>9} {'extra MiB':>9} {'x W':>6} {'ratio':>6} "
        f"{'held MiB':>8} {'step ms':>8} {'x plain':>7} {'coll. bytes':>11} {'gathers':>7}"
    )
    for world in args.worlds:
        ranks = launch(world, args.dims, args.steps)
        for d in args.dims:
            plain = {r: ranks[r][(d, "plain")] for r in ranks}
            for kind in ("plain", "Mask", "MaxNorm"):
                rows = [ranks[r][(d, kind)] for r in ranks]
                total = [row["peak"] for row in rows]
                base = [p["peak"] for p in plain.values()]
                extra = max(t - b for t, b in zip(total, base))
                ratio = max(t / b for t, b in zip(total, base))
                held = max(row["held"] - p["held"] for row, p in zip(rows, plain.values()))
                ms = max(row["ms"] for row in rows)
                plain_ms = max(p["ms"] for p in plain.values())
                print(
                    f"{d:>5} {world:>2} {kind:>8} {max(total) / mib:>9.1f} {extra / mib:>9.2f} "
                    f"{extra * world / mib:>6.2f} {ratio:>6.3f} {held / mib:>8.2f} {ms:>8.1f} "
                    f"{ms / plain_ms:>7.2f} {max(r['bytes'] for r in rows):>11} "
                    f"{max(r['gathers'] for r in rows):>7}"
                )


if __name__ == "__main__":
    main()
