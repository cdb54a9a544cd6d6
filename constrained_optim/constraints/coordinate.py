"""Coordinate sets: entries held at zero (`Mask`) or at given values (`Fixed`), entries kept in
an interval (`Box`, `NonNegative`).

`Mask` and `Fixed` are linear (affine for `Fixed` with a non-zero value) and axis-aligned, so the
projection, the tangent projection and the handling of optimizer state are all the same
entry-wise rule. `Box` is a product of intervals, projected by clamping. All of them are
products of per-entry intervals, so projecting onto several of them in turn is the exact
projection onto their intersection.
"""

from __future__ import annotations

import torch

from ..errors import ConstraintError, describe
from .base import Bound, Constraint


# -- pure maths ---------------------------------------------------------------------------------
def mask_project_(x: torch.Tensor, keep: torch.Tensor) -> None:
    """Project onto ``{x : x[~keep] = 0}``: ``x <- x * keep`` (``keep`` a 0/1 tensor, broadcast)."""
    x.mul_(keep)


def fixed_project_(x: torch.Tensor, index, values) -> None:
    """Project onto ``{x : x[index] = values}``: overwrite the held entries."""
    x[index] = values


def box_project_(x: torch.Tensor, low, high) -> None:
    """Project onto ``{x : low <= x <= high}`` (bounds scalars, tensors broadcast, or None):
    ``x <- min(max(x, low), high)``."""
    if low is not None:
        x.clamp_min_(low)
    if high is not None:
        x.clamp_max_(high)


# -- Mask ------------------------------------------------------------------------------------------
class Mask(Constraint):
    """Entries where ``mask`` is False are held at 0: the set ``{W : W[~mask] = 0}``.

    ``mask`` is a bool (or 0/1) tensor broadcastable to the parameter; True marks a free entry,
    as in ``torch.nn.utils.prune``. Gradients, momentum and ``exp_avg`` are zeroed on held
    entries and so are second moments, so an element-wise optimizer never moves them.

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

    def __init__(self, mask):
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise ConstraintError(f"Mask: mask must be bool or 0/1, got values of {mask.dtype}")
            mask = mask.bool()
        self.mask = mask

    def _bind(self, param, name):
        check_broadcast(self.mask.shape, param, name, self, "mask")
        return MaskBound(self, name, param)

    def __repr__(self):
        free = int(self.mask.sum())
        return f"Mask({free}/{self.mask.numel()} free)"


class MaskBound(Bound):
    projects_grad = True
    coordinatewise = True

    def __init__(self, constraint: Mask, name, param):
        super().__init__(constraint, name, param)
        # uint8 multiplies about as fast as float on a CPU at a quarter of the memory
        self.keep = constraint.mask.to(device=param.device, dtype=torch.uint8)

    def project_(self, x):
        mask_project_(x, self.keep)

    def gap(self, x):
        return self.gap_entries(x)

    def gap_entries(self, x, out=None):
        # x - x * keep = x * (1 - keep) with no (1 - keep) temporary. A CPU multiplies a float by a
        # uint8 tensor through a float copy of it; with ``out`` that copy goes there instead of a
        # fresh allocation (an accelerator casts inside the kernel)
        keep = self.keep
        if out is not None and out.device.type == "cpu" and out.dtype != keep.dtype:
            keep = out.copy_(keep)
        return torch.addcmul(x, x, keep, value=-1, out=out)

    def project_grad_(self, g, x):
        mask_project_(g, self.keep)

    def grad_gap_entries(self, g, x, out=None):
        return self.gap_entries(g, out)

    def project_scale_(self, v):
        mask_project_(v, self.keep)

    def state_tensors(self):
        return {"keep": self.keep}

    @classmethod
    def project_all_(cls, bounds, xs):
        torch._foreach_mul_(xs, [b.keep for b in bounds])

    @classmethod
    def project_grad_all_(cls, bounds, gs, xs):
        torch._foreach_mul_(gs, [b.keep for b in bounds])


# -- Fixed -----------------------------------------------------------------------------------------
class Fixed(Constraint):
    """Entries selected by ``where`` are held at ``value``: ``{W : W[where] = value[where]}``.

    ``where`` is a bool mask broadcastable to the parameter (True = held) or an index expression
    such as ``(..., 1, 1)`` (the centre of every 3x3 kernel), written as a strided in-place
    store. ``value`` is a scalar or a tensor broadcastable to the parameter, of which the selected
    entries are taken. Affine when ``value != 0``; weight decay then pulls held entries off their
    value during the wrapped step, and the post-step projection puts them back.

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

    def __init__(self, where, value=0.0):
        if isinstance(where, torch.Tensor) and where.dtype != torch.bool:
            raise ConstraintError(
                f"Fixed: where must be a bool mask or an index expression, got a {where.dtype} tensor"
            )
        self.where = where
        self.value = value if isinstance(value, (int, float)) else torch.as_tensor(value)

    def _bind(self, param, name):
        device = param.device
        if isinstance(self.where, torch.Tensor):
            check_broadcast(self.where.shape, param, name, self, "where")
            index = self.where.to(device).expand(param.shape).nonzero(as_tuple=True)
        else:
            index = self.where if isinstance(self.where, tuple) else (self.where,)
            index = tuple(i.to(device) if isinstance(i, torch.Tensor) else i for i in index)
            try:
                torch.empty(param.shape, device="meta")[index]
            except (IndexError, TypeError, RuntimeError) as err:
                raise ConstraintError(
                    f"{describe(name, param)}: Fixed index {self.where!r} does not index it ({err})"
                ) from None
        if isinstance(self.value, torch.Tensor):
            check_broadcast(self.value.shape, param, name, self, "value")
            values = self.value.to(device=device, dtype=param.dtype).expand(param.shape)[index]
            values = values.clone()
        else:
            values = torch.tensor(float(self.value), dtype=param.dtype, device=device)
        return FixedBound(self, name, param, index, values)

    def __repr__(self):
        where = (f"mask of {int(self.where.sum())} held" if isinstance(self.where, torch.Tensor)
                 else repr(self.where))
        value = "tensor" if isinstance(self.value, torch.Tensor) else repr(self.value)
        return f"Fixed({where.replace('Ellipsis', '...')}, {value})"


