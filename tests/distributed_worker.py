"""One rank of the distributed tests (`test_distributed.py` starts 2 and 3 of them over gloo on
127.0.0.1, CPU).

``python tests/distributed_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set runs every case of `plan(world)` in one process group (starting a rank, which
imports torch, is most of the cost) and saves each case's result to ``OUT_DIR/{case}-rank{r}.pt``.
A case trains `Net` for `STEPS` Adam steps, each rank on its part of every global batch (the whole
batch under tensor parallel), checks after every step that every set holds on the global tensors
(`holds`, and ``opt.check()``), and counts the collectives each ``opt.step()`` makes. `reference`
is the same run in one process on the whole batch.

Layer sizes make the shards uneven: ``fc1`` has 5 rows (3 + 2 on two ranks, 2 + 2 + 1 on three),
``fc4`` 2 rows (one rank holds none on three).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import sys
import time

import torch
from torch import nn

STEPS = 4
GLOBAL_BATCH = 6  # divides by 2 and by 3
LATE_AFTER = 1  # a constraint attached after this step, to a warm Adam


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 5)
        self.fc2 = nn.Linear(5, 5)
        self.fc3 = nn.Linear(5, 8)
        self.fc4 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc4(torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))))


def _free(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.3


def families(name: str) -> dict:
    """Every family, by how sharded training projects it."""
    import constrained_optim as co

    if name == "elementwise":  # each rank projects its shard, no collective
        return {
            "fc1.weight": co.Mask(_free((5, 8), 1)),
            "fc1.bias": co.Fixed(slice(0, 2), 0.25),  # indexes the sharded dim: a local mask
            "fc2.weight": co.Box(
                low=-0.3 * torch.rand(5, 1, generator=torch.Generator().manual_seed(2)) - 0.05, high=0.3
            ),
            "fc2.bias": co.NonNegative(),
            "fc3.weight": co.Fixed((..., 1), 0.0),  # leaves the sharded dim alone: applied as it is
            "fc3.bias": co.Mask(_free((8,), 3)) & co.Box(-0.5, 0.5),
            "fc4.weight": co.NMSparsity(2, 4),  # the pattern chosen at attach, sharded with the rows
            "fc4.bias": co.Fixed(torch.tensor([True, False]), 0.1),
        }
    if name == "rowwise":  # units within the local rows: no collective
        return {
            "fc1.weight": co.MaxNorm(0.5),
            "fc2.weight": co.UnitNorm(),
            "fc3.weight": co.Simplex(dim=1, radius=2.0),
            "fc3.bias": co.NormBall(0.3, p=math.inf),
            "fc4.weight": co.NMSparsity(2, 4, fixed=False),
            "fc4.bias": co.Box(-0.2, 0.2),
        }
    if name == "norms":  # units across the shards: one all-reduce of squared norms
        return {
            "fc1.bias": co.NormBall(0.5),
            "fc2.weight": co.UnitNorm(dim=(0, 1)),
            "fc3.weight": co.MaxNorm(0.6, dim=0),
            "fc4.weight": co.NormBall(0.4),
        }
    if name == "global":  # gathered to an owner, projected once, scattered
        return {
            "fc1.weight": co.Mask(_free((5, 8), 4)) & co.MaxNorm(0.5),
            "fc1.bias": co.Subspace(
                torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(5)))[0].T
            ),
            "fc2.bias": co.Projection(lambda x: x.clamp_(-0.1, 0.1), name="clamp"),
            "fc3.weight": co.Orthogonal(),
            "fc3.bias": co.Affine(torch.eye(8)[:3], torch.full((8,), 0.05)),
            "fc4.weight": co.Tied(torch.tensor([0, 1, 1, 0, 2, 2, 3, 3])),
            "fc4.bias": co.Invariant([lambda x: x, lambda x: x.flip(0)]),
        }
    if name == "global2":
        return {
            "fc1.weight": co.LowRank(2),
            "fc2.weight": co.Invariant.rotations(),
            "fc3.bias": co.Mask(_free((8,), 6)) & co.NormBall(0.5),
        }
    if name == "mixed":  # one of each path, for checkpoints
        return {
            "fc1.weight": co.Mask(_free((5, 8), 7)),
            "fc1.bias": co.NormBall(0.5),
            "fc3.weight": co.MaxNorm(0.6, dim=0),
            "fc4.weight": co.NMSparsity(2, 4),
            "fc4.bias": co.Fixed(slice(0, 1), 0.1),
        }
    if name == "tp":  # fc1 column-parallel (Shard(0)), fc2 row-parallel (Shard(1))
        return {
            "fc1.weight": co.UnitNorm(),
            "fc1.bias": co.Box(-0.2, 0.2),
            "fc2.weight": co.MaxNorm(0.5),
            "fc2.bias": co.NonNegative(),
            "fc3.weight": co.Mask(_free((8, 5), 8)) & co.MaxNorm(0.7),
        }
    raise KeyError(name)


def late(name: str) -> dict:
    import constrained_optim as co

    return {"fc2.weight": co.Symmetric()} if name == "global" else {}


def holds(constraints: dict, params: dict[str, torch.Tensor]) -> None:
    """Each set on the global tensors, from a fresh one-process bound: on the set to a few eps."""
    for name, c in constraints.items():
        x = params[name].detach().float()
        bound = c.bind(torch.nn.Parameter(x.clone()), name)
        off = float(torch.linalg.vector_norm(bound.residual(x.clone())))
        scale = max(1.0, float(torch.linalg.vector_norm(x)))
        assert off <= 1e-5 * scale, f"{name}: {c!r} off its set by {off:.3g}"


def batch(k: int):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 2, generator=g)


def initial_model() -> Net:
    torch.manual_seed(0)
    return Net()


def reference(name: str, steps: int = STEPS) -> tuple[dict, list]:
    """One process, the whole global batch each step."""
    import constrained_optim as co

    model = initial_model()
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model, families(name))
    for k in range(steps):
        x, y = batch(k)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if k == LATE_AFTER:
            for target, c in late(name).items():
                opt.attach(target, c)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, [
        r.to_dict() for r in opt.audit.history
    ]


# -- counting collectives ------------------------------------------------------------------------------
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "gather",
    "scatter",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
    "all_to_all",
    "reduce",
)


@contextlib.contextmanager
def counting():
    """Collectives made inside the block: ``torch.distributed``'s functions (calls and tensor bytes)
    and DTensor's functional collectives (seen by a dispatch mode)."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: collections.Counter = collections.Counter()
    sizes: collections.Counter = collections.Counter()
    saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor):
                sizes[name] += t.numel() * t.element_size()
            return fn(*args, **kwargs)

        return counted

    class Functional(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "_c10d_functional" in name and "wait" not in name:  # DTensor's, not the functions above
                calls[name] += 1
                t = args[0] if args else None
                if isinstance(t, torch.Tensor):
                    sizes[name] += t.numel() * t.element_size()
            return func(*args, **(kwargs or {}))

    for n, fn in saved.items():
        setattr(dist, n, wrap(n, fn))
    try:
        with Functional():
            yield calls, sizes
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


def gathers(calls) -> int:
    return sum(v for k, v in calls.items() if "gather" in k)


# -- one run --------------------------------------------------------------------------------------------
def build(world: int, kind: str, reshard: bool = True, bf16: bool = False):
    """The model as ``kind`` lays it out: ``fsdp`` (every layer and the root ``fully_shard``),
    ``tp`` (fc1 column-, fc2 row-parallel) or ``ddp``."""
    model = initial_model()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return model, DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    if kind == "tp":
        # tensor-parallel placements on DTensor parameters (fc2's Shard(1) is a row-parallel
        # layer's, with 5 columns: uneven); the forward uses the whole tensors
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from torch.func import functional_call

        spec = {"fc1.weight": Shard(0), "fc1.bias": Shard(0), "fc2.weight": Shard(1)}
        for name, p in list(model.named_parameters()):
            owner, attr = name.rsplit(".", 1)
            setattr(
                model.get_submodule(owner),
                attr,
                nn.Parameter(distribute_tensor(p.detach(), mesh, [spec.get(name, Replicate())])),
            )

        def net(x):
            return functional_call(model, {n: p.full_tensor() for n, p in model.named_parameters()}, (x,))

        return model, net
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for layer in (model.fc1, model.fc2, model.fc3, model.fc4):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    return model, fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)


