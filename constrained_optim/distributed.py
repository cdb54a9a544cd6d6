"""Sharded parameters (FSDP2's ``fully_shard``, tensor parallel): constraints on the global tensor.

A DTensor parameter's ``shape`` is its global shape, and a `Bound` is built for that shape. Sets
such as `Symmetric`, `Tied` or `Subspace` couple entries that live on different ranks, so the
rule here is the simple correct one: gather the full tensor on every rank, project it there
(every rank computes the same result from the same data), and write back this rank's shard.
This applies to parameters, their gradients and their optimizer state, and it is the only place
that knows about DTensors: the engine hands it plain tensors and gets plain tensors back.

Plain tensors (single process, DDP's replicated parameters) pass through untouched and at no
cost. For sharded ones the price is an all-gather of each constrained parameter (and of its
gradient) per step, and its full size in memory on every rank while it is projected. Gathering
is a collective: every rank must make the same calls in the same order, which it does when every
rank attaches the same constraints in the same order.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch


def dtensor_type():
    """The DTensor class if ``torch.distributed.tensor`` has been imported, else None (then no
    tensor can be a DTensor, and nothing here imports it)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


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


class FullView:
    """Plain full-tensor stand-ins for the sharded parameters of a binding.

    Each sharded parameter gets one persistent stand-in (so measures keyed by bound stay keyed
    the same across calls). ``gathered(groups, ...)`` hands back the groups with stand-ins
    holding the gathered parameters (and gradients) in place of the sharded ones; on exit the
    projected parameters and/or gradients are written back as shards and the stand-ins let go
    of the full tensors, so between steps they hold no memory. The engine's own groups are
    never changed.
    """

    def __init__(self, params):
        self.sharded = [p for p in params if is_sharded(p)]
        self.stand_ins = {p: torch.empty(0, dtype=p.dtype, device=local(p).device) for p in self.sharded}

    def __bool__(self) -> bool:
        return bool(self.sharded)

    @contextmanager
    def gathered(self, groups, grads: bool = False, params_back: bool = False, grads_back: bool = False):
        if not self.sharded:
            yield groups
            return
        with torch.no_grad():
            for p, s in self.stand_ins.items():
                s.set_(p.full_tensor())
                s.grad = p.grad.full_tensor() if grads and p.grad is not None else None
        try:
            yield [g.with_params([self.stand_ins.get(p, p) for p in g.params]) for g in groups]
        finally:
            self._write_back(params_back, grads_back)

    @torch.no_grad()
    def _write_back(self, params_back: bool, grads_back: bool) -> None:
        for p, s in self.stand_ins.items():
            if params_back:
                write_back_(p, s)
            if grads_back and s.grad is not None:
                write_back_(p.grad, s.grad)
            s.grad = None
            s.set_()
