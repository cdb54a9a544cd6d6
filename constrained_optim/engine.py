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
from contextlib import contextmanager

import torch
from torch import nn

from .audit import Audit
from .audit.measure import (Scratch, all_finite, fetch, norms, project_grads_measured_,
                            project_measured_, residuals)
from .constraints.base import Bound, Constraint
from .distributed import FullView, full, full_tensors, local, write_back_
from .errors import ConstraintError, ConstraintViolation, describe
from .selection import parameter_names, select
from .state import project_state_, restart_history_

log = logging.getLogger("constrained_optim")

ON_VIOLATION = ("warn", "raise", "ignore")


def default_atol(param_norm: float, param: torch.Tensor) -> float:
    """A few float eps relative to the parameter's scale.

    The scale is its norm, times ``sqrt(min(m, k))`` of its ``(m, k)`` matrix view: rounding in
    an SVD-based projection (`Orthogonal`, `LowRank`) grows with the matrix's size, while exact
    projections leave 0 whatever the size."""
    rows = param.shape[0] if param.dim() >= 2 else 1
    side = min(rows, param.numel() // max(rows, 1)) if param.numel() else 1
    return 16 * torch.finfo(param.dtype).eps * max(1.0, param_norm) * math.sqrt(max(side, 1))


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
        self._full_view = FullView([])
        self._groups_are_full = False
        self._scratch = Scratch()  # reused buffers for the audit's masked passes
        self._labels_cache: tuple | None = None

    # -- binding -------------------------------------------------------------------------------------
    def attach(self, target, constraint: Constraint) -> ConstraintEngine:
        """Constrain the parameters ``target`` names to ``constraint``'s set, from now on.

        The parameters and the optimizer state already held for them are projected at once. A
        second constraint on a parameter means the intersection. Raises `ConstraintError` and
        changes nothing if the target matches nothing, a parameter is not held by the wrapped
        optimizer, or the constraint cannot take a parameter's shape or dtype.
        """
        return self.attach_all([(target, constraint)])

    def attach_all(self, items) -> ConstraintEngine:
        """`attach` for each ``(target, constraint)``, all or nothing: every one is resolved
        before any parameter or optimizer state changes."""
        if items and isinstance(self.optimizer, torch.optim.SparseAdam):
            raise ConstraintError(
                "SparseAdam takes sparse gradients only, and a gradient projected onto a "
                "constraint's tangent space is dense; use Adam or SGD for constrained parameters"
            )
        names = parameter_names(self.model, self.optimizer)
        held = {p for group in self.optimizer.param_groups for p in group["params"]}
        new: dict[nn.Parameter, Bound] = {}
        for target, constraint in items:
            if not isinstance(constraint, Constraint):
                raise ConstraintError(
                    f"attach({target!r}, ...) needs a constraint such as co.Mask(...), "
                    f"got {type(constraint).__name__}"
                )
            for name, param in select(target, names):
                if param not in held:
                    raise ConstraintError(
                        f"{describe(name, param)} is not held by the wrapped "
                        f"{type(self.optimizer).__name__}; add it with add_param_group first"
                    )
                bound = constraint.bind(full(param), name)  # a sharded parameter: its global tensor
                earlier = new.get(param, self.bounds.get(param))
                new[param] = bound if earlier is None else combine(earlier, bound, param, name)
        with torch.no_grad():
            for param, bound in new.items():
                with full_tensors(param, self.optimizer.state.get(param, {})) as (whole, state):
                    bound.project_(whole)
                    project_state_(bound, state, whole)
                self.bounds[param] = bound
            if new:
                restart_history_(self.optimizer)
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
        self._full_view = FullView(list(self.bounds))

    @contextmanager
    def _on_full_tensors(self, grads: bool = False, params_back: bool = False, grads_back: bool = False):
        """Inside, the groups hold plain full tensors in place of sharded (DTensor) parameters,
        written back as shards on exit; without sharded parameters this does nothing."""
        if not self._full_view or self._groups_are_full:  # plain, or already inside one
            yield
            return
        groups = self._groups
        self._groups = self._full_view.swap(groups)
        self._groups_are_full = True
        try:
            with self._full_view.gathered(grads, params_back, grads_back):
                yield
        finally:
            self._groups = groups
            self._groups_are_full = False

    # -- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def project_(self) -> None:
        """Project every constrained parameter onto its set now."""
        with self._on_full_tensors(params_back=True):
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
            for p in ps:
                if p.grad.is_sparse:  # nn.Embedding(sparse=True): a projected gradient is dense
                    p.grad = p.grad.to_dense()
            grads = [p.grad for p in ps]
            if not measure:
                kind.project_grad_all_(bs, grads, ps)
                continue
            removed, total = project_grads_measured_(kind, bs, grads, ps, self._scratch)
            blocked.update(zip(bs, zip(removed, total)))
        return blocked

    def _audit_due(self) -> bool:
        return self.audit_every > 0 and (self.steps_taken + 1) % self.audit_every == 0

    def before_step(self) -> None:
        """Project the gradients the step is about to use."""
        self._measure = self._audit_due()
        with self._on_full_tensors(grads=True, grads_back=True):
            self._blocked = self._project_grads_(self._measure)

    def wrap_closure(self, closure):
        """A closure whose every evaluation (LBFGS re-evaluates) leaves projected gradients."""
        self._measure = self._audit_due()
        self._blocked = {}

        def projected_closure():
            loss = closure()
            with self._on_full_tensors(grads=True, grads_back=True):
                self._blocked.update(self._project_grads_(self._measure))
            return loss

        return projected_closure

    def after_step(self) -> None:
        """Count the step, project parameters back onto their sets, audit."""
        self.steps_taken += 1
        with self._on_full_tensors(params_back=True):
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
            d, m = project_measured_(kind, bs, ps, self._scratch)
            drift += d
            drift_max += m
        if not params:
            return
        param_norms = []
        for _, bs, ps in groups:
            r, n = residuals(bs, ps, self._scratch)
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

    def _audit_labels(self) -> tuple[list[str], list[str]]:
        """Names and constraint descriptions in group order, computed once per grouping (a
        constraint's repr may read its data)."""
        bounds = tuple(b for _, bs, _ in self._groups for b in bs)
        cache = self._labels_cache
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
            limit = self.tolerance if self.tolerance is not None else default_atol(n, p)
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
            param = full(param)
            distance = float(bound.residual(param).norm())
            scale = float(param.norm())
            limit = atol if atol is not None else default_atol(scale, param)
            if not (distance <= limit and math.isfinite(scale)):
                off.append(f"{bound.name}: distance {distance:.3g} > {limit:.3g} from {bound.constraint!r}")
        if off:
            raise ConstraintViolation("off the set: " + "; ".join(off))

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The step count, the audit and each constraint's own data, keyed by parameter name.

        Per constrained parameter: its constraint's type and description, its (global) shape
        and its `Bound.state_tensors` (masks, index sets, labels, bases, values, patterns
        chosen at attach). Plain Python data and tensors, so ``torch.load(weights_only=True)``
        reads it back.
        """
        return {
            "version": CHECKPOINT_VERSION,
            "steps_taken": self.steps_taken,
            "audit": self.audit.state_dict(),
            "parameters": {
                b.name: {
                    "type": type(b.constraint).__name__,
                    "constraint": repr(b.constraint),
                    "shape": tuple(b.shape),
                    "tensors": dict(b.state_tensors()),
                }
                for b in self.bounds.values()
            },
        }

    def validate_state_dict(self, state) -> None:
        """Raise `ConstraintError` listing every way ``state`` does not fit the attached
        constraints (other targets, shapes, constraint types or data layouts); change nothing."""
        if not isinstance(state, dict) or not {"steps_taken", "audit", "parameters"} <= set(state):
            raise ConstraintError(
                "the checkpoint holds no constraint state (it was not saved by a ConstrainedOptimizer "
                "or a constrain() handle); to start constraints from a plain optimizer's checkpoint, "
                "load it into the wrapped optimizer first and attach afterwards"
            )
        problems = state_problems(state["parameters"], list(self.bounds.values()))
        if problems:
            raise ConstraintError(
                "the checkpoint's constraints do not match the attached ones (nothing was loaded):\n  "
                + "\n  ".join(problems)
                + "\nattach the same constraints to the same parameters before loading; to resume "
                "with other constraints, load the wrapped optimizer's state alone and attach them after"
            )
        try:
            type(self.audit)().load_state_dict(state["audit"])
        except Exception as err:  # a malformed audit must fail here, before anything is loaded
            raise ConstraintError(f"the checkpoint's audit state cannot be loaded: {err!r}") from err

    def load_state_dict(self, state) -> None:
        """Load what `state_dict` saved; validated in full first, so a mismatch changes nothing."""
        self.validate_state_dict(state)
        saved = state["parameters"]
        for bound in self.bounds.values():
            bound.load_state_tensors(saved[bound.name]["tensors"])
        self.audit.load_state_dict(state["audit"])
        self.steps_taken = int(state["steps_taken"])

    # -- copies of the model ---------------------------------------------------------------------------
    @torch.no_grad()
    def project_module_(self, module: nn.Module) -> None:
        """Project the parameters of another module with the same names (an averaged or EMA
        copy, a re-loaded model) onto the attached sets.

        A name may sit under a wrapper's prefix (``AveragedModel``'s and DDP's ``module.``,
        ``torch.compile``'s ``_orig_mod.``). Raises `ConstraintError` and changes nothing if a
        constrained name is missing, ambiguous or of another shape.
        """
        names = dict(module.named_parameters())
        plan, problems = [], []
        for param, bound in self.bounds.items():
            found = [names[bound.name]] if bound.name in names else [
                t for n, t in names.items() if n.endswith("." + bound.name)
            ]
            if len(found) != 1:
                problems.append(f"{bound.name}: {'no' if not found else len(found)} parameters of that name")
            elif tuple(found[0].shape) != bound.shape:
                problems.append(f"{bound.name}: shape {tuple(found[0].shape)}, expected {bound.shape}")
            else:
                plan.append((bound, param, found[0]))
        if problems:
            raise ConstraintError(
                f"project_module_({type(module).__name__}): nothing was projected:\n  "
                + "\n  ".join(problems)
            )
        for bound, param, target in plan:
            whole = full(target)
            dtype, device = param.dtype, local(param).device
            if whole.dtype == dtype and whole.device == device:
                bound.project_(whole)
            else:  # the bound's tensors live on the parameter's device and dtype
                moved = whole.to(device=device, dtype=dtype)
                bound.project_(moved)
                whole.copy_(moved)
            write_back_(target, whole)


CHECKPOINT_VERSION = 1


def state_problems(saved: dict, bounds: list[Bound]) -> list[str]:
    """Every difference between a checkpoint's constraints and the attached ``bounds``."""
    attached = {b.name: b for b in bounds}
    problems = [
        f"{name}: the checkpoint constrains it to {entry['constraint']}; here it has no constraint"
        for name, entry in saved.items() if name not in attached
    ]
    for name, bound in attached.items():
        entry = saved.get(name)
        here = f"{bound.constraint!r}"
        if entry is None:
            problems.append(f"{name}: constrained to {here} here; the checkpoint has no constraint on it")
        elif entry["type"] != type(bound.constraint).__name__:
            problems.append(
                f"{name}: constraint type {entry['type']} ({entry['constraint']}) in the checkpoint, "
                f"{type(bound.constraint).__name__} ({here}) here"
            )
        elif tuple(entry["shape"]) != bound.shape:
            problems.append(f"{name}: shape {tuple(entry['shape'])} in the checkpoint, {bound.shape} here")
        elif entry["constraint"] != here:
            problems.append(f"{name}: {entry['constraint']} in the checkpoint, {here} here")
        else:
            mine, theirs = bound.state_tensors(), entry["tensors"]
            if set(mine) != set(theirs):
                problems.append(
                    f"{name}: {here} data {sorted(theirs)} in the checkpoint, {sorted(mine)} here"
                )
                continue
            for key, value in theirs.items():
                if tuple(value.shape) != tuple(mine[key].shape):
                    problems.append(
                        f"{name}: {here} {key} of shape {tuple(value.shape)} in the checkpoint, "
                        f"{tuple(mine[key].shape)} here"
                    )
    return problems


def combine(old: Bound, new: Bound, param, name) -> Bound:
    """The intersection of two constraints on one parameter (each keeps what it resolved)."""
    from .constraints.composite import intersect_bounds

    return intersect_bounds(old, new, param, name)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line calling ``step``, past this
    package and torch's step and ``no_grad`` wrappers."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level