def whole(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def local_batch(k: int, rank: int, world: int, kind: str):
    x, y = batch(k)
    if kind == "tp":
        return x, y
    rows = GLOBAL_BATCH // world
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


def train(case: dict, rank: int, world: int, steps=range(STEPS), model=None, net=None, opt=None) -> dict:
    import constrained_optim as co
    from constrained_optim import sharding

    name, kind = case["family"], case.get("kind", "fsdp")
    sharding.force_gather = case.get("gather", False)
    try:
        if model is None:
            model, net = build(world, kind, case.get("reshard", True), case.get("bf16", False))
            opt = co.ConstrainedOptimizer(
                torch.optim.Adam(model.parameters(), lr=0.05), model, families(name)
            )
        counts = []
        for k in steps:
            x, y = local_batch(k, rank, world, kind)
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            with counting() as (calls, sizes):
                opt.step()
            counts.append((dict(calls), dict(sizes)))
            if k == LATE_AFTER:
                for target, c in late(name).items():
                    opt.attach(target, c)
            now = whole(model)
            holds({**families(name), **(late(name) if k >= LATE_AFTER else {})}, now)
            opt.check()
    finally:
        sharding.force_gather = False
    return {
        "params": whole(model),
        "audit": [r.to_dict() for r in opt.audit.history],
        "counts": counts,
        "local_shapes": {
            n: tuple((p.to_local() if hasattr(p, "to_local") else p).shape)
            for n, p in model.named_parameters()
        },
        "steps_taken": opt.steps_taken,
        "model": model,
        "net": net,
        "opt": opt,
    }


def plan(world: int) -> dict[str, dict]:
    """The cases a world size runs: every family on both; ``reshard_after_forward=False``, bf16
    and DDP on two ranks only (three processes share the same cores: the slower run)."""
    cases = {}
    for family in ("elementwise", "rowwise", "norms", "global", "global2"):
        cases[f"{family}"] = {"family": family}
        if world == 2:
            cases[f"{family}-keep"] = {"family": family, "reshard": False}
    for family in ("elementwise", "rowwise"):
        cases[f"{family}-gather"] = {"family": family, "gather": True}
    if world == 2:
        for family in ("rowwise", "global"):
            cases[f"{family}-bf16"] = {"family": family, "bf16": True}
        cases["ddp"] = {"family": "global", "kind": "ddp"}
    cases["tp"] = {"family": "tp", "kind": "tp"}
    return cases


# -- distributed checkpoints -------------------------------------------------------------------------
def make_opt(model, handle: bool):
    import constrained_optim as co

    adam = torch.optim.Adam(model.parameters(), lr=0.05)
    if handle:
        return adam, co.constrain(adam, model, families("mixed"))
    opt = co.ConstrainedOptimizer(adam, model, families("mixed"))
    return opt, opt


def dcp_save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    return osd


def dcp_load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def resume_run(rank, world, path, handle: bool, save_at: int | None, load: bool, steps=range(STEPS)):
    """Train ``steps`` (from a loaded checkpoint if ``load``), saving after step ``save_at``."""
    model, net = build(world, "fsdp")
    opt, holder = make_opt(model, handle)
    if load:
        dcp_load(model, opt, path)
    saved = None
    for k in steps:
        x, y = local_batch(k, rank, world, "fsdp")
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        holds(families("mixed"), whole(model))
        if k == save_at:
            saved = dcp_save(model, opt, path)
    holder.check()
    keys = sorted(k for entry in saved["state"].values() for k in entry) if saved is not None else []
    return {
        "params": whole(model),
        "audit": [r.to_dict() for r in holder.audit.history],
        "steps_taken": holder.steps_taken,
        "keys": keys,
        "state": {
            k: {n: (v.full_tensor() if hasattr(v, "full_tensor") else v) for n, v in s.items()}
            for k, s in opt.state_dict()["state"].items()
        }
        if not handle
        else None,
    }


def checkpoints(rank, world, out_dir) -> dict:
    """Same world size: a resumed run equals the uninterrupted one bitwise. Another world size:
    this run's checkpoint is loaded by the other test process's ranks (and theirs by ours)."""
    out = {}
    for handle in (False, True):
        tag = "handle" if handle else "wrapper"
        path = os.path.join(out_dir, f"ckpt-{tag}-w{world}")
        out[f"{tag}-whole"] = resume_run(rank, world, None, handle, None, False)
        out[f"{tag}-first"] = resume_run(rank, world, path, handle, 1, False, range(2))
        out[f"{tag}-resumed"] = resume_run(rank, world, path, handle, None, True, range(2, STEPS))
    if rank == 0:
        open(os.path.join(out_dir, f"ckpt-done-w{world}"), "w").close()
    other = 3 if world == 2 else 2
    marker = os.path.join(out_dir, f"ckpt-done-w{other}")
    deadline = time.monotonic() + float(os.environ.get("OTHER_WORLD_WAIT", "150"))
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    if os.path.exists(marker):
        for handle in (False, True):
            tag = "handle" if handle else "wrapper"
            path = os.path.join(out_dir, f"ckpt-{tag}-w{other}")
            out[f"{tag}-from-w{other}"] = resume_run(rank, world, path, handle, None, True, range(2, STEPS))
    return out


def lonely_call(rank) -> dict:
    """``check()`` on rank 0 only fails with a clear error instead of hanging."""
    import constrained_optim as co

    model, _ = build(2, "fsdp")
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model, families("rowwise"))
    if rank != 0:
        time.sleep(float(os.environ["CONSTRAINED_OPTIM_BARRIER_TIMEOUT"]) + 2)
        return {}
    started = time.monotonic()
    try:
        opt.check()
    except RuntimeError as err:
        return {"error": str(err), "seconds": time.monotonic() - started}
    return {"error": None}


def main(out_dir: str) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    only = os.environ.get("CASES")
    for name, case in plan(world).items():
        if only and name not in only.split(","):
            continue
        result = train(case, rank, world)
        for k in ("model", "net", "opt"):
            result.pop(k)
        torch.save(result, os.path.join(out_dir, f"{name}-w{world}-rank{rank}.pt"))
    torch.save(
        checkpoints(rank, world, out_dir), os.path.join(out_dir, f"checkpoints-w{world}-rank{rank}.pt")
    )
    if world == 2:
        torch.save(lonely_call(rank), os.path.join(out_dir, f"lonely-w{world}-rank{rank}.pt"))
        sys.stdout.flush()
        os._exit(0)  # the process group is left inconsistent on purpose: no teardown
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1])
