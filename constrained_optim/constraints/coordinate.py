"""Coordinate sets: entries held at zero (`Mask`) or at given values (`Fixed`), entries kept in
an interval (`Box`, `NonNegative`).

`Mask` and `Fixed` are linear (affine for `Fixed` with a non-zero value) and axis-aligned, so the
projection, the tangent projection and the handling of optimizer state are all the same
entry-wise rule. `Box` is a product of intervals, projected by clamping. All of them are
element-wise (``traits.reduces == ()``): products of per-entry sets, so projecting onto several
of them in turn is the exact projection onto their intersection.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConstraintError, describe
from .base import Bound, Constraint, HeldZeros, Partition, TensorLike, Traits, finite_or_raise


# -- pure maths ---------------------------------------------------------------------------------
def mask_project_(x: torch.Tensor, keep: torch.Tensor) -> None:
    """Project onto ``{x : x[~keep] = 0}``: ``x <- x * keep`` (``keep`` a 0/1 tensor, broadcast)."""
    x.mul_(keep)


def fixed_project_(x: torch.Tensor, index, values) -> None:
    """Project onto ``{x : x[index] = values}``: overwrite the held entries."""
    x[index] = values


def box_project_(x: torch.Tensor, low, high) -> None:
    """Project onto ``{x : low <= x <= high}``: ``x <- min(max(x, low), high)`` in one clamp.
    ``low`` and ``high`` are both scalars (or None) or both tensors (or None), broadcast."""
    if low is not None or high is not None:
        torch.clamp_(x, low, high)


# -- Mask ------------------------------------------------------------------------------------------
class Mask(Constraint):
    """Entries where ``mask`` is False are held at 0: the set ``{W : W[~mask] = 0}``.

    ``mask`` is a bool (or 0/1) tensor broadcastable to the parameter; True marks a free entry,
    as in ``torch.nn.utils.prune``. Gradients, momentum and ``exp_avg`` are zeroed on held
    entries and so are second moments, so an element-wise optimizer never moves them. A bool
    mask on the parameter's device is held without a copy (its bytes read as uint8): leave it
    unchanged while it is attached.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.ones(2, 3))
    >>> b = co.Mask(torch.tensor([True, False, True])).bind(w, "w")
    >>> with torch.no_grad():
    ...     b.project_(w)
    >>> w
    Parameter containing:
    tensor([[1., 0., 1.],
            [1., 0., 1.]], requires_grad=True)
    """

    linear = True

    def __init__(self, mask: TensorLike) -> None:
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise ConstraintError(f"Mask: mask must be bool or 0/1, got values of {mask.dtype}")
            mask = mask.bool()
        self.mask = mask

    def _bind(self, param, name, owner):
        check_broadcast(self.mask.shape, param, name, self, "mask")
        # uint8 multiplies about as fast as float on a CPU at a quarter of the memory; a bool mask
        # already on the parameter's device is the same bytes viewed as uint8, not a second copy
        mask = self.mask
        if mask.device == param.device and mask.is_contiguous():
            keep = mask.view(torch.uint8)
        else:
            keep = mask.to(device=param.device, dtype=torch.uint8)
        return MaskBound(self, name, param, keep)

    def __repr__(self):
        free = int(self.mask.sum())
        return f"Mask({free}/{self.mask.numel()} free)"


#: what a held-entries set is: exact, element-wise, with gaps read from the held entries alone
HELD = Traits(
    linear=True, convex=True, projects_grad=True, exact=True, reduces=(), cheap_gap=True, cheap_grad_gap=True
)


#: a mask of at most this many entries is also held as a 0/1 tensor of the parameter's dtype: a
#: CPU multiplies by it about 2x faster than by uint8 (no cast per call), and at this size the
#: copy is small (256 KiB for float32); larger masks stay uint8 alone, a quarter of the memory
SMALL_MASK = 1 << 16


class MaskBound(Bound):
    """``{x : x * (1 - keep) = 0}`` for a 0/1 uint8 ``keep`` broadcastable to the parameter (a
    `Mask`, or the pattern a fixed `NMSparsity` chose)."""

    def __init__(self, constraint, name, param, keep: torch.Tensor):
        super().__init__(constraint, name, param, HELD)
        self.dtype = param.dtype
        self.keep = keep
        self._derive()

    def _derive(self):
        small = self.keep.numel() <= SMALL_MASK and self.dtype.is_floating_point
        self.factor = self.keep.to(self.dtype) if small else self.keep

    def _adopt(self, tensors):
        super()._adopt(tensors)
        self._derive()

    def multiplier(self, x: torch.Tensor) -> torch.Tensor:
        """``keep`` in the form a multiply of ``x`` is fastest with (the same values)."""
        return self.factor if self.factor.dtype == x.dtype else self.keep

    def project_(self, x):
        mask_project_(x, self.multiplier(x))

    def gap(self, x):
        return self.gap_entries(x)

    def gap_entries(self, x, out=None):
        # x - x * keep = x * (1 - keep) with no (1 - keep) temporary. A CPU multiplies a float by a
        # uint8 tensor through a float copy of it; with ``out`` that copy goes there instead of a
        # fresh allocation (an accelerator casts inside the kernel)
        keep = self.multiplier(x)
        if out is not None and out.device.type == "cpu" and out.dtype != keep.dtype:
            keep = out.copy_(keep)
        return torch.addcmul(x, x, keep, value=-1, out=out)

    def project_grad_(self, g, x):
        mask_project_(g, self.multiplier(g))

    def grad_gap_entries(self, g, x, out=None):
        return self.gap_entries(g, out)

    def project_scale_(self, v):
        mask_project_(v, self.multiplier(v))

    def repair_(self, t):
        t.masked_fill_(self.keep == 0, 0)  # not a multiply: inf * 0 would leave NaN

    def held_zeros(self):
        # keep is 0/1 uint8: its bytes read as bool are the free entries, no copy
        return None if bool(self.keep.all()) else HeldZeros(free=self.keep.view(torch.bool))

    def partition(self, like):
        n = like.numel()
        own = torch.arange(n, device=like.device)
        weight = self.keep.expand(like.shape).reshape(-1).double()
        return Partition(own, weight, torch.zeros(n, dtype=torch.float64, device=like.device))

    def state_tensors(self):
        return {"keep": self.keep}

    def check_values(self, tensors):
        keep = tensors["keep"]
        if not bool(((keep == 0) | (keep == 1)).all()):
            return False, "keep must hold only 0 and 1"
        return True, ""

    @classmethod
    def project_all_(cls, bounds, xs):
        torch._foreach_mul_(xs, [b.multiplier(x) for b, x in zip(bounds, xs)])

    @classmethod
    def project_grad_all_(cls, bounds, gs, xs):
        cls.project_all_(bounds, gs)


# -- Fixed -----------------------------------------------------------------------------------------
class Fixed(Constraint):
    """Entries selected by ``where`` are held at ``value``: ``{W : W[where] = value[where]}``.

    ``where`` is a bool mask broadcastable to the parameter (True = held) or an index expression
    such as ``(..., 1, 1)`` (the centre of every 3x3 kernel), written as a strided in-place
    store. ``value`` is a finite scalar or a tensor broadcastable to the parameter, of which the
    selected entries are taken. Affine when ``value != 0``; weight decay then pulls held entries
    off their value during the wrapped step, and the post-step projection puts them back.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.ones(1, 1, 3, 3))
    >>> b = co.Fixed((..., 1, 1), 0.0).bind(w, "w")
    >>> with torch.no_grad():
    ...     b.project_(w)
    >>> w[0, 0]
    tensor([[1., 1., 1.],
            [1., 0., 1.],
            [1., 1., 1.]], grad_fn=<SelectBackward0>)
    """

    linear = True

    def __init__(self, where: torch.Tensor | tuple[Any, ...], value: float | TensorLike = 0.0) -> None:
        if isinstance(where, torch.Tensor) and where.dtype != torch.bool:
            raise ConstraintError(
                f"Fixed: where must be a bool mask or an index expression, got a {where.dtype} tensor"
            )
        self.where = where
        self.value = value if isinstance(value, (int, float)) else torch.as_tensor(value)
        finite_or_raise(self.value, "Fixed", "value")

    def _bind(self, param, name, owner):
        device = param.device
        if isinstance(self.where, torch.Tensor):
            check_broadcast(self.where.shape, param, name, self, "where")
            mask = self.where.to(device).expand(param.shape)
            # a 0-d parameter is indexed by its 0-d mask (nonzero would give a 1-d index)
            index = (mask,) if param.dim() == 0 else mask.nonzero(as_tuple=True)
        else:
            index = self.where if isinstance(self.where, tuple) else (self.where,)
            index = tuple(i.to(device) if isinstance(i, torch.Tensor) else i for i in index)
            try:
                torch.empty(param.shape, device="meta")[index]
            except (IndexError, TypeError, RuntimeError, ValueError) as err:
                raise ConstraintError(
                    f"{describe(name, param)}: Fixed index {self.where!r} does not index it ({err})"
                ) from None
            reason = index_out_of_range(index, tuple(param.shape))
            if reason:  # the meta tensor does not check bounds
                raise ConstraintError(f"{describe(name, param)}: Fixed index {self.where!r}: {reason}")
        if isinstance(self.value, torch.Tensor):
            check_broadcast(self.value.shape, param, name, self, "value")
            values = self.value.to(device=device, dtype=param.dtype).expand(param.shape)[index]
            values = values.clone()
        else:
            values = torch.tensor(float(self.value), dtype=param.dtype, device=device)
        return FixedBound(self, name, param, index, values)

    def __repr__(self):
        where = (
            f"mask of {int(self.where.sum())} held"
            if isinstance(self.where, torch.Tensor)
            else repr(self.where)
        )
        value = "tensor" if isinstance(self.value, torch.Tensor) else repr(self.value)
        return f"Fixed({where.replace('Ellipsis', '...')}, {value})"


def index_out_of_range(index: tuple, shape: tuple[int, ...]) -> str:
    """Why an index expression's integer entries do not fit ``shape`` ('' if they do)."""

    def width(e):  # how many dims an entry consumes (the Ellipsis: what the others leave)
        if e is None or e is Ellipsis:
            return 0
        return e.dim() if isinstance(e, torch.Tensor) and e.dtype == torch.bool else 1

    rest = len(shape) - sum(width(e) for e in index)
    dim = 0
    for e in index:
        if e is Ellipsis:
            dim += rest
            continue
        integer = isinstance(e, int) and not isinstance(e, bool)
        if integer or (isinstance(e, torch.Tensor) and e.dtype != torch.bool and e.numel()):
            size = shape[dim]
            low, high = (e, e) if integer else (int(e.min()), int(e.max()))
            if low < -size or high >= size:
                return f"an index for dim {dim} is out of range for its size {size}"
        dim += width(e)
    return ""