class FixedBound(Bound):
    projects_grad = True
    coordinatewise = True

    def __init__(self, constraint, name, param, index, values):
        super().__init__(constraint, name, param)
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

    def state_tensors(self):
        # a mask's held positions are data too: a checkpoint carries them, like Mask's keep
        positions = {f"index{i}": t for i, t in enumerate(self.index) if isinstance(t, torch.Tensor)}
        return {"values": self.values, **positions}


# -- Box ---------------------------------------------------------------------------------------------
class Box(Constraint):
    """Entries between ``low`` and ``high``: ``{W : low <= W <= high}`` (entry-wise).

    ``low`` and ``high`` are scalars, tensors broadcastable to the parameter, or None (no bound
    on that side). The projection clamps. Bounds a half-precision parameter cannot represent are
    rounded with it, so such a bound holds only to that precision.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([-2.0, 0.5, 3.0]))
    >>> with torch.no_grad():
    ...     co.Box(-1.0, torch.tensor([1.0, 1.0, 2.0])).bind(w, "w").project_(w)
    >>> w.data
    tensor([-1.0000,  0.5000,  2.0000])
    """

    def __init__(self, low=None, high=None):
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

    def _bind(self, param, name):
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

    def __init__(self):
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
        if v.dim() == 0:
            return float(v)
        if bool(v.isnan().any()):
            raise ConstraintError(f"Box: {what} has NaN entries")
        return v
    if v != v:
        raise ConstraintError(f"Box: {what} is NaN")
    return float(v)


#: below this many entries a tensor's clamp is dominated by per-call overhead, so a group of
#: them goes through one ``torch._foreach_*`` call per side; above it one fused clamp per tensor
#: (a single pass over memory) is faster (measured in benchmarks/bench_sets.py)
FOREACH_MAX_NUMEL = 16384


class BoxBound(Bound):
    coordinatewise = True

    def __init__(self, constraint, name, param, low, high):
        super().__init__(constraint, name, param)
        self.low, self.high = low, high
        # one fused pass where both bounds are of one kind (scalars, or tensors)
        self.fused = low is not None and high is not None and type(low) is type(high)

    def project_(self, x):
        if self.fused:
            x.clamp_(self.low, self.high)
        else:
            box_project_(x, self.low, self.high)

    def state_tensors(self):
        return {k: v for k, v in (("low", self.low), ("high", self.high)) if isinstance(v, torch.Tensor)}

    @classmethod
    def project_all_(cls, bounds, xs):
        small_b, small_x = [], []
        for b, x in zip(bounds, xs):
            if x.numel() >= FOREACH_MAX_NUMEL:
                b.project_(x)
            else:
                small_b.append(b)
                small_x.append(x)
        for side, op in (("low", torch._foreach_clamp_min_), ("high", torch._foreach_clamp_max_)):
            values = [getattr(b, side) for b in small_b]
            first = values[0] if values else None
            if isinstance(first, float) and all(type(v) is float and v == first for v in values):
                op(small_x, first)  # the common case: one scalar bound for the whole group
                continue
            by_scalar: dict[float, list] = {}
            tensors, bound_tensors = [], []
            for v, x in zip(values, small_x):
                if isinstance(v, float):
                    by_scalar.setdefault(v, []).append(x)
                elif v is not None:
                    tensors.append(x)
                    bound_tensors.append(v)
            for v, group in by_scalar.items():
                op(group, v)
            if tensors:
                op(tensors, bound_tensors)


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
