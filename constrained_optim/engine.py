"""The mechanism behind `ConstrainedOptimizer` and `constrain`: bound constraints and the step.

`ConstraintEngine` holds, for one optimizer, each constrained parameter's `Bound`, grouped once
by family, device and dtype. Around the optimizer's own step it projects gradients
(`before_step`), then projects parameters back and audits (`after_step`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections import defaultdict

import torch
from torch import nn

from .audit import Audit
from .audit.measure import (Scratch, all_finite, fetch, norms, project_grads_measured_,
                            project_measured_, residuals)
from .constraints.base import Bound, Constraint
from .errors import ConstraintError, ConstraintViolation, describe
from .selection import parameter_names, select
from .state import project_state_

log = logging.getLogger("constrained_optim")

ON_VIOLATION = ("warn", "raise", "ignore")


def default_atol(param_norm: float, dtype: torch.dtype) -> float:
    """A few float eps relative to the parameter's scale."""
    return 16 * torch.finfo(dtype).eps * max(1.0, param_norm)


class ConstraintEngine:
    """Constraints bound to the parameters of one optimizer, and the work around its step."""

    def __init__(self, optimizer, model=None, *, audit_every=1, log_every=None, tolerance=None,
                 on_violation="warn"):
        if not isinstance(audit_every, int) or audit_every < 0:
            raise ConstraintError(f"audit_every must be an int >= 0, got {audit_every!r}")
        if log_every is not None and (not isinstance(log_every, int) or log_every < 1):
            raise ConstraintError(f"log_every must be None or an int >= 1, got {log_every!r}")
        if tolerance is not None and not tolerance >= 0:
            raise ConstraintError(f"tolerance must be None or >= 0, got {tolerance!r}")
        if on_violation not in ON_VIOLATION:
            raise ConstraintError(f"on_violation must be one of {ON_VIOLATION}, got {on_violation!r}")
        self.optimizer = optimizer
        self.model = model
        self.audit_every = audit_every
        self.log_every = log_every
        self.tolerance = tolerance
        self.on_violation = on_violation
        self.audit = Audit()
        self.steps_taken = 0
        self.bounds: dict[nn.Parameter, Bound] = {}
        self._groups: list[tuple[type[Bound], list[Bound], list[nn.Parameter]]] = []
        self._measure = False
        self._blocked: dict[nn.Parameter, torch.Tensor] = {}

    # -- binding -------------------------------------------------------------------------------------
    def attach(self, target, constraint: Constraint) -> ConstraintEngine:
        """Constrain the parameters ``target`` names to ``constraint``'s set, from now on.

        The parameters and the optimizer state already held for them are projected at once. A
        second constraint on a parameter means the intersection. Raises `ConstraintError` and
        changes nothing if the target matches nothing, a parameter is not held by the wrapped
        optimizer, or the constraint cannot take a parameter's shape or dtype.
        """
        if not isinstance(constraint, Constraint):
            raise ConstraintError(
                f"attach({target!r}, ...) needs a constraint such as co.Mask(...), "
                f"got {type(constraint).__name__}"
            )
        pairs = select(target, parameter_names(self.model, self.optimizer))
        held = {p for group in self.optimizer.param_groups for p in group["params"]}
        new: dict[nn.Parameter, Bound] = {}
        for name, param in pairs:  # resolve everything first: a failure changes nothing
            if param not in held:
                raise ConstraintError(
                    f"{describe(name, param)} is not held by the wrapped "
                    f"{type(self.optimizer).__name__}; add it with add_param_group first"
                )
            bound = constraint.bind(param, name)
            if param in self.bounds:
                bound = combine(self.bounds[param], bound, param, name)
            new[param] = bound
        with torch.no_grad():
            for param, bound in new.items():
                bound.project_(param)
                project_state_(bound, self.optimizer.state.get(param, {}), param)
                self.bounds[param] = bound
        self._regroup()
        return self

    def detach(self, target) -> ConstraintEngine:
        """Remove every constraint from the parameters ``target`` names."""
        pairs = select(target, parameter_names(self.model, self.optimizer))
        bound = [p for _, p in pairs if p in self.bounds]
        if not bound:
            raise ConstraintError(
                f"detach({target!r}): no constrained parameter among {[n for n, _ in pairs]}"
            )
        for param in bound:
            del self.bounds[param]
        self._regroup()
        return self

    def _regroup(self) -> None:
        """Group bounds by family, device and dtype once, for the grouped (foreach) paths."""
        groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
        for param, bound in self.bounds.items():
            bounds, params = groups[(type(bound), param.device, param.dtype)]
            bounds.append(bound)
            params.append(param)
        self._groups = [(key[0], b, p) for key, (b, p) in groups.items()]

    # -- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def project_(self) -> None:
        """Project every constrained parameter onto its set now."""
        for kind, bounds, params in self._groups:
            kind.project_all_(bounds, params)

    @torch.no_grad()
    def _project_grads_(self, measure: bool) -> dict[Bound, tuple]:
        """Project gradients onto the tangent spaces; on audited steps also return, per bound,
        ``(||g - P_T(g)||, ||g||)`` as 0-d tensors (read on the host with the rest of the step).
        Keyed by bound, which stays the same object when parameters are stood in for (sharded
        ones by their full tensors)."""
        blocked = {}
        for kind, bounds, params in self._groups:
            if not kind.projects_grad:
                continue
            have = [(b, p) for b, p in zip(bounds, params) if p.grad is not None]
            if not have:
                continue
            bs, ps = (list(t) for t in zip(*have))
            grads = [p.grad for p in ps]
            if not measure:
                kind.project_grad_all_(bs, grads, ps)
                continue
            removed, total = project_grads_measured_(kind, bs, grads, ps, self._audit_scratch())
            blocked.update(zip(bs, zip(removed, total)))
        return blocked

    def _audit_due(self) -> bool:
        return self.audit_every > 0 and (self.steps_taken + 1) % self.audit_every == 0

    def before_step(self) -> None:
        """Project the gradients the step is about to use."""
        self._measure = self._audit_due()
        self._blocked = self._project_grads_(self._measure)

    def wrap_closure(self, closure):
        """A closure whose every evaluation (LBFGS re-evaluates) leaves projected gradients."""
        self._measure = self._audit_due()
        self._blocked = {}

        def projected_closure():
            loss = closure()
            self._blocked.update(self._project_grads_(self._measure))
            return loss

        return projected_closure

    def after_step(self) -> None:
        """Count the step, project parameters back onto their sets, audit."""
        self.steps_taken += 1
        self._after_step(self._measure, self._blocked)
        self._blocked = {}

    @torch.no_grad()
    def _after_step(self, measure: bool, blocked: dict) -> None:
        """Project every constrained parameter back onto its set and check it for non-finite
        values (every step: one norm per parameter, one sync). On audited steps also measure
        drift, residual and grad_blocked on the real tensors, turned into Python numbers once
        for the whole step; then record, log, and check the tolerance."""
        groups = self._groups
        params = [p for _, _, ps in groups for p in ps]
        bounds = [b for _, bs, _ in groups for b in bs]
        if not measure:
            self.project_()
            if params:
                param_norms = norms(params)[0]
                if not all_finite(param_norms):
                    self._report_nonfinite([row[0] for row in fetch([param_norms])])
            self._log_audit()
            return
        drift, drift_max, residual = [], [], []
        for kind, bs, ps in groups:
            d, m = project_measured_(kind, bs, ps, self._audit_scratch())
            drift += d
            drift_max += m
        if not params:
            return
        param_norms = []
        for _, bs, ps in groups:
            r, n = residuals(bs, ps, self._audit_scratch())
            residual += r
            param_norms += n
        nan = {}
        for b, p in zip(bounds, params):
            if b not in blocked and p.device not in nan:
                nan[p.device] = torch.full((), math.nan, device=p.device)
        removed = [blocked[b][0] if b in blocked else nan[p.device] for b, p in zip(bounds, params)]
        total = [blocked[b][1] if b in blocked else nan[p.device] for b, p in zip(bounds, params)]
        rows = fetch([drift, drift_max, residual, removed, total, param_norms])  # the one sync
        names, constraints = self._audit_labels()
        records = self.audit.add(
            self.steps_taken, names, constraints,
            [(d, dm, r, rm / t if t > 0 else math.nan) for d, dm, r, rm, t, _ in rows],
        )
        norms_host = [row[5] for row in rows]
        self._log_audit()
        if not all(math.isfinite(n) for n in norms_host):
            self._report_nonfinite(norms_host)
        self._check_residuals(records, params, norms_host)

    def _audit_scratch(self) -> Scratch:
        scratch = getattr(self, "_scratch", None)
        if scratch is None:
            scratch = self._scratch = Scratch()
        return scratch

    def _audit_labels(self) -> tuple[list[str], list[str]]:
        """Names and constraint descriptions in group order, computed once per grouping (a
        constraint's repr may read its data)."""
        bounds = tuple(b for _, bs, _ in self._groups for b in bs)
        cache = getattr(self, "_labels_cache", None)
        if cache is None or cache[0] != bounds:  # identity: Bound has no __eq__
            cache = (bounds, [b.name for b in bounds], [repr(b.constraint) for b in bounds])
            self._labels_cache = cache
        return cache[1], cache[2]

    def _log_audit(self) -> None:
        """Every ``log_every`` steps, the latest audited step as one INFO block."""
        if not (self.log_every and self.steps_taken % self.log_every == 0 and self.audit.last):
            return
        if log.isEnabledFor(logging.INFO):
            from .report import log_step

            log_step(log, self.steps_taken, self.audit.last)

    def _report_nonfinite(self, param_norms) -> None:
        names, constraints = self._audit_labels()
        bad = [i for i, n in enumerate(param_norms) if not math.isfinite(n)]
        self.audit.note_nonfinite(self.steps_taken, [names[i] for i in bad], [constraints[i] for i in bad])
        message = (f"step {self.steps_taken}: non-finite values in constrained parameter"
                   f"{'s' if len(bad) > 1 else ''} {', '.join(names[i] for i in bad)}")
        log.warning(message)
        if self.on_violation == "raise":
            raise ConstraintViolation(message)
        warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())

    def _check_residuals(self, records, params, param_norms) -> None:
        """A residual above ``tolerance`` (default: a few float eps of the parameter's norm)."""
        if self.on_violation == "ignore":
            return
        off = []
        for r, p, n in zip(records, params, param_norms):
            limit = self.tolerance if self.tolerance is not None else default_atol(n, p.dtype)
            if math.isfinite(n) and not r.residual <= limit:
                off.append(f"{r.name} (residual {r.residual:.3g} > tolerance {limit:.3g}, {r.constraint})")
        if not off:
            return
        message = f"step {self.steps_taken}: off the set after projection: {'; '.join(off)}"
        if self.on_violation == "raise":
            raise ConstraintViolation(message)
        warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())

    # -- checks ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def check(self, atol: float | None = None) -> None:
        """Raise `ConstraintViolation` naming every parameter off its set, with its distance."""
        off = []
        for param, bound in self.bounds.items():
            distance = float(bound.gap(param).norm())
            scale = float(param.norm())
            limit = atol if atol is not None else default_atol(scale, param.dtype)
            if not (distance <= limit and math.isfinite(scale)):
                off.append(f"{bound.name}: distance {distance:.3g} > {limit:.3g} from {bound.constraint!r}")
        if off:
            raise ConstraintViolation("off the set: " + "; ".join(off))



def combine(old: Bound, new: Bound, param, name) -> Bound:
    """The intersection of two constraints on one parameter."""
    raise ConstraintError(
        f"{describe(name, param)} already has {old.constraint!r}; attaching {new.constraint!r} "
        "as well needs Intersection support"
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line calling ``step``, past this
    package and torch's step and ``no_grad`` wrappers."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level