class FixedBound(Bound):
    def __init__(self, constraint, name, param, index: tuple, values: torch.Tensor):
        super().__init__(constraint, name, param, HELD)
        self.index = index
        self.values = values

    def project_(self, x):
        fixed_project_(x, self.index, self.values)

    def gap(self, x):
        out = torch.zeros_like(x)
        out[self.index] = x[self.index] - self.values
        return out

    def gap_entries(self, x, out=None):
        # only the held entries can be off the set: a strided or gathered read, not a full pass
        return x[self.index] - self.values

    def project_grad_(self, g, x):
        g[self.index] = 0

    def grad_gap_entries(self, g, x, out=None):
        return g[self.index]

    def project_scale_(self, v):
        v[self.index] = 0

    def repair_(self, t):
        t[self.index] = 0  # a store, whatever t held there; the projection then puts the values

    def held_zeros(self):
        if not bool(self.values.any()):  # every held value 0: the index itself, a strided store
            count = torch.empty(self.shape, device="meta")[self.index].numel()
            return HeldZeros(index=self.index) if count else None
        free = torch.ones(self.shape, dtype=torch.bool, device=self.values.device)
        free[self.index] = self.values != 0
        return None if bool(free.all()) else HeldZeros(free=free)

    def partition(self, like):
        n, device = like.numel(), like.device
        held = torch.zeros(like.shape, dtype=torch.bool, device=device)
        held[self.index] = True
        values = torch.zeros(like.shape, dtype=torch.float64, device=device)
        values[self.index] = self.values.double()
        return Partition(torch.arange(n, device=device), (~held).reshape(-1).double(), values.reshape(-1))

    # a mask's held positions are data too: a checkpoint carries them, like Mask's keep. The
    # index tuple's tensor entries are saved as "index0", "index1", ... (by position)
    def state_tensors(self):
        positions = {f"index{i}": t for i, t in enumerate(self.index) if isinstance(t, torch.Tensor)}
        return {"values": self.values, **positions}

    def _index_from(self, tensors) -> tuple:
        return tuple(tensors.get(f"index{i}", e) for i, e in enumerate(self.index))

    def check_values(self, tensors):
        reason = index_out_of_range(self._index_from(tensors), self.shape)
        return (False, reason) if reason else (True, "")

    def _adopt(self, tensors):
        self.values = tensors["values"]
        self.index = self._index_from(tensors)


