"""One rank of the distributed tests (`test_distributed.py` starts two over gloo on 127.0.0.1).

``python tests/distributed_worker.py ddp,fsdp OUT_DIR`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. Each rank trains the same model on its half of every
global batch, checks after every step that the constraints hold on the global tensors, and saves
its final parameters and audit to ``OUT_DIR/{kind}-rank{r}.pt``. `train_reference` is the same run in one
process on the whole batch.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

STEPS = 5
GLOBAL_BATCH = 8
FREE = torch.tensor([[True, False, True, True, False, True]] * 2
                    + [[False, True, True, False, True, True]] * 3)
LABELS = torch.tensor([0, 1, 1, 0, 2])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)  # 5 rows: shards of 3 and 2 on two ranks
        self.fc2 = nn.Linear(5, 5)
        self.fc3 = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def constraints():
    import constrained_optim as co

    return {
        "fc1.weight": co.Mask(FREE),
        "fc3.weight": co.Tied(LABELS),  # labels along the unsharded trailing dim
        "fc3.bias": co.Fixed(slice(0, 2), 0.25),
    }


LATE_AFTER = 1  # fc2.weight is constrained after this step, with Adam's state already warm


def attach_late(opt) -> None:
    import constrained_optim as co

    opt.attach("fc2.weight", co.Symmetric())  # couples rows that live on different ranks


def holds(params: dict[str, torch.Tensor], late: bool = True) -> None:
    """The sets, written from their definitions, on full (global) tensors."""
    w1, w2, w3, b3 = params["fc1.weight"], params["fc2.weight"], params["fc3.weight"], params["fc3.bias"]
    assert bool((w1[~FREE] == 0).all()), "Mask"
    assert not late or torch.equal(w2, w2.T), "Symmetric"
    for label in LABELS.unique():
        cols = w3[:, LABELS == label]
        assert torch.equal(cols, cols[:, :1].expand_as(cols)), "Tied"
    assert bool((b3[:2] == 0.25).all()), "Fixed"


def batch(k: int):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)


def make(model):
    import constrained_optim as co

    return co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model, constraints())


def initial_model() -> Net:
    torch.manual_seed(0)
    return Net()


def train_reference() -> tuple[dict[str, torch.Tensor], list]:
    """One process, the whole global batch each step."""
    model = initial_model()
    opt = make(model)
    for k in range(STEPS):
        x, y = batch(k)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if k == LATE_AFTER:
            attach_late(opt)
        holds(dict(model.named_parameters()), late=k >= LATE_AFTER)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.audit.history


def main(kinds: list[str], out_dir: str) -> None:
    """Each of ``kinds`` (``ddp``, ``fsdp``) in turn, in one process group (one start-up)."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for kind in kinds:
            torch.save(train_rank(kind, rank, world), os.path.join(out_dir, f"{kind}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def train_rank(kind: str, rank: int, world: int) -> dict:
    model = initial_model()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.fc1, model.fc2, model.fc3):
            fully_shard(layer, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
        assert type(model.fc2.weight).__name__ == "DTensor"
    opt = make(model)
    rows = GLOBAL_BATCH // world
    for k in range(STEPS):
        x, y = batch(k)
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        if k == LATE_AFTER:
            attach_late(opt)  # projects the sharded Adam state too
        full = {n: (p.full_tensor() if kind == "fsdp" else p).detach() for n, p in model.named_parameters()}
        holds(full, late=k >= LATE_AFTER)  # on this rank, after every step
        opt.check()
    return {
        "params": {n: t.clone() for n, t in full.items()},
        "local_shapes": {n: tuple((p.to_local() if kind == "fsdp" else p).shape)
                         for n, p in model.named_parameters()},
        "audit": [r.to_dict() for r in opt.audit.history],
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1].split(","), sys.argv[2])
