"""The two projections of a step, each in exactly one place, and what a step may need besides.

`project_grads` and `project_params` walk a binding's groups (or, for sharded parameters, the
plain-tensor groups `sharding.ShardPlan` hands over: local shards, or gathered wholes) and call
each family's grouped projection once per group, with a watcher (`audit.watch`) looking before
and after; nothing else projects during a step.
"""

from __future__ import annotations

import contextlib

import torch

from .binding import Binding
from .distributed import called_from, full, write_back_


@torch.no_grad()
def project_grads(groups, watch) -> None:
    """The one place gradients are projected onto the tangent spaces."""
    for group in groups:
        if not group.projects_grad:
            continue
        have = [(b, p) for b, p in zip(group.bounds, group.params) if p.grad is not None]
        if not have:
            continue
        bounds, params = [b for b, _ in have], [p for _, p in have]
        for p in params:
            if p.grad.is_sparse:  # nn.Embedding(sparse=True): a projected gradient is dense
                p.grad = p.grad.to_dense()
        grads = [p.grad for p in params]
        token = watch.before_grads(bounds, grads, params)
        group.kind.project_grad_all_(bounds, grads, params)
        watch.after_grads(bounds, grads, token)


@torch.no_grad()
def project_params(groups, watch) -> BaseException | None:
    """The one place parameters are projected onto their sets. Every group is projected even if
    another fails (a projection is idempotent, so a group interrupted mid-way is projected
    again); returns the first exception instead of raising it."""
    first = None
    for group in groups:
        projected = False
        try:
            token = watch.before_params(group)
            closed = None
            if watch.measures(group):  # the projection measures the gap it closes, bit for bit the same
                closed = [
                    watch.closed_size(b.project_measured_(x, watch.out_for(x)))
                    for b, x in zip(group.bounds, group.params)
                ]
            else:
                group.kind.project_all_(group.bounds, group.params)
            projected = True
            watch.after_params(group, token, closed)
        except BaseException as err:  # noqa: BLE001 - re-raised by the caller
            first = first or err
            if not projected:
                with contextlib.suppress(BaseException):  # the first error is the one reported
                    group.kind.project_all_(group.bounds, group.params)
    return first


class NoWatch:
    """A watcher that looks at nothing (``project_()`` outside a step)."""

    def measures(self, group) -> bool:
        return False

    def before_params(self, group):
        return None

    def after_params(self, group, token, closed=None) -> None:
        pass


@torch.no_grad()
def repair(binding: Binding, optimizer: torch.optim.Optimizer, positions: list[int]) -> None:
    """Held entries of parameters that went non-finite are put back exactly (a multiply by a 0/1
    mask leaves ``inf * 0 = NaN`` there), in the parameter and its optimizer state."""
    for i in positions:
        param, bound = binding.params[i], binding.ordered[i]
        x = full(param)
        bound.repair_(x)
        bound.project_(x)
        write_back_(param, x)
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                whole = full(value)
                bound.repair_(whole)
                write_back_(value, whole)


def is_initialisation_step(optimizer: torch.optim.Optimizer) -> bool:
    """torch's lr=0 step that creates optimizer state (``torch.distributed.checkpoint``'s
    ``get_state_dict`` on a fresh optimizer calls ``_init_optim_state``). It moves nothing, so
    it is neither counted, audited nor projected. Told apart by its caller, looked up only in
    the rare case it could be (no state yet, every lr 0)."""
    if optimizer.state or not all("lr" in g and float(g["lr"]) == 0.0 for g in optimizer.param_groups):
        return False
    return called_from("_init_optim_state")
