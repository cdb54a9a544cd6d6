"""`ConstrainedOptimizer`: any ``torch.optim`` optimizer, with parameters kept on their sets.

Every step: project gradients onto the tangent space, run the wrapped optimizer's own step,
measure how far it moved each constrained parameter off its set (on audited steps), project
the parameters back in place, and report what is off.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from .checkpoint import called_by_dcp, check_optimizer_state, into_param_state, split_constraints
from .constraints.base import Constraint
from .engine import make_engine
from .surface import EngineSurface
from .transaction import deferred_interrupts


def shared(name: str) -> property:
    """The wrapped optimizer's attribute ``name``, read and written through."""

    def get(self: ConstrainedOptimizer) -> Any:
        return getattr(self.optimizer, name)

    def set(self: ConstrainedOptimizer, value: Any) -> None:
        setattr(self.optimizer, name, value)

    return property(get, set)


class ConstrainedOptimizer(EngineSurface, torch.optim.Optimizer):
    """Wraps ``optimizer`` so that attached constraints hold after every step.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, so LR
    schedulers, ``GradScaler``, ``zero_grad`` and ``add_param_group`` work unchanged.

    Args:
        optimizer: the ``torch.optim.Optimizer`` that steps; one that already has an engine (a
            ``ConstrainedOptimizer`` or a `constrain` handle) is refused with `ConstraintError`.
        model: the module whose parameter names targets refer to; without it parameters are
            named ``param_groups[g].params[i]``.
        constraints: ``{target: constraint}``, attached all or nothing (as `attach` for each).
        audit_every: measure every N-th step (drift, residual, gradient blocked); 0: never.
            Measuring never changes training. Non-finite values are checked every step.
        log_every: every N steps, write the latest audit through the ``"constrained_optim"``
            logger at INFO; None: never.
        tolerance: the largest residual (distance after projection) accepted on an audited step;
            None: a few float eps of each parameter's scale.
        on_violation: what a residual above ``tolerance`` does: ``"warn"`` (a warning naming the
            parameter), ``"raise"`` (`ConstraintViolation`) or ``"ignore"``. Non-finite values are
            always reported (a warning and a WARNING log record; `ConstraintViolation` under
            ``"raise"``).

    Raises:
        ConstraintError: bad options, or a constraint in ``constraints`` that cannot be attached.

    >>> import torch, constrained_optim as co
    >>> model = torch.nn.Conv2d(2, 2, 3)
    >>> opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters()), model)
    >>> opt = opt.attach("weight", co.Fixed((..., 1, 1), 0.0))
    >>> model(torch.randn(1, 2, 5, 5)).sum().backward()
    >>> _ = opt.step()
    >>> float(model.weight.detach()[..., 1, 1].abs().max())
    0.0
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        constraints: Mapping[Any, Constraint] | None = None,
        *,
        audit_every: int = 1,
        log_every: int | None = None,
        tolerance: float | None = None,
        on_violation: str = "warn",
    ) -> None:
        engine = make_engine(
            optimizer,
            model,
            constraints,
            audit_every=audit_every,
            log_every=log_every,
            tolerance=tolerance,
            on_violation=on_violation,
        )
        self.optimizer = optimizer  # param_groups, state, defaults: its own objects (see below)
        self.model = model
        self.engine = engine
        for hooks in (
            "step_pre",
            "step_post",
            "state_dict_pre",
            "state_dict_post",
            "load_state_dict_pre",
            "load_state_dict_post",
        ):
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._patch_step_function()

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Project gradients, run the wrapped optimizer's step, project parameters back, audit.

        If anything raises after the wrapped optimizer stepped, every constrained parameter is
        still projected, and ``steps_taken`` counts the inner steps that completed."""
        inner = self.optimizer
        return self.engine.run_step(lambda c: inner.step() if c is None else inner.step(c), closure)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` plus, under ``"constraints"``, each constraint's
        own data (masks, bases, values, patterns chosen at attach), the step count and the audit.

        Every tensor is a copy, so the returned dict never changes with later steps or loads. The
        wrapped optimizer's keys are unchanged, so the same checkpoint also loads into a plain
        optimizer.

        Under ``torch.distributed.checkpoint``'s ``get_state_dict(model, opt)``, which keeps only
        the per-parameter entries, the same data rides in each constrained parameter's entry
        under ``"constraint.*"`` keys instead (``checkpoint.into_param_state``); ``set_state_dict``
        and `load_state_dict` read either. With sharded parameters the constraint data of each
        shard is a DTensor sharded like the parameter (resharded by DCP like ``exp_avg``): not a
        collective, but call it on every rank, as DCP does.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), self.optimizer.state_dict())
        if called_by_dcp():
            state = into_param_state(state, self.optimizer, self.engine.binding, self.engine.state_dict())
        else:
            state["constraints"] = self.engine.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            state = state if result is None else result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of `state_dict`, so training continues as if it had not stopped.

        The same constraints must be attached to the same parameters first (attach projects the
        fresh parameters; the checkpoint's data then replaces theirs). Everything is validated
        before anything is loaded (format version, types, values and shapes of the constraint
        data, the audit, parameter groups, the shapes of constrained parameters' optimizer
        state): a checkpoint that does not fit raises `ConstraintError` saying what is wrong,
        and nothing changes, also under KeyboardInterrupt.

        A distributed checkpoint's state (``set_state_dict`` after ``dcp.load``) is read from the
        parameters' entries; a sharded parameter's data as saved by any world size, resharded.
        Not a collective: each rank validates and loads its own shards.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        constraints, state_dict = split_constraints(state_dict)
        plan = self.engine.plan_load(constraints)
        check_optimizer_state(self.optimizer, state_dict, self.engine.binding)
        inner = self.optimizer
        before = {"state": inner.state, "param_groups": inner.param_groups}
        try:
            with deferred_interrupts():
                inner.load_state_dict(state_dict)
                self.engine.commit_load(plan)
        except BaseException:
            inner.__setstate__(before)  # torch's load builds new objects: the old ones are intact
            raise
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -- the wrapped optimizer's own objects --------------------------------------------------------------
    # properties, so that they stay shared when the wrapped optimizer replaces them (its
    # load_state_dict builds new param_groups and state)
    param_groups = shared("param_groups")
    state = shared("state")
    defaults = shared("defaults")

    # -- the rest of torch.optim.Optimizer -------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return self._describe(f"ConstrainedOptimizer({self.optimizer!r}")
