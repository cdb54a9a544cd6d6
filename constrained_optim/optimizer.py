"""`ConstrainedOptimizer`: any ``torch.optim`` optimizer, with parameters kept on their sets.

Every step: project gradients onto the tangent space, run the wrapped optimizer's own step,
measure how far it moved each constrained parameter off its set (on audited steps), project
the parameters back in place, and report what is off.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .engine import ConstraintEngine
from .errors import ConstraintError
from .surface import EngineSurface


def shared(name: str) -> property:
    """The wrapped optimizer's attribute ``name``, read and written through."""
    return property(lambda self: getattr(self.optimizer, name),
                    lambda self, value: setattr(self.optimizer, name, value))


class ConstrainedOptimizer(EngineSurface, torch.optim.Optimizer):
    """Wraps ``optimizer`` so that attached constraints hold after every step.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, so LR
    schedulers, ``GradScaler``, ``zero_grad`` and ``add_param_group`` work unchanged.

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
        constraints: dict | None = None,
        *,
        audit_every: int = 1,
        log_every: int | None = None,
        tolerance: float | None = None,
        on_violation: str = "warn",
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ConstrainedOptimizer):
            raise ConstraintError("optimizer is already a ConstrainedOptimizer; attach to it instead")
        self.optimizer = optimizer  # param_groups, state, defaults: its own objects (see below)
        self.model = model
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                      "load_state_dict_pre", "load_state_dict_post"):
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._patch_step_function()

        self.engine = ConstraintEngine(
            optimizer, model, audit_every=audit_every, log_every=log_every,
            tolerance=tolerance, on_violation=on_violation,
        )
        self.engine.attach_all(list((constraints or {}).items()))

    def step(self, closure=None):
        """Project gradients, run the wrapped optimizer's step, project parameters back, audit."""
        if closure is None:
            self.engine.before_step()
            loss = self.optimizer.step()
        else:
            loss = self.optimizer.step(self.engine.wrap_closure(closure))
        self.engine.after_step()
        return loss

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The wrapped optimizer's ``state_dict`` plus, under ``"constraints"``, each constraint's
        own data (masks, bases, values, patterns chosen at attach), the step count and the audit.

        The wrapped optimizer's keys are unchanged, so the same checkpoint also loads into a plain
        optimizer.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = self.optimizer.state_dict()
        state["constraints"] = self.engine.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            state = state if result is None else result
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of `state_dict`, so training continues as if it had not stopped.

        The same constraints must be attached to the same parameters first (attach projects the
        fresh parameters; the checkpoint's data then replaces theirs). Everything is checked
        before anything is loaded: a checkpoint whose constraints differ (other targets, shapes
        or constraint types) or whose parameter groups differ raises `ConstraintError` saying
        what differs, and changes nothing.
        """
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        constraints = state_dict.pop("constraints", None)
        self.engine.validate_state_dict(constraints)
        check_groups(self.optimizer, state_dict)
        self.optimizer.load_state_dict(state_dict)
        self.engine.load_state_dict(constraints)
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

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return self._describe(f"ConstrainedOptimizer({self.optimizer!r}")


def check_groups(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, made before anything is loaded."""
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list) or not isinstance(state_dict.get("state"), dict):
        raise ConstraintError("the checkpoint holds no optimizer state (no 'state' and 'param_groups')")
    here = [len(g["params"]) for g in optimizer.param_groups]
    there = [len(g["params"]) for g in saved]
    if here != there:
        raise ConstraintError(
            f"the checkpoint's parameter groups hold {there} parameters, the wrapped "
            f"{type(optimizer).__name__}'s hold {here} (nothing was loaded)"
        )
