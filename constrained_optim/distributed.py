"""DTensor primitives: a sharded tensor's whole (gathered), its local part, and writing a whole
back as shards.

A DTensor parameter's ``shape`` is its global shape, and a `Bound` is built for that shape at
attach, where the parameter and its optimizer state are gathered once (`full`) and written back
as this rank's shards (`local_part`). How each step projects a sharded parameter (its own shard,
norms summed across ranks, or gathered to one owner) is `sharding`'s. Plain tensors (single
process, DDP's replicated parameters) pass through untouched and at no cost. Gathering is a
collective: every rank must make the same calls in the same order, which it does when every rank
attaches the same constraints in the same order.
"""

from __future__ import annotations

import sys
from types import FrameType

import torch


def dtensor_type():
    """The DTensor class if ``torch.distributed.tensor`` has been imported, else None (then no
    tensor can be a DTensor, and nothing here imports it)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def called_from(
    function: str, module: str = "torch.distributed.checkpoint.state_dict", depth: int = 24
) -> bool:
    """Whether ``module.function`` is among the ``depth`` innermost callers: how torch's
    distributed checkpointing is told apart when it calls into an optimizer (its lr=0
    initialisation step, its ``state_dict`` call), since it passes nothing that says so."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == function and frame.f_globals.get("__name__") == module:
            return True
        frame = frame.f_back
    return False


def is_sharded(t) -> bool:
    kind = dtensor_type()
    return kind is not None and isinstance(t, kind)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor as a plain tensor on every rank (``t`` itself when it is plain)."""
    if not is_sharded(t):
        return t
    with torch.no_grad():
        return t.full_tensor()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``, sharing its storage (``t`` itself when it is plain)."""
    if not is_sharded(t):
        return t
    with torch.no_grad():
        return t.to_local()


@torch.no_grad()
def write_back_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the full tensor ``src`` into ``dst``: for a DTensor, this rank's shard of it."""
    if dst is src:
        return
    if is_sharded(dst):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds src already and slices its own shard, no traffic
        shard = distribute_tensor(src, dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(shard.to_local())
    else:
        dst.copy_(src)


def local_part(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The plain tensor to store into ``local(dst)``: ``src`` itself, or for a sharded ``dst`` the
    slice of the full ``src`` that is this rank's shard (no traffic: every rank holds ``src``)."""
    if not is_sharded(dst):
        return src
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(src, dst.device_mesh, dst.placements, src_data_rank=None).to_local()
