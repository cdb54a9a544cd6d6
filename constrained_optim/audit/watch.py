"""Watchers of the step: they look at the tensors around the one projection, never project.

The engine projects gradients and parameters in exactly one place each; around each group's
projection it calls a watcher's ``before_*`` and ``after_*``:

- `FiniteWatch` (unaudited steps) keeps each parameter's norm after projection, so a NaN or inf
  is found with one batched reduction and one host read per step;
- `AuditWatch` (audited steps) measures, on the real tensors, ``||g||`` and ``||g - P_T(g)||``
  around the gradient projection, ``||x - P(x)||`` and ``max |x - P(x)|`` of the parameter
  projection (from the gap the projection itself returns where ``traits.measured_projection``,
  from the family's cheap gap where ``traits.cheap_gap``, else from a copy taken before it), the
  residual after it (no pass where ``traits.exact``: the projection put the parameter on the set
  bitwise, so it is 0, or non-finite with the parameter) and ``||x||``.
  Every number stays a 0-d tensor until ``finish`` reads the whole step with one device-to-host
  copy per device.

Either way the parameters get the same bits (a measured projection is the projection's own
arithmetic, tested against it bit for bit), so auditing cannot change training.
"""

from __future__ import annotations

import math

import torch

from ..binding import Group
from ..constraints.base import Bound
from .measure import Scratch, all_finite, fetch, norms


class FiniteWatch:
    """Unaudited steps: the parameters' norms after projection, for the non-finite check."""

    audited = False

    def __init__(self, scratch: Scratch | None = None):
        self._norms: list[torch.Tensor] = []

    def before_grads(self, bounds, grads, params):
        return None

    def after_grads(self, bounds, grads, token) -> None:
        pass

    def measures(self, group: Group) -> bool:
        """Whether the projection of ``group`` should measure the gap it closes."""
        return False

    def before_params(self, group: Group):
        return None

    def after_params(self, group: Group, token, closed=None) -> None:
        if group.params:
            self._norms += norms(group.params)[0]

    def columns(self, bounds) -> list[list[torch.Tensor]]:
        """The step's numbers as columns of 0-d tensors, one entry per bound in group order, not
        yet read: ``[||x||]`` here (sharded training reduces them across ranks first)."""
        return [self._norms]

    def nonfinite(self) -> list[int] | None:
        """Positions (in group order) of parameters holding NaN or inf, or None if all finite."""
        if not self._norms or all_finite(self._norms):
            return None
        rows = fetch([self._norms])
        return [i for i, (n,) in enumerate(rows) if not math.isfinite(n)]