# -- Box ---------------------------------------------------------------------------------------------
class Box(Constraint):
    """Entries between ``low`` and ``high``: ``{W : low <= W <= high}`` (entry-wise).

    ``low`` and ``high`` are scalars, tensors broadcastable to the parameter, or None (no bound
    on that side); infinite entries are no bound, NaN is refused. The projection clamps. Bounds a
    half-precision parameter cannot represent are rounded with it, so such a bound holds only to
    that precision.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([-2.0, 0.5, 3.0]))
    >>> with torch.no_grad():
    ...     co.Box(-1.0, torch.tensor([1.0, 1.0, 2.0])).bind(w, "w").project_(w)
    >>> w.data
    tensor([-1.0000,  0.5000,  2.0000])
    """

    def __init__(self, low: float | TensorLike | None = None, high: float | TensorLike | None = None) -> None:
        self.low = _bound_value(low, "low")
        self.high = _bound_value(high, "high")
        if self.low is not None and self.high is not None:
            lo, hi = torch.as_tensor(self.low), torch.as_tensor(self.high)
            try:
                bad = bool((lo > hi).any())
            except RuntimeError:
                raise ConstraintError(
                    f"{self!r}: low of shape {tuple(lo.shape)} and high of shape "
                    f"{tuple(hi.shape)} do not broadcast together"
                ) from None
            if bad:
                raise ConstraintError(f"{self!r}: low > high, so the set is empty")

    def _bind(self, param, name, owner):
        def resolve(v, what):
            if isinstance(v, torch.Tensor):
                check_broadcast(v.shape, param, name, self, what)
                return v.to(device=param.device, dtype=param.dtype)
            return v

        return BoxBound(self, name, param, resolve(self.low, "low"), resolve(self.high, "high"))

    def __repr__(self):
        def show(v):
            return "tensor" if isinstance(v, torch.Tensor) else repr(v)

        return f"{type(self).__name__}(low={show(self.low)}, high={show(self.high)})"


