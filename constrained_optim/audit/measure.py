"""Measuring a step on the real tensors, with one host sync per audited step.

The primitives the watchers (`constrained_optim.audit.watch`) measure with: batched norms that
stay 0-d tensors on their device (`norms`), one device-to-host copy per device for a whole step
(`fetch`), and a reusable scratch buffer for parameter-sized temporaries on a CPU (`Scratch`).
(On a CPU, where reading a value stalls nothing, a gap's largest entry is looked at before its
norm: an exactly-zero gap then needs no second pass.) Nothing here writes to a parameter, a
gradient or optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..constraints.base import GapSize

# tensors are reduced by one foreach kernel per batch of about this many bytes, except that on a
# CPU a tensor of at least STREAM_NUMEL entries is reduced on its own, as it comes, while it is in
# cache (its gap through the reused `Scratch`); smaller ones cost more in per-call overhead than in
# memory traffic, which one foreach call per batch saves
BATCH_BYTES = 256 * 2**20
STREAM_NUMEL = 1 << 14
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Scratch:
    """A reusable buffer for the audit's parameter-sized temporaries on a CPU.

    A fresh tensor of more than glibc's mmap threshold every audited step is returned to the OS
    when freed and page-faulted back in on the next, which can cost more than the arithmetic it
    holds. One flat buffer per dtype, as large as the largest tensor asked for, serves every gap
    in turn: each is reduced before the next is written, which `norms` guarantees on a CPU for
    tensors of at least `STREAM_NUMEL` entries (smaller ones may wait in a batch, and come from the
    allocator's free lists cheaply). Accelerators' caching allocators already reuse memory, and
    tensor subclasses (DTensor) need their own outputs. For all of those ``like`` returns None and
    the gap is allocated as usual.
    """

    def __init__(self):
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}

    def like(self, t: torch.Tensor) -> torch.Tensor | None:
        if t.numel() < STREAM_NUMEL or t.device.type != "cpu" or type(t) not in _PLAIN:
            return None
        key = (t.dtype, t.shape)
        view = self._views.get(key)
        if view is None:
            buf = self._buffers.get(t.dtype)
            if buf is None or buf.numel() < t.numel():
                buf = self._buffers[t.dtype] = torch.empty(t.numel(), dtype=t.dtype)
                self._views = {k: v for k, v in self._views.items() if k[0] != t.dtype}
            view = self._views[key] = buf[: t.numel()].view(t.shape)
        return view


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _norm(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        # BLAS's dot is about 2.5x faster than vector_norm on a CPU, and no less accurate
        # (relative error 1.5e-6 against 9.6e-6 over 1M float32 normals); both overflow alike
        flat = t.view(-1)
        return torch.dot(flat, flat).sqrt()
    # half precision norms overflow at 65504; accumulate and return float32
    return torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in _LOW_PRECISION else None)


def _abs_max(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":  # aminmax is one fast pass; the inf-norm is several times slower here
        lo, hi = torch.aminmax(t)
        return torch.maximum(hi, -lo)
    return torch.linalg.vector_norm(t, math.inf)


def norms(tensors: Iterable[torch.Tensor | GapSize], with_max: bool = False):
    """``(||t|| for each t, max|t| for each t)`` as 0-d tensors on each tensor's device, no sync
    (a `GapSize` among ``tensors`` is taken as it is).

    ``tensors`` may be a generator of temporaries: they are reduced and released as they come,
    so the memory alive at once stays small. On a CPU a tensor of at least `STREAM_NUMEL` entries
    is reduced on its own, while it is still in cache (and before the next gap is written into a
    shared `Scratch`); the rest go in batches (one foreach kernel per batch of up to
    `BATCH_BYTES`, which saves launches on an accelerator and Python calls everywhere). ``max`` is
    an empty list unless ``with_max``.
    """
    ns: list[torch.Tensor] = []
    ms: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal batch, size
        if not batch:
            return
        low = batch[0].dtype in _LOW_PRECISION
        ns.extend(torch._foreach_norm(batch, 2, dtype=torch.float32 if low else None))
        if with_max:
            if batch[0].device.type == "cpu":  # torch's CPU inf-norm is 6-12x slower than aminmax
                ms.extend(_abs_max(t) for t in batch)
            else:
                ms.extend(torch._foreach_norm(batch, math.inf))
        batch, size = [], 0

    for t in tensors:
        if isinstance(t, GapSize):  # measured by its family without forming the gap
            flush()
            ns.append(t.norm)
            if with_max:
                ms.append(t.max)
            continue
        if t.numel() == 0:
            flush()
            ns.append(t.new_zeros((), dtype=torch.float32))
            if with_max:
                ms.append(t.new_zeros(()))
            continue
        if t.device.type == "cpu" and t.numel() >= STREAM_NUMEL and type(t) in _PLAIN:
            flush()
            if with_max:
                m = _abs_max(t)
                ms.append(m)
                # on a CPU a look at the max costs no device sync; a gap that is exactly zero
                # (the usual case for linear sets) then needs no second pass for its norm
                ns.append(torch.zeros((), dtype=torch.float32) if m == 0 else _norm(t))
            else:
                ns.append(_norm(t))
            continue
        if batch and (t.device != batch[0].device or t.dtype != batch[0].dtype):
            flush()
        batch.append(t)
        size += t.numel() * t.element_size()
        if size >= BATCH_BYTES:
            flush()
    flush()
    return ns, ms


def fetch(columns: list[list[torch.Tensor]]) -> list[list[float]]:
    """Rows of Python floats from columns of per-parameter 0-d tensors: one stacked tensor and one
    device-to-host copy per device (no per-value ``.item()``)."""
    columns = [[_local(t) for t in col] for col in columns]
    n = len(columns[0])
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(columns[0]):
        by_device.setdefault(t.device, []).append(i)
    rows: list = [None] * n
    for index in by_device.values():
        block = torch.stack([torch.stack([col[i].float() for i in index]) for col in columns], 1)
        for i, row in zip(index, block.tolist()):
            rows[i] = row
    return rows


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding the value: a DTensor's norm is made whole (a collective every rank
    takes in the same order, since every rank runs the same step)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_finite(values: list[torch.Tensor]) -> bool:
    """Whether every 0-d tensor is finite: one reduction and one sync per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for v in map(_local, values):
        by_device.setdefault(v.device, []).append(v)
    return all(bool(torch.stack([v.float() for v in vs]).isfinite().all()) for vs in by_device.values())
