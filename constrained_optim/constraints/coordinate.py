"""Coordinate sets: entries held at zero (`Mask`) or at given values (`Fixed`).

Both are linear (affine for `Fixed` with a non-zero value) and axis-aligned, so the projection,
the tangent projection and the handling of optimizer state are all the same entry-wise rule.
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
        where = "mask" if isinstance(self.where, torch.Tensor) else repr(self.where)
        value = "tensor" if isinstance(self.value, torch.Tensor) else repr(self.value)
        return f"Fixed({where.replace('Ellipsis', '...')}, {value})"


class FixedBound(Bound):
    projects_grad = True

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
        return {"values": self.values}


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
