"""`constrain`: constraints on an optimizer you cannot wrap, installed on it in place.

Trainers that build their own optimizer (and call its ``step`` themselves: HF ``Trainer``,
accelerate, Lightning) leave no place for a `ConstrainedOptimizer`. ``co.constrain(optimizer,
model, {target: constraint})`` gives the same guarantees and the same audit: the optimizer's
``step`` is wrapped on the instance (the same engine runs around it, so the two give the same
parameters bit for bit), and the constraints' state rides inside the optimizer's own
``state_dict`` through torch's state-dict hooks, so whoever saves ``optimizer.state_dict()``
saves it too.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    NO_CONSTRAINT_STATE,
    LoadPlan,
    called_by_dcp,
    check_optimizer_state,
    into_param_state,
    split_constraints,
)
from .constraints.base import Constraint
from .engine import ConstraintEngine, engine_of, make_engine, release
from .errors import ConstraintError
from .surface import EngineSurface, Target


class ConstraintHandle(EngineSurface):
    """Constraints installed on an optimizer by `constrain`; ``remove()`` takes them off.

    ``attach``/``detach``/``project_``/``check``/``audit``/``state_dict`` behave as on
    `ConstrainedOptimizer`; ``state_dict`` holds only the constraints' part, which the
    optimizer's own ``state_dict`` also carries under ``"constraints"``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, engine: ConstraintEngine) -> None:
        self.optimizer = optimizer
        self.engine = engine
        self._pending: LoadPlan | None = None  # a validated checkpoint, between load pre- and post-hook
        original = optimizer.step

        @functools.wraps(original)
        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return original(*args, **kwargs)
            return self._step(original, args, kwargs)

        # a bound method, as torch's LR schedulers expect of ``optimizer.step`` (they re-wrap
        # its ``__func__``)
        self._step_wrapper = types.MethodType(step, optimizer)
        optimizer.step = self._step_wrapper  # type: ignore[method-assign]
        self._hooks = [
            optimizer.register_state_dict_post_hook(self._save_hook),
            optimizer.register_load_state_dict_pre_hook(self._validate_hook),
            optimizer.register_load_state_dict_post_hook(self._commit_hook),
        ]
        self._active = True

    # -- the step ------------------------------------------------------------------------------------------
    def _step(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwargs = dict(kwargs)
        closure = args[0] if args else kwargs.pop("closure", None)
        rest = args[1:]

        def call(c: Callable[[], float] | None) -> Any:
            return original(*rest, **kwargs) if c is None else original(c, *rest, **kwargs)

        return self.engine.run_step(call, closure, skipped=self._skipped_by_scaler)

    def _skipped_by_scaler(self) -> bool:
        """A fused optimizer under ``GradScaler`` skips its own update when ``found_inf`` is set
        (the scaler hands it over as an attribute for the step)."""
        found_inf = getattr(self.optimizer, "found_inf", None)
        return isinstance(found_inf, torch.Tensor) and bool(found_inf.item() != 0)

    # -- checkpoints through the optimizer's own state_dict --------------------------------------------
    def _save_hook(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self.active:
            if called_by_dcp():  # get_state_dict keeps the per-parameter entries only
                return into_param_state(state_dict, optimizer, self.engine.binding, self.engine.state_dict())
            state_dict["constraints"] = self.engine.state_dict()
        return state_dict

    def _validate_hook(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        if not self.active:
            return state_dict
        constraints, state_dict = split_constraints(state_dict)
        if constraints is None:
            raise ConstraintError(NO_CONSTRAINT_STATE + "; or remove() the constrain() handle first")
        plan = self.engine.plan_load(constraints)
        check_optimizer_state(optimizer, state_dict, self.engine.binding)
        self._pending = plan
        return state_dict

    def _commit_hook(self, optimizer: torch.optim.Optimizer) -> None:
        plan, self._pending = self._pending, None
        if plan is not None:
            self.engine.commit_load(plan)

    # -- the handle ------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the constraints are still installed."""
        return self._active

    def remove(self) -> None:
        """Take the constraints off: later steps and checkpoints are the optimizer's own. The
        audit stays readable."""
        if not self._active:
            return
        for hook in self._hooks:
            hook.remove()
        if self.optimizer.__dict__.get("step") is self._step_wrapper:
            del self.optimizer.step  # else something wrapped it since: ours passes through
        self._active = False
        release(self.optimizer, self.engine)

    def attach(self, target: Target, constraint: Constraint) -> ConstraintHandle:
        """Constrain the parameters ``target`` names (see `ConstrainedOptimizer.attach`)."""
        if not self.active:
            raise ConstraintError("this constrain() handle was removed; call co.constrain again")
        return super().attach(target, constraint)

    def state_dict(self) -> dict[str, Any]:
        """The constraints' data, the step count and the audit (not the optimizer's state).

        The optimizer's own ``state_dict`` carries the same under ``"constraints"``, or, under
        ``torch.distributed.checkpoint``'s ``get_state_dict``, in each constrained parameter's
        entry (``"constraint.*"`` keys; a sharded parameter's data as a DTensor shard, resharded by
        DCP). Not a collective."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what `state_dict` saved; validated whole first, so a mismatch changes nothing.
        Not a collective: each rank loads its own shards."""
        self.engine.load_state_dict(state)

    def __repr__(self) -> str:
        return self._describe(
            f"constrain({type(self.optimizer).__name__}{'' if self.active else ', removed'}"
        )


def stepping_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that actually steps: wrappers that hold it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, which subclasses ``Optimizer`` without running its ``__init__``)
    are looked through."""
    while (
        isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)
        and engine_of(optimizer) is None
        and not isinstance(getattr(optimizer, "engine", None), ConstraintEngine)
    ):
        optimizer = optimizer.optimizer  # type: ignore[attr-defined]  # a wrapper's, checked above
    return optimizer


def constrain(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    constraints: Mapping[Any, Constraint] | None = None,
    *,
    audit_every: int = 1,
    log_every: int | None = None,
    tolerance: float | None = None,
    on_violation: str = "warn",
) -> ConstraintHandle:
    """Constrain ``optimizer`` in place: every ``optimizer.step()`` then projects gradients,
    steps, projects parameters back and audits, exactly as `ConstrainedOptimizer` would, and
    ``optimizer.state_dict()`` carries the constraints' state.

    Args:
        optimizer: the optimizer that steps, or a wrapper holding it as ``.optimizer``
            (accelerate's ``AcceleratedOptimizer``); refused if it already has an engine.
        model, constraints, audit_every, log_every, tolerance, on_violation: as for
            `ConstrainedOptimizer`.

    Returns:
        A `ConstraintHandle` with ``attach``, ``audit``, ``check`` and ``remove``.

    Raises:
        ConstraintError: bad options, an optimizer that already has an engine, or constraints
            that cannot be attached; nothing is changed and nothing is installed.

    >>> import torch, constrained_optim as co
    >>> model = torch.nn.Linear(3, 3)
    >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> handle = co.constrain(sgd, model, {"weight": co.Symmetric()})
    >>> model(torch.randn(4, 3)).square().sum().backward()
    >>> sgd.step()
    >>> bool((model.weight == model.weight.T).all()), handle.steps_taken
    (True, 1)
    >>> handle.remove()
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    inner = stepping_optimizer(optimizer)
    engine = make_engine(
        inner,
        model,
        constraints,
        audit_every=audit_every,
        log_every=log_every,
        tolerance=tolerance,
        on_violation=on_violation,
    )
    try:
        return ConstraintHandle(inner, engine)
    except BaseException:
        release(inner, engine)
        raise