class NonNegative(Box):
    """Entries at least 0: ``{W : W >= 0}``; the projection is ``max(W, 0)``.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([-2.0, 0.5]))
    >>> with torch.no_grad():
    ...     co.NonNegative().bind(w, "w").project_(w)
    >>> w.data
    tensor([0.0000, 0.5000])
    """

    def __init__(self) -> None:
        super().__init__(low=0.0)

    def __repr__(self):
        return "NonNegative()"


def _bound_value(v, what):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
        v = torch.as_tensor(v)
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.bool or v.is_complex():
            raise ConstraintError(f"Box: {what} must be a real number or tensor, got {v.dtype}")
        if bool(v.isnan().any()):  # before a 0-d tensor becomes a float
            raise ConstraintError(f"Box: {what} has NaN entries")
        return float(v) if v.dim() == 0 else v
    if v != v:
        raise ConstraintError(f"Box: {what} is NaN")
    return float(v)


#: below this many entries a tensor's clamp is dominated by per-call overhead, so a group of
#: them goes through one ``torch._foreach_*`` call per side; above it one fused clamp per tensor
#: (a single pass over memory) is faster (measured in benchmarks/bench_sets.py)
FOREACH_MAX_NUMEL = 16384


class BoxBound(Bound):
    """``{x : low <= x <= high}`` with ``low``/``high`` floats, tensors or None (also `NormBall`
    with ``p=inf``)."""

    #: an infinite bound entry is no bound on that entry: legal checkpoint data
    infinite_ok = frozenset({"low", "high"})

    def __init__(self, constraint, name, param, low, high):
        super().__init__(constraint, name, param, Traits(convex=True, exact=True, reduces=()))
        self.low, self.high = low, high
        self._clamp_args()

    def _clamp_args(self):
        # torch.clamp_ takes two numbers or two tensors: a number beside a tensor becomes 0-d
        low, high = self.low, self.high
        if isinstance(low, torch.Tensor) and isinstance(high, float):
            high = torch.tensor(high, dtype=low.dtype, device=low.device)
        elif isinstance(high, torch.Tensor) and isinstance(low, float):
            low = torch.tensor(low, dtype=high.dtype, device=high.device)
        self.clamp = (low, high)

    def project_(self, x):
        box_project_(x, *self.clamp)

    def state_tensors(self):
        return {k: v for k, v in (("low", self.low), ("high", self.high)) if isinstance(v, torch.Tensor)}

    def check_values(self, tensors):
        low, high = tensors.get("low", self.low), tensors.get("high", self.high)
        if low is None or high is None:
            return True, ""
        if bool((torch.as_tensor(low) > torch.as_tensor(high)).any()):
            return False, "low > high somewhere, so the set is empty"
        return True, ""

    def _adopt(self, tensors):
        super()._adopt(tensors)
        self._clamp_args()

    @classmethod
    def project_all_(cls, bounds, xs):
        small_b, small_x = [], []
        for b, x in zip(bounds, xs):
            if x.numel() >= FOREACH_MAX_NUMEL:
                b.project_(x)
            else:
                small_b.append(b)
                small_x.append(x)
        # a one-sided tensor takes one in-place clamp; a two-sided one is clamped from below into
        # a new tensor, from above in place there, and copied back once: no tensor is ever left
        # clamped on one side only
        both = [b.low is not None and b.high is not None for b in small_b]
        work = list(small_x)
        _clamp_group(
            work, [b.low for b in small_b], both, torch._foreach_clamp_min_, torch._foreach_clamp_min
        )
        _clamp_group(work, [b.high for b in small_b], [False] * len(work), torch._foreach_clamp_max_, None)
        if any(both):
            torch._foreach_copy_(
                [x for x, t in zip(small_x, both) if t], [w for w, t in zip(work, both) if t]
            )


def _clamp_group(xs: list, values: list, fresh: list, op_, op) -> None:
    """Clamp each ``xs[i]`` by ``values[i]`` (None: not at all), in place, or where ``fresh[i]``
    into a new tensor that replaces ``xs[i]`` in the list; one foreach call per distinct scalar
    bound and one for the tensor bounds (the common case, one scalar for the group, is one call)."""
    groups: dict = {}
    for i, v in enumerate(values):
        if v is not None:
            groups.setdefault((None if isinstance(v, torch.Tensor) else v, fresh[i]), []).append(i)
    for (scalar, new), idx in groups.items():
        arg = [values[i] for i in idx] if scalar is None else scalar
        targets = [xs[i] for i in idx]
        if new:
            for i, y in zip(idx, op(targets, arg)):
                xs[i] = y
        else:
            op_(targets, arg)


def check_broadcast(shape, param, name, constraint, what) -> None:
    try:
        ok = torch.broadcast_shapes(shape, param.shape) == param.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ConstraintError(
            f"{describe(name, param)}: {constraint!r} has a {what} of shape {tuple(shape)}, "
            f"expected one broadcastable to {tuple(param.shape)}"
        )
