"""Which bound constrains which parameter, grouped once for the step.

A `Binding` is built whole and never changed: attach, detach, a load and a cast each build a new
one and swap it in with one assignment, so the engine never holds a half-updated grouping.
Bounds are grouped by family, whether they project gradients, device and dtype: the grouped
(``torch._foreach_*``) paths of a family run once per group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .constraints.base import Bound


@dataclass(frozen=True)
class Group:
    """Bounds of one family on one device and dtype, with their parameters (or stand-ins for
    them: the full tensors of sharded parameters)."""

    kind: type[Bound]
    bounds: list[Bound]
    params: list[torch.Tensor]
    projects_grad: bool
    device: torch.device
    dtype: torch.dtype

    def with_params(self, params: list[torch.Tensor]) -> Group:
        return Group(self.kind, self.bounds, params, self.projects_grad, self.device, self.dtype)


class Binding:
    """Parameter -> bound, and the groups the step walks, in attach order."""

    def __init__(
        self,
        bounds: dict[nn.Parameter, Bound] | None = None,
        owners: dict[nn.Parameter, nn.Module | None] | None = None,
    ):
        self.bounds: dict[nn.Parameter, Bound] = dict(bounds or {})
        # the module holding each parameter, for rebinding after a cast (layout-aware defaults)
        self.owners = {p: (owners or {}).get(p) for p in self.bounds}
        keyed: dict[tuple, tuple[list, list]] = {}
        for param, bound in self.bounds.items():
            # a sharded parameter's bound stands for its family (`sharding`): the audit's order
            # is the same whatever the parameters' placements
            key = (
                getattr(bound, "family", type(bound)),
                bound.traits.projects_grad,
                param.device,
                param.dtype,
            )
            bs, ps = keyed.setdefault(key, ([], []))
            bs.append(bound)
            ps.append(param)
        self.groups = [
            Group(kind, bs, ps, grad, device, dtype)
            for (kind, grad, device, dtype), (bs, ps) in keyed.items()
        ]
        # names and descriptions in group order, for the audit (a repr may read data: once here)
        ordered = [b for g in self.groups for b in g.bounds]
        self.names = [b.name for b in ordered]
        self.labels = [repr(b.constraint) for b in ordered]
        self.params = [p for g in self.groups for p in g.params]
        self.ordered = ordered

    def replaced(self, changes: Mapping[nn.Parameter, Bound | None], owners: dict | None = None) -> Binding:
        """A new binding with ``changes`` applied (None removes a parameter's bound)."""
        bounds = dict(self.bounds)
        for param, bound in changes.items():
            if bound is None:
                bounds.pop(param, None)
            else:
                bounds[param] = bound
        return Binding(bounds, {**self.owners, **(owners or {})})

    def stale(self) -> list[nn.Parameter]:
        """Parameters cast or moved since they were grouped (``model.to(...)``)."""
        # a binding's own groups hold the parameters themselves (stand-ins only in with_params copies)
        stale = [p for g in self.groups for p in g.params if p.dtype != g.dtype or p.device != g.device]
        return cast("list[nn.Parameter]", stale)

    def __len__(self) -> int:
        return len(self.bounds)
