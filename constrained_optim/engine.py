"""The mechanism behind `ConstrainedOptimizer` and `constrain`: one engine per optimizer.

One ``opt.step()``, in one line: ``cast check -> project grads (watched) -> inner step ->
project params (watched, always, even if the inner step raised) -> count -> audit / finite check
-> log -> policy``.

- binding (`binding.Binding`): which bound constrains which parameter, grouped once;
- the step (`run_step`): gradient projection and parameter projection each happen in exactly one
  place (`_project_grads`, `_project_params`); watchers (`audit.watch`) only look;
- the violation policy (`policy.ViolationPolicy`): tolerance, non-finite values, warn/raise/ignore;
- checkpoints (`checkpoint`): the constraints' part, validated whole before anything loads.

`attach`, `load` and the projections of a step are transactions: results are computed on the
side and committed at once (`transaction`), so on any exception, KeyboardInterrupt included,
nothing is half-changed.
"""

from __future__ import annotations

import logging
import math
import sys
import weakref

import torch
from torch import nn

from . import checkpoint
from .audit import Audit
from .audit.measure import Scratch
from .audit.watch import AuditWatch, FiniteWatch
from .binding import Binding
from .constraints.base import Bound, Constraint
from .constraints.composite import Intersection, intersect_bounds
from .distributed import FullView, full, local, local_part, write_back_
from .errors import ConstraintError, ConstraintViolation, describe
from .policy import ViolationPolicy, default_atol
from .selection import ParamIndex, select
from .state import projected_state, restarted_history
from .transaction import deferred_interrupts

log = logging.getLogger("constrained_optim")


