"""What auditing every step costs, as a share of the wrapped optimizer's own step.

Model: 8 x Linear(1024, 1024), a random half-free `Mask` on every weight, Adam(foreach=True).
Three optimizers from the same start, stepped in turn (interleaved, the order rotating every
round so drift in machine speed and cache state hit all alike):

- bare:   the plain Adam step, on gradients with the same zeros the mask leaves (Adam's own cost
          depends on them: ``sqrt`` of 0 takes a slow path on some CPUs);
- off:    ``ConstrainedOptimizer(audit_every=0)`` (projections + the per-step non-finite check);
- every:  ``ConstrainedOptimizer(audit_every=1)`` (the same, plus drift, residual, grad_blocked
          and one host sync per step).

Reported: the medians, and the audit's cost ``(every - off) / bare``, once from the medians and
once as the median of the per-round differences, in wall-clock time and (on a CPU) in process
CPU time, which other load on a shared machine disturbs less. Target: at most 0.15.

    python benchmarks/bench_audit.py [--repeats 40] [--threads N] [--device cpu]

On a machine whose cores other work also uses, pass ``--threads 1``: torch's thread pool waits
on its slowest thread, which can make every op several times slower than on one thread.

Where the time goes (one thread, a 1024 x 1024 float32 tensor): each audited quantity of a
`Mask` needs one pass that reads the tensor and writes ``x * (1 - keep)`` (the uint8 keep is first
converted into the reused scratch buffer) and one reduction of it; three such passes (gradient,
drift, residual) plus the gradient's own norm come to about 1.3 ms per tensor. Fewer passes
would need a fused masked reduction, which torch does not offer, or a float copy of every mask.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import constrained_optim as co


def make(audit_every: int | None, device: str):
    """``audit_every=None``: the bare optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(8)]).to(device)
    masks = [torch.rand(p.shape) > 0.5 for p in model.parameters()]
    inner = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    opt = inner
    if audit_every is not None:
        opt = co.ConstrainedOptimizer(inner, model, audit_every=audit_every)
        for (name, _), mask in zip(model.named_parameters(), masks):
            opt.attach(name, co.Mask(mask))
    keeps = [m.to(device=device, dtype=torch.float32) for m in masks]
    return model, opt, keeps


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(model, opt, keeps, masked: bool, device: str) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads, system time included) of one step."""
    for p, keep in zip(model.parameters(), keeps):
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.normal_()
        if masked:
            p.grad.mul_(keep)
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    opt.step()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def report(times: dict[str, list[float]], clock: str) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(e - o for e, o in zip(times["every"], times["off"]))
    print(f"  {clock}:")
    for k, label in (("bare", "bare Adam step"), ("off", "audit_every=0"), ("every", "audit_every=1")):
        print(f"    {label:<16} {med[k] * 1e3:8.2f} ms")
    print(f"    constraint work (off - bare) / bare: {(med['off'] - med['bare']) / med['bare']:6.3f}x")
    print(
        f"    audit cost (every - off) / bare:     {(med['every'] - med['off']) / med['bare']:6.3f}x"
        f"   (median of paired rounds: {paired / med['bare']:.3f}x; target <= 0.15x)"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {"bare": make(None, args.device), "off": make(0, args.device), "every": make(1, args.device)}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(args.warmup + args.repeats):
        order = names[i % 3 :] + names[: i % 3]
        for name in order:
            model, opt, keeps = variants[name]
            w, c = time_step(model, opt, keeps, masked=name == "bare", device=args.device)
            if i >= args.warmup:
                wall[name].append(w)
                cpu[name].append(c)
    # the audit really ran, and measured what it should: nothing drifts under a Mask with Adam
    audit = variants["every"][1].audit
    assert len(audit.last) == 8 and all(r.drift == 0.0 and r.residual == 0.0 for r in audit.last)
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
        f"8 x Linear(1024, 1024), Mask on every weight, Adam(foreach=True); "
        f"{args.repeats} interleaved rounds, medians"
    )
    report(wall, "wall clock")
    if args.device == "cpu":
        report(cpu, "CPU time (all threads; steadier on a shared machine)")


if __name__ == "__main__":
    main()