class AuditWatch(FiniteWatch):
    """Audited steps: drift, residual and the share of each gradient blocked."""

    audited = True

    def __init__(self, scratch: Scratch):
        super().__init__()
        self.scratch = scratch
        self._blocked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(bound) -> (removed, total)
        self._drift: list[torch.Tensor] = []
        self._drift_max: list[torch.Tensor] = []
        self._residual: list[torch.Tensor] = []

    # -- gradients ---------------------------------------------------------------------------------
    def before_grads(self, bounds, grads, params):
        # each gradient's norm, then (a cheap measure) its removed part while it is still in
        # cache; without one, a copy to subtract from after the projection
        cheap, rest = _split(bounds, "cheap_grad_gap")
        both, _ = norms(
            _pairs(
                [grads[i] for i in cheap],
                lambda k, g: bounds[cheap[k]].grad_gap_entries(g, params[cheap[k]], self.scratch.like(g)),
            )
        )
        total, _ = norms([grads[i] for i in rest])
        return cheap, both, rest, total, [grads[i].clone() for i in rest]

    def after_grads(self, bounds, grads, token) -> None:
        cheap, both, rest, total, before = token
        for k, i in enumerate(cheap):
            self._blocked[id(bounds[i])] = (both[2 * k + 1], both[2 * k])
        if rest:
            torch._foreach_sub_(before, [grads[i] for i in rest])
            removed, _ = norms(_drain(before))
            for i, r, t in zip(rest, removed, total):
                self._blocked[id(bounds[i])] = (r, t)

    # -- parameters ----------------------------------------------------------------------------------
    def measures(self, group: Group) -> bool:
        # every bound of the group measures its own gap: its projection is the measuring pass
        return all(b.traits.measured_projection for b in group.bounds)

    def out_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """A buffer shaped like ``x`` for a gap that `closed_size` reduces before the next."""
        return self.scratch.like(x)

    def closed_size(self, gap) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm, max)`` of a gap a measured projection returned, reduced now (it may lie in
        the scratch buffer the next one reuses)."""
        (n,), (m,) = norms([gap], with_max=True)
        return n, m

    def before_params(self, group: Group):
        if self.measures(group):
            return None  # measured by the projection itself
        bounds, params = group.bounds, group.params
        cheap, rest = _split(bounds, "cheap_gap")
        measured = norms(
            (bounds[i].gap_entries(params[i], self.scratch.like(params[i])) for i in cheap), with_max=True
        )
        return cheap, measured, rest, [params[i].clone() for i in rest]

    def after_params(self, group: Group, token, closed=None) -> None:
        """``closed``: the ``(norm, max)`` of each gap a measured projection closed (`measures`)."""
        if closed is not None:
            drift = [n for n, _ in closed]
            drift_max = [m for _, m in closed]
        else:
            drift, drift_max = self._drifts(group, token)
        self._drift += drift
        self._drift_max += drift_max
        bounds, params = group.bounds, group.params
        exact = [_lands_exactly(b, p) for b, p in zip(bounds, params)]
        if all(exact):
            # an exact projection lands on the set bitwise: what is left is 0, or non-finite where
            # the parameter is (0 * ||x||); no second pass over the parameter
            found, _ = norms(params)
            self._norms += found
            self._residual += torch._foreach_mul(found, 0.0)
            return
        rest = [i for i, e in enumerate(exact) if not e]
        both, _ = norms(
            _pairs([params[i] for i in rest], lambda k, p: bounds[rest[k]].residual(p, self.scratch.like(p)))
        )
        plain, _ = norms([p for p, e in zip(params, exact) if e])
        measured_norms = dict(zip(rest, both[0::2]))
        measured_residuals = dict(zip(rest, both[1::2]))
        plain_iter = iter(plain)
        for i, e in enumerate(exact):
            if e:
                n = next(plain_iter)
                self._norms.append(n)
                self._residual.append(n * 0.0)
            else:
                self._norms.append(measured_norms[i])
                self._residual.append(measured_residuals[i])

    def _drifts(self, group: Group, token) -> tuple[list, list]:
        cheap, (cheap_norm, cheap_max), rest, before = token
        drift: list = [None] * len(group.params)
        drift_max: list = [None] * len(group.params)
        for k, i in enumerate(cheap):
            drift[i], drift_max[i] = cheap_norm[k], cheap_max[k]
        if rest:
            torch._foreach_sub_(before, [group.params[i] for i in rest])
            rest_norm, rest_max = norms(_drain(before), with_max=True)
            for k, i in enumerate(rest):
                drift[i], drift_max[i] = rest_norm[k], rest_max[k]
        return drift, drift_max

    def columns(self, bounds) -> list[list[torch.Tensor]]:
        """``[drift, drift_max, residual, removed, total, ||x||]`` as columns of 0-d tensors per
        bound in group order (``removed`` and ``total``: the norms of the gradient's removed part
        and of the gradient, nan where there was no gradient projection)."""
        nan = {}
        removed, total = [], []
        for b, d in zip(bounds, self._drift):
            pair = self._blocked.get(id(b))
            if pair is None:
                if d.device not in nan:
                    nan[d.device] = torch.full((), math.nan, device=d.device)
                pair = (nan[d.device], nan[d.device])
            removed.append(pair[0])
            total.append(pair[1])
        return [self._drift, self._drift_max, self._residual, removed, total, self._norms]

    def rows(self, bounds) -> list[tuple[float, float, float, float, float]]:
        """``(drift, drift_max, residual, grad_blocked, ||x||)`` per bound in group order, read with
        one host copy per device."""
        return as_rows(fetch(self.columns(bounds)))


def as_rows(values) -> list[tuple[float, float, float, float, float]]:
    """Rows of `AuditWatch.columns` read as floats (``fetch``), with the share of each gradient
    blocked in place of the removed and total norms."""
    return [(d, dm, r, rm / t if t > 0 else math.nan, n) for d, dm, r, rm, t, n in values]


def _lands_exactly(bound, param) -> bool:
    """Whether the projection just taken put ``param`` on the set bitwise (``traits.exact``, in
    the parameter's own precision: a half-precision parameter is projected in float32 and
    rounded, which a held value need not survive). A family that measures its residual otherwise
    (an intersection: the distance to every member, which shows an empty one) is measured."""
    return (
        bound.traits.exact
        and param.dtype not in (torch.float16, torch.bfloat16)
        and type(bound).residual is Bound.residual
    )  # an intersection measures each member


def _split(bounds, trait: str) -> tuple[list[int], list[int]]:
    """Positions of the bounds with ``trait`` set, and of the rest."""
    has = [getattr(b.traits, trait) for b in bounds]
    return [i for i, h in enumerate(has) if h], [i for i, h in enumerate(has) if not h]


def _pairs(tensors, second):
    """``t_0, second(0, t_0), t_1, second(1, t_1), ...``: each pair read while in cache."""
    for i, t in enumerate(tensors):
        yield t
        yield second(i, t)


def _drain(items: list):
    """Yield and drop the items of a list, so each is freed once it has been read."""
    items.reverse()
    while items:
        yield items.pop()