class ConstraintEngine:
    """Constraints bound to the parameters of one optimizer, and the work around its step.

    Built by `make_engine` (one per optimizer); `ConstrainedOptimizer` and `constrain` are two
    ways to put it around the optimizer's step."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None, *,
                 audit_every: int = 1, log_every: int | None = None, tolerance: float | None = None,
                 on_violation: str = "warn"):
        if isinstance(audit_every, bool) or not isinstance(audit_every, int) or audit_every < 0:
            raise ConstraintError(f"audit_every must be an int >= 0, got {audit_every!r}")
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int)
                                      or log_every < 1):
            raise ConstraintError(f"log_every must be None or an int >= 1, got {log_every!r}")
        self.optimizer = optimizer
        self.model = model
        self.audit_every = audit_every
        self.log_every = log_every
        self.policy = ViolationPolicy(tolerance, on_violation)
        self.audit = Audit()
        self.steps_taken = 0
        self._scratch = Scratch()  # reused buffers for the audit's parameter-sized temporaries
        self._bind(Binding())
        self._inner_done = False
        self._done_hook = _mark_completed_steps(optimizer, self)

    @property
    def bounds(self) -> dict[nn.Parameter, Bound]:
        return self.binding.bounds

    @property
    def tolerance(self) -> float | None:
        return self.policy.tolerance

    @property
    def on_violation(self) -> str:
        return self.policy.on_violation

    def _bind(self, binding: Binding) -> None:
        view = FullView(binding.params)
        self.binding, self._full_view = binding, view

    # -- attach and detach: resolve and compute on the side, then commit at once -------------------
    def attach(self, target, constraint: Constraint) -> ConstraintEngine:
        return self.attach_all([(target, constraint)])

    def attach_all(self, items) -> ConstraintEngine:
        """`attach` for each ``(target, constraint)``, all or nothing."""
        new, owners = self._resolve(items)
        if not new:
            return self
        writes, lbfgs = self._projected(new)
        dsts = [d for d, _ in writes]
        srcs = [s for _, s in writes]
        binding = self.binding.replaced(new, owners)
        view = FullView(binding.params)
        with deferred_interrupts(), torch.no_grad():
            if dsts:
                torch._foreach_copy_(dsts, srcs)  # one call: it runs whole or not at all
            # from here on plain Python only, which no torch call can interrupt
            for state, fresh in lbfgs:
                state.clear()
                state.update(fresh)
            self.binding, self._full_view = binding, view
        return self

    def _resolve(self, items) -> tuple[dict, dict]:
        """The new bound of every parameter the items name (intersected with what it already
        has); raises `ConstraintError` before anything changes."""
        if items and isinstance(self.optimizer, torch.optim.SparseAdam):
            raise ConstraintError(
                "SparseAdam takes sparse gradients only, and a gradient projected onto a "
                "constraint's tangent space is dense; use Adam or SGD for constrained parameters"
            )
        index = ParamIndex(self.model, self.optimizer)
        held = {p for group in self.optimizer.param_groups for p in group["params"]}
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
                        f"{type(self.optimizer).__name__}; add it with add_param_group first"
                    )
                earlier = new.get(param, self.binding.bounds.get(param))
                if earlier is not None and holds(earlier.constraint, constraint):
                    continue  # the same constraint again: the same set, the same cost
                bound = constraint.bind(full(param), match.name, match.owner)
                new[param] = bound if earlier is None else intersect_bounds(earlier, bound, full(param),
                                                                            match.name)
                owners[param] = match.owner
        return new, owners

    @torch.no_grad()
    def _projected(self, new: dict[nn.Parameter, Bound]):
        """``(destination, value)`` pairs that project each parameter and the optimizer state
        held for it, computed on copies; and LBFGS states to restart."""
        writes = []
        for param, bound in new.items():
            x = full(param).detach().clone()
            bound.project_(x)
            writes.append((local(param), local_part(param, x)))
            state = self.optimizer.state.get(param, {})
            whole = {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            for key, value in projected_state(bound, whole, x).items():
                writes.append((local(state[key]), local_part(state[key], value)))
        lbfgs = [(s, fresh) for s in self.optimizer.state.values()
                 if (fresh := restarted_history(self.optimizer, s)) is not None]
        return writes, lbfgs

    def detach(self, target) -> ConstraintEngine:
        """Remove every constraint from the parameters ``target`` names."""
        matches = select(target, ParamIndex(self.model, self.optimizer))
        gone = [m.param for m in matches if m.param in self.binding.bounds]
        if not gone:
            raise ConstraintError(
                f"detach({target!r}): no constrained parameter among {[m.name for m in matches]}"
            )
        binding = self.binding.replaced(dict.fromkeys(gone))
        view = FullView(binding.params)
        self.binding, self._full_view = binding, view
        return self

    # -- the step ----------------------------------------------------------------------------------
    def run_step(self, call, closure=None, skipped=None):
        """One step around ``call(closure)``, the wrapped optimizer's own step.

        Gradients are projected before it (or at each evaluation of ``closure``); afterwards
        every parameter is projected back, in a ``finally``, so even an exception from the inner
        step leaves every constrained parameter on its set. ``steps_taken`` counts inner steps
        that completed (and that ``skipped()``, a GradScaler's verdict, does not disown)."""
        if self._is_initialisation_step():
            return call(closure)
        self._follow_casts()
        watch = AuditWatch(self._scratch) if self._audit_due() else FiniteWatch()
        if closure is None:
            self._project_grads(watch)
            inner = None
        else:
            def inner():
                loss = closure()
                self._project_grads(watch)
                return loss
        done = self._inner_done = False
        try:
            loss = call(inner)
        finally:
            # the inner step completed if its post-hooks began (ours runs first), even if one of
            # them, or anything after, raised
            done = self._inner_done and not (skipped is not None and skipped())
            self._after_inner_step(watch, done)
        return loss

    @torch.no_grad()
    def _project_grads(self, watch) -> None:
        """The one place gradients are projected onto the tangent spaces."""
        with self._full_view.gathered(self.binding.groups, grads=True, grads_back=True) as groups:
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
    def _project_params(self, watch) -> BaseException | None:
        """The one place parameters are projected onto their sets. Every group is projected even
        if another fails (a projection is idempotent, so a group interrupted mid-way is projected
        again); returns the first exception instead of raising it."""
        first = None
        with self._full_view.gathered(self.binding.groups, params_back=True) as groups:
            for group in groups:
                projected = False
                try:
                    token = watch.before_params(group)
                    group.kind.project_all_(group.bounds, group.params)
                    projected = True
                    watch.after_params(group, token)
                except BaseException as err:  # noqa: BLE001 - re-raised by the caller
                    first = first or err
                    if not projected:
                        try:
                            group.kind.project_all_(group.bounds, group.params)
                        except BaseException:  # noqa: BLE001 - the first error is the one reported
                            pass
        return first

    def _after_inner_step(self, watch, done: bool) -> None:
        with deferred_interrupts():
            error = self._project_params(watch)
            if done:
                self.steps_taken += 1
        if not done:
            return  # the inner step's own exception is on its way
        if error is not None:
            raise error
        self._finish(watch)

    def _finish(self, watch) -> None:
        """Turn the watched step into records (one host read), report, log, apply the policy."""
        binding, step = self.binding, self.steps_taken
        records = None
        if watch.audited:
            rows = watch.rows(binding.ordered)
            records = self.audit.add(step, binding.names, binding.labels, [r[:4] for r in rows])
            norms = [r[4] for r in rows]
            bad = [i for i, n in enumerate(norms) if not math.isfinite(n)]
        else:
            bad = watch.nonfinite() or []
        if bad:
            self._repair(bad)
        self._log()
        if bad:
            self.audit.note_nonfinite(step, [binding.names[i] for i in bad], [binding.labels[i] for i in bad])
            self.policy.nonfinite(step, [binding.names[i] for i in bad])
        if records is not None:
            self.policy.residuals(step, records, binding.params, norms)

    @torch.no_grad()
    def _repair(self, positions: list[int]) -> None:
        """Held entries of a parameter that went non-finite are put back exactly (a multiply by a
        0/1 mask leaves ``inf * 0 = NaN`` there), in the parameter and its optimizer state."""
        binding = self.binding
        for i in positions:
            param, bound = binding.params[i], binding.ordered[i]
            x = full(param)
            bound.repair_(x)
            bound.project_(x)
            write_back_(param, x)
            for value in self.optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    whole = full(value)
                    bound.repair_(whole)
                    write_back_(value, whole)

    def _is_initialisation_step(self) -> bool:
        """torch's lr=0 step that creates optimizer state (``torch.distributed.checkpoint``'s
        ``get_state_dict`` on a fresh optimizer calls ``_init_optim_state``). It moves nothing,
        so it is neither counted, audited nor projected. Told apart by its caller, looked up only
        in the rare case it could be (no state yet, every lr 0)."""
        opt = self.optimizer
        if opt.state or not all("lr" in g and float(g["lr"]) == 0.0 for g in opt.param_groups):
            return False
        frame = sys._getframe(1)
        for _ in range(16):
            if frame is None:
                return False
            if frame.f_code.co_name == "_init_optim_state" and \
                    frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict":
                return True
            frame = frame.f_back
        return False

    def _audit_due(self) -> bool:
        return self.audit_every > 0 and (self.steps_taken + 1) % self.audit_every == 0

    def _follow_casts(self) -> None:
        """Rebind the bounds of parameters cast or moved since attach (``model.to(...)``), keeping
        their data (a pattern chosen at attach stays the one chosen)."""
        stale = self.binding.stale()
        if not stale:
            return
        changes = {}
        for param in stale:
            old = self.binding.bounds[param]
            fresh = old.constraint.bind(full(param), old.name, self.binding.owners.get(param))
            target = fresh.state_tensors()
            changes[param] = fresh if reproduces(fresh, old) else fresh.with_state(
                {k: v.to(device=target[k].device, dtype=target[k].dtype) for k, v in old.state_tensors().items()})
        self._bind(self.binding.replaced(changes))

    def _log(self) -> None:
        """Every ``log_every`` steps, the latest audited step as one INFO block. Logging never
        breaks training: a failing handler is the logging module's to report."""
        if not (self.log_every and self.steps_taken % self.log_every == 0 and self.audit.last):
            return
        if log.isEnabledFor(logging.INFO):
            from .report import log_step

            try:
                log_step(log, self.steps_taken, self.audit.last)
            except Exception:  # noqa: BLE001 - as logging.Handler.handleError does
                if logging.raiseExceptions:
                    log.debug("constraint audit log failed", exc_info=True)

    # -- projecting and checking now ---------------------------------------------------------------
    def project_(self) -> None:
        """Project every constrained parameter onto its set now (a collective when parameters
        are sharded: call it on every rank)."""
        with deferred_interrupts():
            error = self._project_params(_NoWatch())
        if error is not None:
            raise error

    @torch.no_grad()
    def check(self, atol: float | None = None) -> None:
        """Raise `ConstraintViolation` naming every parameter off its set, with its distance."""
        off = []
        for param, bound in self.binding.bounds.items():
            param = full(param)
            distance = float(torch.linalg.vector_norm(bound.residual(param).float()))
            scale = float(torch.linalg.vector_norm(param.float()))
            limit = atol if atol is not None else default_atol(scale, param)
            if not (distance <= limit and math.isfinite(scale)):
                off.append(f"{bound.name}: distance {distance:.3g} > {limit:.3g} from {bound.constraint!r}")
        if off:
            raise ConstraintViolation("off the set: " + "; ".join(off))

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The step count, the audit and each constraint's own data (fresh copies)."""
        return checkpoint.save(self.binding, self.steps_taken, self.audit)

    def plan_load(self, state) -> checkpoint.LoadPlan:
        """Validate a checkpoint's constraint state; raise `ConstraintError`, change nothing."""
        return checkpoint.plan_load(state, self.binding)

    def commit_load(self, plan: checkpoint.LoadPlan) -> None:
        binding = self.binding.replaced(plan.bounds)
        view = FullView(binding.params)
        with deferred_interrupts():  # plain Python only: nothing here can raise half-way
            self.binding, self._full_view = binding, view
            vars(self.audit).update(vars(plan.audit))
            self.steps_taken = plan.steps_taken

    def load_state_dict(self, state) -> None:
        self.commit_load(self.plan_load(state))

    # -- copies of the model -----------------------------------------------------------------------
    @torch.no_grad()
    def project_module_(self, module: nn.Module) -> None:
        """Project the parameters of another module with the same names (an averaged or EMA
        copy, a re-loaded model) onto the attached sets; all or nothing."""
        index = ParamIndex(module, None)
        plan, problems = [], []
        for param, bound in self.binding.bounds.items():
            target = index.lookup(bound.name)
            if target is None:
                found = [t for n, t in index.names.items() if n.endswith("." + bound.name)]
                target = found[0] if len(found) == 1 else None
                if target is None:
                    problems.append(f"{bound.name}: {'no' if not found else len(found)} parameters of that name")
                    continue
            if tuple(target.shape) != bound.shape:
                problems.append(f"{bound.name}: shape {tuple(target.shape)}, expected {bound.shape}")
            else:
                plan.append((bound, param, target))
        if problems:
            raise ConstraintError(
                f"project_module_({type(module).__name__}): nothing was projected:\n  " + "\n  ".join(problems)
            )
        writes = []
        for bound, param, target in plan:
            whole = full(target)
            moved = whole.detach().to(device=local(param).device, dtype=param.dtype, copy=True)
            bound.project_(moved)
            writes.append((local(target), local_part(target, moved.to(whole.dtype))))
        with deferred_interrupts():
            if writes:
                torch._foreach_copy_([d for d, _ in writes], [s for _, s in writes])


def reproduces(fresh: Bound, old: Bound) -> bool:
    """Whether binding afresh gave back ``old``'s data (derived data, such as an orthonormalised
    basis, is then kept at the new precision); data chosen at attach or loaded from a checkpoint
    (an N:M pattern) differs, and is carried over instead."""
    mine, theirs = fresh.state_tensors(), old.state_tensors()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == v.shape and torch.equal(mine[k].to(device=v.device, dtype=v.dtype), v)
        for k, v in theirs.items())


