"""Attach-time work, resolved once: which bound each target's parameters get, and the writes
that project a parameter and the optimizer state held for it (computed on copies, so the engine
commits them at once or not at all). Also the rebinding of a parameter cast after attach, and
the projection of another module's parameters of the same names."""

from __future__ import annotations

import torch
from torch import nn

from .binding import Binding
from .constraints.base import Bound, Constraint
from .constraints.composite import Intersection, intersect_bounds
from .distributed import full, local, local_part
from .errors import ConstraintError, describe
from .selection import ParamIndex, select
from .sharding import globalize
from .state import projected_state, restarted_history

Writes = list[tuple[torch.Tensor, torch.Tensor]]  # (destination, value) for one _foreach_copy_


def resolve(
    items, binding: Binding, model: nn.Module | None, optimizer: torch.optim.Optimizer
) -> tuple[dict[nn.Parameter, Bound], dict[nn.Parameter, nn.Module | None]]:
    """The new bound (and owning module) of every parameter the ``(target, constraint)`` items
    name, intersected with what it already has; raises `ConstraintError`, changes nothing."""
    if items and isinstance(optimizer, torch.optim.SparseAdam):
        raise ConstraintError(
            "SparseAdam takes sparse gradients only, and a gradient projected onto a "
            "constraint's tangent space is dense; use Adam or SGD for constrained parameters"
        )
    index = ParamIndex(model, optimizer)
    held = {p for group in optimizer.param_groups for p in group["params"]}
    new: dict[nn.Parameter, Bound] = {}
    owners: dict[nn.Parameter, nn.Module | None] = {}
    for target, constraint in items:
        if not isinstance(constraint, Constraint):
            raise ConstraintError(
                f"attach({target!r}, ...) needs a constraint such as co.Mask(...), "
                f"got {type(constraint).__name__}"
            )
        for match in select(target, index):
            param = match.param
            if param not in held:
                raise ConstraintError(
                    f"{describe(match.name, param)} is not held by the wrapped "
                    f"{type(optimizer).__name__}; add it with add_param_group first"
                )
            earlier = new.get(param, binding.bounds.get(param))
            if earlier is not None and holds(earlier.constraint, constraint):
                continue  # the same constraint again: the same set, the same cost
            whole = full(param)  # a sharded parameter: its global tensor
            bound = constraint.bind(whole, match.name, match.owner)
            if earlier is not None:  # a sharded parameter's bound held for its shard: made whole again
                earlier = globalize(earlier, param, binding.owners.get(param, match.owner))
            new[param] = bound if earlier is None else intersect_bounds(earlier, bound, whole, match.name)
            owners[param] = match.owner
    return new, owners


def holds(have: Constraint, new: Constraint) -> bool:
    """Whether the set ``have`` already includes every member of ``new`` (the same constraints)."""
    mine = have.constraints if isinstance(have, Intersection) else [have]
    theirs = new.constraints if isinstance(new, Intersection) else [new]
    return all(any(m.same_as(t) for m in mine) for t in theirs)


@torch.no_grad()
def projection_writes(new: dict[nn.Parameter, Bound], optimizer: torch.optim.Optimizer, true=lambda v: v):
    """The writes that project each parameter and the optimizer state held for it, computed on
    copies from the state's true values (``true(v)``: without the engine's filler); and the
    LBFGS states to restart (``(state dict, its new contents)``)."""
    writes: Writes = []
    for param, bound in new.items():
        x = full(param).detach().clone()
        bound.project_(x)
        writes.append((local(param), local_part(param, x)))
        state = optimizer.state.get(param, {})
        whole = {k: full(true(v)) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        for key, value in projected_state(bound, whole, x).items():
            writes.append((local(state[key]), local_part(state[key], value)))
    lbfgs = [
        (s, fresh) for s in optimizer.state.values() if (fresh := restarted_history(optimizer, s)) is not None
    ]
    return writes, lbfgs


def rebound_after_casts(binding: Binding) -> dict[nn.Parameter, Bound]:
    """New bounds for the parameters cast or moved since they were bound (``model.to(...)``),
    keeping their data where binding afresh does not reproduce it (a pattern chosen at attach
    stays the one chosen)."""
    changes = {}
    for param in binding.stale():
        old = globalize(binding.bounds[param], param, binding.owners.get(param))
        fresh = old.constraint.bind(full(param), old.name, binding.owners.get(param))
        target = fresh.state_tensors()
        changes[param] = (
            fresh
            if reproduces(fresh, old)
            else fresh.with_state(
                {
                    k: v.to(device=target[k].device, dtype=target[k].dtype)
                    for k, v in old.state_tensors().items()
                }
            )
        )
    return changes


def reproduces(fresh: Bound, old: Bound) -> bool:
    """Whether binding afresh gave back ``old``'s data (derived data, such as an orthonormalised
    basis, is then kept at the new precision); data chosen at attach or loaded from a checkpoint
    (an N:M pattern) differs, and is carried over instead."""
    mine, theirs = fresh.state_tensors(), old.state_tensors()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == v.shape and torch.equal(mine[k].to(device=v.device, dtype=v.dtype), v)
        for k, v in theirs.items()
    )


@torch.no_grad()
def module_writes(binding: Binding, module: nn.Module) -> Writes:
    """The writes that project ``module``'s parameters of the constrained names (an averaged or
    EMA copy, names possibly under a wrapper's prefix); raises `ConstraintError` listing every
    name that is missing, ambiguous or of another shape."""
    index = ParamIndex(module, None)
    plan, problems = [], []
    for param, bound in binding.bounds.items():
        bound = globalize(bound, param, binding.owners.get(param))  # sharded: a collective
        target = index.lookup(bound.name)
        if target is None:
            found = [t for n, t in index.names.items() if n.endswith("." + bound.name)]
            if len(found) != 1:
                problems.append(f"{bound.name}: {'no' if not found else len(found)} parameters of that name")
                continue
            target = found[0]
        if tuple(target.shape) != bound.shape:
            problems.append(f"{bound.name}: shape {tuple(target.shape)}, expected {bound.shape}")
        else:
            plan.append((bound, param, target))
    if problems:
        raise ConstraintError(
            f"project_module_({type(module).__name__}): nothing was projected:\n  " + "\n  ".join(problems)
        )
    writes: Writes = []
    for bound, param, target in plan:
        whole = full(target)
        moved = whole.detach().to(device=local(param).device, dtype=param.dtype, copy=True)
        bound.project_(moved)
        writes.append((local(target), local_part(target, moved.to(whole.dtype))))
    return writes
