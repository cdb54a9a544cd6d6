"""`constrain`: constraints on an optimizer you cannot wrap, installed as step hooks on it.

Trainers that build their own optimizer (and call its ``step`` themselves) leave no place for a
`ConstrainedOptimizer`. ``co.constrain(optimizer, model, {target: constraint})`` gives the same
guarantees and the same audit through ``register_step_pre_hook`` / ``register_step_post_hook``:
the same `ConstraintEngine` does the work, so the two give the same parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from .constraints.base import Constraint
from .engine import ConstraintEngine
from .errors import ConstraintError
from .surface import EngineSurface


class ConstraintHandle(EngineSurface):
    """Constraints installed on an optimizer by `constrain`; ``remove()`` takes them off.

    ``attach``/``detach``/``project_``/``check``/``audit``/``state_dict`` behave as on
    `ConstrainedOptimizer`; ``state_dict`` holds only the constraints' part (the optimizer's
    own ``state_dict`` is saved by whoever saves the optimizer).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, engine: ConstraintEngine):
        self.optimizer = optimizer
        self.engine = engine
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    # -- the hooks ---------------------------------------------------------------------------------------
    def _before_step(self, optimizer, args, kwargs):
        """Project gradients now, or wrap the closure so each evaluation leaves them projected."""
        # torch passes the step's own arguments: args[0] is the optimizer, a closure follows it
        if kwargs.get("closure") is not None:
            return args, {**kwargs, "closure": self.engine.wrap_closure(kwargs["closure"])}
        if len(args) > 1 and args[1] is not None:
            return (args[0], self.engine.wrap_closure(args[1]), *args[2:]), kwargs
        self.engine.before_step()
        return None

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.engine.after_step()

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return bool(self._hooks)

    def remove(self) -> None:
        """Take the hooks off: later steps are the optimizer's own. The audit stays readable."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- the rest of the surface is ConstrainedOptimizer's (EngineSurface) -------------------------------
    def attach(self, target, constraint: Constraint) -> ConstraintHandle:
        """Constrain the parameters ``target`` names (see `ConstrainedOptimizer.attach`)."""
        if not self.active:
            raise ConstraintError("this constrain() handle was removed; call co.constrain again")
        return super().attach(target, constraint)

    def state_dict(self) -> dict:
        """The constraints' data, the step count and the audit (not the optimizer's state)."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)

    def __repr__(self) -> str:
        return self._describe(f"constrain({type(self.optimizer).__name__}{'' if self.active else ', removed'}")


def constrain(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    constraints: dict | None = None,
    *,
    audit_every: int = 1,
    log_every: int | None = None,
    tolerance: float | None = None,
    on_violation: str = "warn",
) -> ConstraintHandle:
    """Constrain ``optimizer`` in place: every ``optimizer.step()`` then projects gradients,
    steps, projects parameters back and audits, exactly as `ConstrainedOptimizer` would.

    The keyword arguments are `ConstrainedOptimizer`'s. Returns a `ConstraintHandle` with
    ``attach``, ``audit``, ``check`` and ``remove``. An attach of ``constraints`` that fails
    raises `ConstraintError`, changes nothing and installs no hooks.

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
    from .optimizer import ConstrainedOptimizer

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, ConstrainedOptimizer):
        raise ConstraintError("optimizer is already a ConstrainedOptimizer; attach to it instead")
    engine = ConstraintEngine(
        optimizer, model, audit_every=audit_every, log_every=log_every,
        tolerance=tolerance, on_violation=on_violation,
    )
    engine.attach_all(list((constraints or {}).items()))
    return ConstraintHandle(optimizer, engine)