class _NoWatch:
    """A watcher that looks at nothing (`ConstraintEngine.project_`)."""

    def before_params(self, group):
        return None

    def after_params(self, group, token) -> None:
        pass


def holds(have: Constraint, new: Constraint) -> bool:
    """Whether the set ``have`` already includes every member of ``new`` (the same constraints)."""
    mine = have.constraints if isinstance(have, Intersection) else [have]
    theirs = new.constraints if isinstance(new, Intersection) else [new]
    return all(any(m.same_as(t) for m in mine) for t in theirs)


def _mark_completed_steps(optimizer, engine: ConstraintEngine):
    """A step post-hook, first in line, that tells ``engine`` the inner step completed. It holds
    the engine weakly, so a discarded wrapper's engine can go (and the optimizer take another)."""
    ref = weakref.ref(engine)

    def mark(*_):
        alive = ref()
        if alive is not None:
            alive._inner_done = True

    handle = optimizer.register_step_post_hook(mark)
    optimizer._optimizer_step_post_hooks.move_to_end(handle.id, last=False)
    weakref.finalize(engine, handle.remove)  # a collected engine leaves no hook behind
    return handle


# -- one engine per optimizer ----------------------------------------------------------------------
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_of(optimizer) -> ConstraintEngine | None:
    ref = _ENGINES.get(optimizer)
    return ref() if ref is not None else None


