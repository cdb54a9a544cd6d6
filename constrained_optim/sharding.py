"""Sharded parameters (FSDP2's ``fully_shard``, tensor parallel): each set projected where its maths
lives, decided once per parameter at attach from the bound's `Traits` and the parameter's
placements.

A DTensor parameter's ``shape`` is global and a `Bound` is built for it (attach gathers the
parameter once to bind and to project it and its optimizer state). `shard_bound` then picks how
the step projects it, and keeps only what that needs:

- **local** (`LocalShardBound`): element-wise sets (``traits.reduces == ()``: `Mask`, `Fixed`,
  `Box`, `NonNegative`, a fixed `NMSparsity` pattern, intersections of these) and row-wise sets
  whose units do not span a sharded dim (`MaxNorm`/`UnitNorm` per output unit on a dim-0 shard,
  `Simplex` and the L1 ball along an unsharded dim, a re-selected `NMSparsity` along one) are
  bound again to this rank's part of the tensor: masks, bounds and held positions are sliced to
  the local rows, and the global data is let go. The step projects the local shard in place,
  with no communication, bitwise as the global projection would;
- **norms** (`NormShardBound`): L2 balls and spheres (``traits.via_norms``) whose units span the
  sharded dim (`MaxNorm` on a ``Shard(1)`` row-parallel weight, a whole-tensor `NormBall`): each
  rank sums its part of every unit's squared norm, one all-reduce per step carries the sums of
  all such parameters of a mesh, and each rank scales its shard;
- **gather**: everything else (`Orthogonal`, `LowRank`, `Symmetric`, `Tied`, `Invariant`,
  `Subspace`, `Affine`, `Projection`, intersections that are not element-wise, and any set on a
  placement other than ``Shard``/``Replicate`` on one mesh dim): the bound keeps its global data;
  each step the parameter (and, for sets that project gradients, the gradient; the parameter too
  where the tangent space depends on it) is gathered to one owner rank, chosen round-robin, which
  projects it once and scatters the shards back, so ranks cannot disagree and only one of them
  pays for an SVD. Parameters sharded over several mesh dims are gathered on every rank and
  projected everywhere instead.

The engine never sees a DTensor: `ShardPlan` hands it plain-tensor groups (local shards, or on
the owner the gathered whole) for its one gradient projection and its one parameter projection,
and reduces the audit's partial sums and maxima across ranks as one vector, so every rank sees the
same numbers and raises together.

Collectives: the step (for gathered and norm sets, and the audit's one all-reduce), `attach`,
`project_`, `check`, `project_module_` and a `load_state_dict` or cast that rebinds. Every rank
must make them in the same order, which it does when every rank attaches the same constraints in
the same order. Under gloo, `attach`, `project_` and `check` start with a monitored barrier, so a
call made on one rank only fails after `barrier_timeout` seconds naming the missing ranks instead
of hanging (``CONSTRAINED_OPTIM_BARRIER_TIMEOUT``, default 300). The step has no barrier (its cost
would be paid every step).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .binding import Binding, Group
from .constraints.base import Bound, LowPrecisionBound
from .constraints.composite import IntersectionBound
from .constraints.coordinate import FixedBound
from .constraints.norms import L2BallBound, UnitNormBound
from .distributed import full, is_sharded, local, write_back_


def barrier_timeout() -> float:
    """Seconds a monitored barrier waits for every rank (``CONSTRAINED_OPTIM_BARRIER_TIMEOUT``)."""
    return float(os.environ.get("CONSTRAINED_OPTIM_BARRIER_TIMEOUT", "300"))


def _dist():
    import torch.distributed as dist

    return dist


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(what: str) -> None:
    """Under gloo, a monitored barrier before the collective ``what``: a call made on some ranks
    only fails with a clear error after `barrier_timeout` seconds instead of hanging."""
    dist = _dist()
    if world()[1] < 2 or "gloo" not in str(dist.get_backend()):
        return
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=barrier_timeout()), wait_all_ranks=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"{what} is a collective when constrained parameters are sharded: every rank must call "
            f"it, in the same order ({err})"
        ) from None


# -- where a shard lies ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where this rank's part of a DTensor lies in the global tensor."""

    mesh: Any  # a DeviceMesh
    placements: tuple
    shape: tuple[int, ...]  # global
    local_shape: tuple[int, ...]
    offset: tuple[int, ...]
    sharded: tuple[tuple[int, int], ...]  # (tensor dim, mesh dim) for each Shard placement
    plain: bool  # every placement is Shard or Replicate

    @property
    def dims(self) -> frozenset[int]:
        return frozenset(d for d, _ in self.sharded)

    @property
    def mesh_dims(self) -> frozenset[int]:
        return frozenset(m for _, m in self.sharded)

    def contributes(self) -> bool:
        """Whether this rank adds its part to cross-rank sums: the first replica of each shard
        (replicated mesh dims hold copies, which must count once)."""
        coordinate = self.mesh.get_coordinate()
        if coordinate is None:
            return False
        return all(c == 0 for i, c in enumerate(coordinate) if i not in self.mesh_dims)

    def regions(self) -> list[tuple[int, int]]:
        """``(offset, size)`` along the one sharded dim for every rank of its mesh dim (chunks as
        ``torch.chunk`` makes them, as DTensor and FSDP2 do)."""
        ((dim, mesh_dim),) = self.sharded
        n, size = self.mesh.size(mesh_dim), self.shape[dim]
        chunk = -(-size // n) if size else 0
        return [(min(r * chunk, size), max(0, min((r + 1) * chunk, size) - r * chunk)) for r in range(n)]


def layout_of(t) -> Layout | None:
    if not is_sharded(t):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(t.placements)
    shape = tuple(t.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, t.device_mesh, placements)
    plain = all(type(p) is Shard or isinstance(p, Replicate) for p in placements)
    sharded = tuple((p.dim % max(len(shape), 1), i) for i, p in enumerate(placements) if type(p) is Shard)
    return Layout(t.device_mesh, placements, shape, tuple(local_shape), tuple(offset), sharded, plain)


def _aligned_slice(v: torch.Tensor, lay: Layout) -> torch.Tensor | None:
    """This rank's part of ``v``, a tensor broadcastable to the global shape (right-aligned): sliced
    along the sharded dims where it has more than one entry; a fresh tensor (the global one can
    go). None if ``v`` does not broadcast that way."""
    lead = len(lay.shape) - v.dim()
    if lead < 0 or any(s not in (1, lay.shape[lead + i]) for i, s in enumerate(v.shape)):
        return None
    for d in sorted(lay.dims):
        if d >= lead and v.shape[d - lead] == lay.shape[d]:
            v = v.narrow(d - lead, lay.offset[d], lay.local_shape[d])
    return v.clone()


def _data_placements(v_global_shape: tuple[int, ...], lay: Layout) -> tuple | None:
    """The placements of a datum sliced by `_aligned_slice` (None: it is whole on every rank)."""
    from torch.distributed.tensor import Replicate, Shard

    lead = len(lay.shape) - len(v_global_shape)
    out: list[Any] = []
    split = False
    for i in range(lay.mesh.ndim):
        dim = next((d for d, m in lay.sharded if m == i), None)
        if dim is not None and dim >= lead and v_global_shape[dim - lead] == lay.shape[dim]:
            out.append(Shard(dim - lead))
            split = True
        else:
            out.append(Replicate())
    return tuple(out) if split else None


def _meta(shape) -> torch.Tensor:
    return torch.empty(shape, device="meta")


# -- binding to the local shard --------------------------------------------------------------------
def localize(bound: Bound, lay: Layout) -> Bound | None:
    """``bound`` bound again to this rank's part of the tensor, if its set is a product of sets
    over the local part (element-wise, or units within the local rows); None otherwise."""
    if isinstance(bound, LowPrecisionBound):
        inner = localize(bound.inner, lay)
        return None if inner is None else LowPrecisionBound(inner, _meta(lay.local_shape))
    traits = bound.traits
    if isinstance(bound, IntersectionBound):
        if not traits.elementwise:
            return None
        parts = [localize(m, lay) for m in bound.members]
        members = [m for m in parts if m is not None]
        if len(members) != len(parts):
            return None
        like = torch.empty((), dtype=bound.like.dtype, device=bound.like.device).expand(lay.local_shape)
        return IntersectionBound(bound.constraint, bound.name, like, members)
    if isinstance(bound, FixedBound):
        return _local_fixed(bound, lay)
    if traits.reduces == ():
        sliced = {}
        for key, v in bound.state_tensors().items():
            part = _aligned_slice(v, lay)
            if part is None:
                return None
            sliced[key] = part
        new = copy.copy(bound)
        new.shape = lay.local_shape
        new._adopt(sliced)
        return new
    if traits.reduces is not None and not set(traits.reduces) & lay.dims and not bound.state_tensors():
        new = copy.copy(bound)
        new.shape = lay.local_shape
        return new
    return None


def _whole_dims(index: tuple, ndim: int) -> list | None:
    """The per-dim entries of an index expression of ints and slices (Ellipsis expanded), or None
    for one with tensors or None entries."""
    if any(isinstance(e, torch.Tensor) or e is None for e in index):
        return None
    if sum(e is Ellipsis for e in index) > 1:
        return None
    entries = []
    for e in index:
        if e is Ellipsis:
            entries += [slice(None)] * (ndim - (len(index) - 1))
        else:
            entries.append(e)
    return entries + [slice(None)] * (ndim - len(entries))


def _local_fixed(bound: FixedBound, lay: Layout) -> Bound | None:
    """`Fixed` on the local part: an index expression that does not index a sharded dim applies
    as it is; otherwise the held positions become a local bool mask (a scalar value only)."""
    entries = _whole_dims(bound.index, len(lay.shape))
    if entries is not None and bound.values.dim() == 0 and all(entries[d] == slice(None) for d in lay.dims):
        new = copy.copy(bound)
        new.shape = lay.local_shape
        return new
    if bound.values.dim() != 0:
        return None  # a tensor of values: kept whole (gathered), see the module docstring
    held = torch.zeros(lay.shape, dtype=torch.bool, device=bound.values.device)
    held[bound.index] = True
    part = _aligned_slice(held, lay)
    new = copy.copy(bound)
    new.shape = lay.local_shape
    new.index = (part,)
    return new


class LocalShardBound(Bound):
    """A sharded parameter's bound bound again to this rank's part (``.local``); the global data
    is not kept. Its checkpoint data are DTensors sharded like the parameter where the data is
    shaped like it (resharded by ``torch.distributed.checkpoint`` like ``exp_avg``), plain tensors
    where every rank holds the same."""

    def __init__(self, whole: Bound, part: Bound, lay: Layout):
        super().__init__(whole.constraint, whole.name, _meta(lay.shape), part.traits)
        self.local = part
        self.layout = lay
        self.family = getattr(whole, "family", type(whole))
        # each datum's global shape: the global bound's, or for data made at localization (the
        # held positions of a `Fixed` as a mask) the parameter's
        theirs = whole.state_tensors()
        self.global_shapes = {
            k: tuple(theirs[k].shape) if k in theirs and theirs[k].dtype == v.dtype else tuple(lay.shape)
            for k, v in part.state_tensors().items()
        }
        self.data_placements = {k: _data_placements(s, lay) for k, s in self.global_shapes.items()}

    # the set on this rank's part (tensors given as DTensors of this layout or as local parts)
    def project_(self, x):
        self.local.project_(local(x))

    def project_measured_(self, x, out=None):
        return self.local.project_measured_(local(x))

    def gap(self, x):
        return self.local.gap(local(x))

    def gap_entries(self, x, out=None):
        return self.local.gap_entries(local(x))

    def residual(self, x, out=None):
        return self.local.residual(local(x))

    def project_grad_(self, g, x):
        self.local.project_grad_(local(g), local(x))

    def grad_gap_entries(self, g, x, out=None):
        return self.local.grad_gap_entries(local(g), local(x))

    def project_moment_(self, m, x):
        self.local.project_moment_(local(m), local(x))

    def project_scale_(self, v):
        self.local.project_scale_(local(v))

    def project_point_(self, x):
        self.local.project_point_(local(x))

    def repair_(self, t):
        self.local.repair_(local(t))

    def state_tensors(self):
        from torch.distributed.tensor import DTensor

        out = {}
        for key, v in self.local.state_tensors().items():
            placements = self.data_placements[key]
            if placements is None:
                out[key] = v
            else:
                shape = torch.Size(self.global_shapes[key])
                out[key] = DTensor.from_local(
                    v,
                    self.layout.mesh,
                    placements,
                    run_check=False,
                    shape=shape,
                    stride=_contiguous_stride(shape),
                )
        return out

    def _to_local(self, tensors) -> tuple[dict | None, str]:
        """Checkpoint data as this rank's parts: a DTensor of this layout gives its local part; a
        plain tensor of the global shape (an unsharded checkpoint) is sliced."""
        if not isinstance(tensors, dict):
            return None, f"data must be a dict of tensors, got {type(tensors).__name__}"
        out = {}
        for key, v in tensors.items():
            placements = self.data_placements.get(key)
            if is_sharded(v):
                if (
                    placements is None
                    or tuple(v.placements) != placements
                    or tuple(v.shape) != self.global_shapes.get(key)
                ):
                    return None, (
                        f"{key}: a DTensor of shape {tuple(v.shape)} placed {tuple(v.placements)}, "
                        f"expected shape {self.global_shapes.get(key)} placed {placements}"
                    )
                v = v.to_local()
            elif placements is not None and isinstance(v, torch.Tensor):
                if tuple(v.shape) != self.global_shapes[key]:
                    return None, f"{key} of shape {tuple(v.shape)}, expected {self.global_shapes[key]}"
                v = _aligned_slice(v, self.layout)
            out[key] = v
        return out, ""

    def check_state(self, tensors):
        data, why = self._to_local(tensors)
        return (False, why) if data is None else self.local.check_state(data)

    def with_state(self, tensors):
        data, why = self._to_local(tensors)
        if data is None:
            from .errors import ConstraintError

            raise ConstraintError(f"{self.name}: {self.constraint!r}: {why}")
        new = copy.copy(self)
        new.local = self.local.with_state(data)
        return new


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


# -- norms summed across shards --------------------------------------------------------------------
class NormShardBound(Bound):
    """An L2 ball or sphere (``traits.via_norms``) whose units span a sharded dim: every rank sums
    its part of each unit's squared norm, the sums are all-reduced (one collective for all such
    parameters of a mesh, `project_all_`), and each rank scales its shard."""

    def __init__(self, whole: Bound, lay: Layout):
        # the gap is measured from the units' global norms (`gap`), never from a shard's alone
        traits = dataclasses.replace(whole.traits, cheap_gap=False, measured_projection=False)
        super().__init__(whole.constraint, whole.name, _meta(lay.shape), traits)
        self.whole = whole
        self.family = type(whole)
        core = whole.inner if isinstance(whole, LowPrecisionBound) else whole
        self.sphere = isinstance(core, UnitNormBound)
        self.radius = getattr(core, "radius", 1.0)
        dims = getattr(core, "dims", None)
        self.dims = dims if dims is not None else tuple(range(len(lay.shape)))
        self.unit = math.prod(lay.shape[d] for d in self.dims)
        self.layout = lay
        (mesh_dim,) = lay.mesh_dims
        self.group = lay.mesh.get_group(mesh_dim)
        self.batch: NormBatch | None = None  # set on the plan's copy
        self.slot = 0

    def _work(self, x):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x

    def _scaled(self, x, norm) -> torch.Tensor:
        """``P(x)`` from the units' global norms (``x`` in working precision)."""
        norm = norm.to(x.dtype)
        if self.sphere:
            zero = norm == 0
            y = torch.div(x, norm.masked_fill(zero, 1.0))
            return y.add_(zero.to(x.dtype), alpha=1.0 / math.sqrt(self.unit) if self.unit else 0.0)
        return x * norm.reciprocal().mul_(self.radius).clamp_max_(1.0)

    def project_(self, x):
        type(self).project_all_([self], [x])

    @classmethod
    def project_all_(cls, bounds, xs):
        work = [b._work(x) for b, x in zip(bounds, xs)]
        norms = NormBatch.reduce(bounds, work)
        for b, x, y, n in zip(bounds, xs, work, norms):
            x.copy_(b._scaled(y, n))
        batch = bounds[0].batch if bounds else None
        if batch is not None and len(bounds) == len(batch.bounds):
            batch.projected(xs)

    def gap(self, x):
        work = self._work(x)
        (norm,) = NormBatch.reduce([self], [work])
        return work - self._scaled(work, norm)

    def residual(self, x, out=None):
        """This rank's entries of ``P(x) - P(P(x))`` for a just projected ``x``; the norms of the
        projected parameters of the whole batch are all-reduced once, at the first call."""
        if self.batch is None or self.batch.xs is None:
            return self.gap(x)
        norm = self.batch.norms_after()[self.slot]
        work = self._work(x)
        return work - self._scaled(work, norm)

    def state_tensors(self):
        return {}

    def with_state(self, tensors):
        ok, reason = self.check_state(tensors)
        if not ok:
            from .errors import ConstraintError

            raise ConstraintError(f"{self.name}: {self.constraint!r}: {reason}")
        return copy.copy(self)


class NormBatch:
    """The norm-reduced parameters of one process group in a plan: the sums of one step travel
    together."""

    def __init__(self):
        self.bounds: list[NormShardBound] = []
        self.xs = None
        self._after = None

    @staticmethod
    def reduce(bounds, xs) -> list[torch.Tensor]:
        """Each unit's global L2 norm (keepdim) for each ``x``: one all-reduce of the squared local
        norms (float64) for the whole list."""
        parts = [
            torch.linalg.vector_norm(x, 2, dim=b.dims, keepdim=True).double().square_()
            for b, x in zip(bounds, xs)
        ]
        if not parts:
            return []
        flat = torch.cat([p.reshape(-1) for p in parts])
        _dist().all_reduce(flat, group=bounds[0].group)
        out, at = [], 0
        for p in parts:
            out.append(flat[at : at + p.numel()].view(p.shape).sqrt_())
            at += p.numel()
        return out

    def projected(self, xs) -> None:
        self.xs, self._after = list(xs), None

    def norms_after(self) -> list[torch.Tensor]:
        if self._after is None:
            bounds = self.bounds
            self._after = NormBatch.reduce(bounds, [b._work(x) for b, x in zip(bounds, self.xs)])
        return self._after


# -- choosing, at attach -----------------------------------------------------------------------------
#: True: every sharded parameter takes the gather path (to compare the others against it)
force_gather = False


def shard_bound(bound: Bound, param) -> Bound:
    """How the step will project ``param`` under ``bound``: a `LocalShardBound`, a
    `NormShardBound`, or ``bound`` itself (gathered); ``bound`` for a plain parameter."""
    lay = layout_of(param)
    if lay is None or not lay.plain or force_gather:
        return bound
    part = localize(bound, lay)
    if part is not None:
        return LocalShardBound(bound, part, lay)
    core = bound.inner if isinstance(bound, LowPrecisionBound) else bound
    traits = bound.traits
    if traits.via_norms and type(core) in (L2BallBound, UnitNormBound) and len(lay.mesh_dims) == 1:
        reduced = set(range(len(lay.shape))) if traits.reduces is None else set(traits.reduces)
        if lay.dims <= reduced:
            return NormShardBound(bound, lay)
    return bound


def shard_bounds(bounds: dict) -> dict:
    return {p: (None if b is None else shard_bound(b, p)) for p, b in bounds.items()}


def globalize(bound: Bound, param, owner=None) -> Bound:
    """The global bound of a sharded parameter's `LocalShardBound` or `NormShardBound` (bound
    afresh; data chosen at attach, such as an N:M pattern, gathered back): a collective."""
    if isinstance(bound, NormShardBound):
        return bound.whole
    if not isinstance(bound, LocalShardBound):
        return bound
    fresh = bound.constraint.bind(full(param), bound.name, owner)
    data = {k: full(v) for k, v in bound.state_tensors().items()}
    mine = fresh.state_tensors()
    if data.keys() == mine.keys() and all(tuple(v.shape) == tuple(mine[k].shape) for k, v in data.items()):
        return fresh.with_state(
            {k: v.to(device=mine[k].device, dtype=mine[k].dtype) for k, v in data.items()}
        )
    return fresh  # data the constraint determines (held positions of a Fixed)


# -- the plan the step runs ---------------------------------------------------------------------------
LOCAL, NORMS, GATHER, PLAIN = "local", "norms", "gather", "plain"


@dataclass
class Entry:
    position: int  # in the binding's order (the audit's)
    param: torch.Tensor
    bound: Bound  # what the step projects with (local, norm-batched, or the global bound)
    mode: str
    layout: Any  # a Layout; None for a plain parameter
    owner: int | None = None  # group rank that projects a gathered parameter (None: every rank)
    stand_in: torch.Tensor | None = None


class ShardPlan:
    """The step's view of a binding with sharded parameters: plain-tensor groups for the engine's
    projections, and the cross-rank reduction of the audit. Falsy (and free) when no parameter is
    sharded: then the binding's own groups are used."""

    def __init__(self, binding: Binding):
        self.binding = binding
        self.active = any(is_sharded(p) for p in binding.params)
        if not self.active:
            return
        self.rank, self.world = world()
        self.entries: list[Entry] = []
        position = 0
        gathered = 0
        batches: dict = {}
        for group in binding.groups:
            for bound, param in zip(group.bounds, group.params):
                lay = layout_of(param)
                if lay is None:
                    entry = Entry(position, param, bound, PLAIN, None)
                elif isinstance(bound, LocalShardBound):
                    entry = Entry(position, param, bound.local, LOCAL, lay)
                elif isinstance(bound, NormShardBound):
                    mine = copy.copy(bound)
                    batch = batches.setdefault((id(bound.group), param.device, param.dtype), NormBatch())
                    batch.bounds.append(mine)
                    mine.batch, mine.slot = batch, len(batch.bounds) - 1
                    entry = Entry(position, param, mine, NORMS, lay)
                else:
                    owner = None
                    if lay.plain and len(lay.sharded) == 1 and lay.mesh.ndim == 1:
                        owner = gathered % lay.mesh.size()
                        gathered += 1
                    entry = Entry(
                        position,
                        param,
                        bound,
                        GATHER,
                        lay,
                        owner,
                        torch.empty(0, dtype=param.dtype, device=local(param).device),
                    )
                self.entries.append(entry)
                position += 1
        self.size = position

    def __bool__(self) -> bool:
        return self.active

    def _mine(self, e: Entry) -> bool:
        """Whether this rank projects ``e`` (every rank does, but for gathered parameters with an
        owner)."""
        return e.mode != GATHER or e.owner is None or e.layout.mesh.get_local_rank() == e.owner

    def groups(self, tensors: dict[int, torch.Tensor]) -> list[Group]:
        """The engine's groups for this step: ``tensors[position]`` in place of each parameter this
        rank projects, grouped by family, device and dtype (group order: first appearance)."""
        keyed: dict[tuple, tuple[list, list]] = {}
        self.order: list[int] = []
        self.bounds: list[Bound] = []
        for e in self.entries:
            t = tensors.get(e.position)
            if t is None:
                continue
            # a family that projects one tensor at a time gains nothing from a group, while the
            # audit copies a whole group at once where it has no cheap gap: one tensor per group
            alone = (
                e.mode == LOCAL
                and not e.bound.traits.cheap_gap
                and getattr(type(e.bound).project_all_, "__func__", None)
                is getattr(Bound.project_all_, "__func__", 0)
            )
            key = (
                e.mode,
                type(e.bound),
                e.bound.traits.projects_grad,
                t.device,
                t.dtype,
                id(getattr(e.bound, "batch", None)) if e.mode == NORMS else e.position if alone else None,
            )
            bs, ts = keyed.setdefault(key, ([], []))
            bs.append(e)
            ts.append(t)
        out = []
        for (_, kind, grad, device, dtype, _), (es, ts) in keyed.items():
            out.append(Group(kind, [e.bound for e in es], ts, grad, device, dtype))
            self.order += [e.position for e in es]
            self.bounds += [e.bound for e in es]
        return out

    # -- the two projections of a step ---------------------------------------------------------------
    @contextmanager
    def grad_groups(self, groups):
        """Groups for the gradient projection: local shards (with their gradients) as they are;
        gathered parameters' gradients on their owner, scattered back on exit."""
        if not self.active:
            yield groups
            return
        tensors, back = {}, []
        with torch.no_grad():
            for e in self.entries:
                if not e.bound.traits.projects_grad or e.param.grad is None:
                    continue
                if e.mode == GATHER:
                    g = self._gather(e, e.param.grad)
                    x = None
                    if not e.bound.traits.linear:  # the tangent space of a linear set is the same everywhere
                        x = self._gather(e, e.param)
                    back.append(e)
                    if g is None:
                        continue
                    s = e.stand_in
                    s.set_(x if x is not None else g)  # a linear set's tangent projection reads no x
                    s.grad = g
                    tensors[e.position] = s
                else:
                    v = local(e.param)
                    v.grad = local(e.param.grad)
                    tensors[e.position] = v
        try:
            yield self.groups(tensors)
        finally:
            with torch.no_grad():
                for e in back:
                    self._scatter(e, e.stand_in.grad, e.param.grad)
                    e.stand_in.grad = None
                    e.stand_in.set_()

    @contextmanager
    def param_groups(self, groups):
        """Groups for the parameter projection: local shards in place; gathered parameters on
        their owner, scattered back on exit (also when the projection raised)."""
        if not self.active:
            yield groups
            return
        tensors, back = {}, []
        with torch.no_grad():
            for e in self.entries:
                if e.mode == GATHER:
                    x = self._gather(e, e.param)
                    back.append(e)
                    if x is not None:
                        e.stand_in.set_(x)
                        tensors[e.position] = e.stand_in
                else:
                    tensors[e.position] = local(e.param)
        try:
            yield self.groups(tensors)
        finally:
            with torch.no_grad():
                for e in back:
                    self._scatter(e, e.stand_in if self._mine(e) else None, e.param)
                    e.stand_in.set_()

    # -- gathering to an owner and scattering back -----------------------------------------------------
    def _gather(self, e: Entry, t) -> torch.Tensor | None:
        """The whole of ``t`` on the rank that projects ``e`` (every rank, without an owner); None
        elsewhere."""
        if e.owner is None:
            return full(t)
        dist = _dist()
        lay = e.layout
        group = lay.mesh.get_group(0)
        regions, dim, n, pad = _pieces(lay)
        part = local(t)
        buf = part.new_zeros(pad)
        buf[: part.numel()].copy_(part.reshape(-1))
        if lay.mesh.get_local_rank() != e.owner:
            dist.gather(buf, None, group=group, group_dst=e.owner)
            return None
        parts = [torch.empty_like(buf) for _ in regions]
        dist.gather(buf, parts, group=group, group_dst=e.owner)
        whole = part.new_empty(lay.shape)
        for (start, size), k, p in zip(regions, n, parts):
            shape = list(lay.shape)
            shape[dim] = size
            whole.narrow(dim, start, size).copy_(p[:k].view(shape))
        return whole

    def _scatter(self, e: Entry, whole, target) -> None:
        """Each rank's part of the owner's ``whole`` into its shard of ``target`` (every rank: its
        own part of its own ``whole``, without an owner)."""
        if e.owner is None:
            write_back_(target, whole)
            return
        dst = local(target)
        dist = _dist()
        lay = e.layout
        group = lay.mesh.get_group(0)
        regions, dim, n, pad = _pieces(lay)
        buf = dst.new_empty(pad)
        if lay.mesh.get_local_rank() == e.owner:
            parts = []
            for (start, size), k in zip(regions, n):
                p = dst.new_zeros(pad)
                p[:k].copy_(whole.narrow(dim, start, size).reshape(-1))
                parts.append(p)
            dist.scatter(buf, parts, group=group, group_src=e.owner)
        else:
            dist.scatter(buf, None, group=group, group_src=e.owner)
        dst.copy_(buf[: dst.numel()].view(dst.shape))

    # -- the audit, reduced across ranks -----------------------------------------------------------------
    def _weight(self, e: Entry) -> bool:
        """Whether this rank's numbers for ``e`` count: its shard (first replica), the owner of a
        gathered parameter, rank 0 for parameters every rank holds whole."""
        if e.mode == PLAIN:
            return self.rank == 0
        if e.mode == GATHER:
            if e.owner is None:
                return self.rank == 0
            return self._mine(e) and e.layout.contributes()
        return e.layout.contributes()

    def reduce(self, columns: list[list[torch.Tensor]], maxima: tuple[int, ...] = ()) -> list[list[float]]:
        """Columns of this rank's 0-d tensors (in the order of the last `groups`) made global, per
        binding position: norms become their square roots of all-reduced squared sums, columns in
        ``maxima`` the largest over ranks. One all-reduce (two when many ranks have many maxima)."""
        counted = {e.position: self._weight(e) for e in self.entries}
        n, k = self.size, len(columns)
        device = local(self.entries[0].param).device
        local_rows = torch.zeros(k, n, dtype=torch.float64, device=device)
        if self.order:
            stacked = torch.stack(
                [torch.stack([t.to(device=device, dtype=torch.float64) for t in col]) for col in columns]
            )
            keep = torch.tensor([counted[p] for p in self.order], device=device)
            stacked = torch.where(keep, stacked, torch.zeros((), dtype=torch.float64, device=device))
            local_rows[:, torch.tensor(self.order, device=device)] = stacked
        sums = [i for i in range(k) if i not in maxima]
        squares = local_rows[sums].square()
        peaks = local_rows[list(maxima)]
        dist = _dist()
        slots = self.world * n * len(maxima)
        if slots <= 4096:
            # one all-reduce: sums, and every rank's maxima in its own slot
            spread = torch.zeros(len(maxima), self.world, n, dtype=torch.float64, device=device)
            spread[:, self.rank] = peaks
            flat = torch.cat([squares.reshape(-1), spread.reshape(-1)])
            dist.all_reduce(flat)
            squares = flat[: squares.numel()].view(squares.shape)
            peaks = flat[squares.numel() :].view(spread.shape).amax(1) if maxima else peaks
        else:
            dist.all_reduce(squares)
            if maxima:
                dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        out = torch.empty(k, n, dtype=torch.float64, device=device)
        out[sums] = squares.sqrt()
        if maxima:
            out[list(maxima)] = peaks
        return out.T.tolist()

    def rows(self, watch) -> list[tuple[float, float, float, float, float]]:
        from .audit.watch import as_rows

        return as_rows(self.reduce(watch.columns(self.bounds), maxima=(1,)))

    def nonfinite(self, watch) -> list[int]:
        values = self.reduce(watch.columns(self.bounds))
        return [i for i, (v,) in enumerate(values) if not math.isfinite(v)]

    # -- check and repair --------------------------------------------------------------------------------
    @torch.no_grad()
    def distances(self) -> list[tuple[float, float]]:
        """``(distance from the set, ||x||)`` of every constrained parameter, the same on every
        rank: a collective."""
        with self.param_groups(self.binding.groups) as groups:
            dist_cols, norm_cols = [], []
            for group in groups:
                if group.kind is NormShardBound:
                    norms = NormBatch.reduce(
                        group.bounds, [b._work(x) for b, x in zip(group.bounds, group.params)]
                    )
                    gaps = [
                        b._work(x) - b._scaled(b._work(x), nrm)
                        for b, x, nrm in zip(group.bounds, group.params, norms)
                    ]
                else:
                    gaps = [b.residual(x) for b, x in zip(group.bounds, group.params)]
                dist_cols += [torch.linalg.vector_norm(g.float()) for g in gaps]
                norm_cols += [torch.linalg.vector_norm(x.float()) for x in group.params]
            # the parameters are not changed: nothing to scatter back beyond what they hold
            values = self.reduce([dist_cols, norm_cols])
        return [(d, s) for d, s in values]

    @torch.no_grad()
    def repair(self, optimizer, positions: list[int]) -> None:
        """`stepping.repair` for sharded parameters: local shards locally, gathered ones whole."""
        wanted = set(positions)
        for e in self.entries:
            if e.position not in wanted:
                continue
            if e.mode == GATHER or e.mode == PLAIN:
                x = full(e.param)
                e.bound.repair_(x)
                e.bound.project_(x)
                write_back_(e.param, x)
                for value in optimizer.state.get(e.param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == e.param.shape:
                        whole = full(value)
                        e.bound.repair_(whole)
                        write_back_(value, whole)
                continue
            x = local(e.param)
            e.bound.repair_(x)
            e.bound.project_(x)
            for value in optimizer.state.get(e.param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == e.param.shape:
                    e.bound.repair_(local(value))


def _pieces(lay) -> tuple[list, int, list[int], int]:
    """How a parameter sharded along one dim travels to and from its owner: each rank's region,
    the sharded dim, each region's number of entries, and the padded size every rank sends."""
    regions = lay.regions()
    ((dim, _),) = lay.sharded
    n = [math.prod(lay.shape[:dim]) * size * math.prod(lay.shape[dim + 1 :]) for _, size in regions]
    return regions, dim, n, max(n)