def make_engine(optimizer: torch.optim.Optimizer, model: nn.Module | None, constraints, **options
                ) -> ConstraintEngine:
    """The engine for ``optimizer`` with ``constraints`` attached, all or nothing; refuses an
    optimizer that already has one (two engines would each undo the other's audit)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not hasattr(optimizer, "_optimizer_step_post_hooks"):
        raise ConstraintError(
            f"{type(optimizer).__name__} subclasses torch.optim.Optimizer without running its "
            "__init__ (a wrapper?); pass the optimizer that actually steps"
        )
    if engine_of(optimizer) is not None or isinstance(getattr(optimizer, "engine", None), ConstraintEngine):
        raise ConstraintError(
            f"this {type(optimizer).__name__} is already constrained (by a ConstrainedOptimizer or "
            "co.constrain); attach to that one, or remove() its constrain() handle first"
        )
    if constraints is not None and not isinstance(constraints, dict):
        raise ConstraintError(f"constraints must be a dict {{target: constraint}}, got {type(constraints).__name__}")
    engine = ConstraintEngine(optimizer, model, **options)
    try:
        engine.attach_all(list((constraints or {}).items()))
    except BaseException:
        engine._done_hook.remove()
        raise
    _ENGINES[optimizer] = weakref.ref(engine)
    return engine


def release(optimizer, engine: ConstraintEngine) -> None:
    """Let ``optimizer`` take another engine (a removed `constrain` handle)."""
    if engine_of(optimizer) is engine:
        del _ENGINES[optimizer]
    engine._done_hook.remove()
