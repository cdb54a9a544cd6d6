"""The mechanism behind `ConstrainedOptimizer` and `constrain`: one engine per optimizer.

One ``opt.step()``, in one line: ``cast check -> filler -> project grads (watched) -> inner step ->
project params (watched, always, even if the inner step raised) -> count -> audit / finite check
-> log -> policy``.

- binding (`binding.Binding`): which bound constrains which parameter, grouped once;
- attach-time work (`attaching`): targets resolved, bounds built, projections computed on copies;
- the step (`run_step`, with `stepping`): gradient projection and parameter projection each
  happen in exactly one place (`stepping.project_grads`, `stepping.project_params`); watchers
  (`audit.watch`) only look;
- the violation policy (`policy.ViolationPolicy`): tolerance, non-finite values, warn/raise/ignore;
- checkpoints (`checkpoint`): the constraints' part, validated whole before anything loads;
- the second-moment filler (`filler`): on CPU, held-at-zero entries of second moments kept
  positive so ``sqrt`` never meets an exact 0 (no bit of the update changes), resolved at attach,
  refreshed before a step only when the decay would take it below its floor, and never seen in a
  state dict.

`attach`, `load` and the projections of a step are transactions: results are computed on the
side and committed at once (`transaction`), so on any exception, KeyboardInterrupt included,
nothing is half-changed.
"""

from __future__ import annotations

import logging
import math
import weakref

import torch
from torch import nn

from . import checkpoint
from .attaching import module_writes, projection_writes, rebound_after_casts, resolve
from .audit import Audit
from .audit.measure import Scratch
from .audit.watch import AuditWatch, FiniteWatch
from .binding import Binding
from .constraints.base import Bound, Constraint
from .distributed import is_sharded
from .errors import ConstraintError, ConstraintViolation
from .filler import Filler
from .policy import ViolationPolicy, default_atol
from .selection import ParamIndex, select
from .sharding import ShardPlan, barrier, shard_bounds, world
from .stepping import NoWatch, is_initialisation_step, project_grads, project_params, repair
from .transaction import deferred_interrupts

log = logging.getLogger("constrained_optim")


class ConstraintEngine:
    """Constraints bound to the parameters of one optimizer, and the work around its step.

    Built by `make_engine` (one per optimizer); `ConstrainedOptimizer` and `constrain` are two
    ways to put it around the optimizer's step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        audit_every: int = 1,
        log_every: int | None = None,
        tolerance: float | None = None,
        on_violation: str = "warn",
    ):
        if isinstance(audit_every, bool) or not isinstance(audit_every, int) or audit_every < 0:
            raise ConstraintError(f"audit_every must be an int >= 0, got {audit_every!r}")
        if log_every is not None and (
            isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1
        ):
            raise ConstraintError(f"log_every must be None or an int >= 1, got {log_every!r}")
        self.optimizer = optimizer
        self.model = model
        self.audit_every = audit_every
        self.log_every = log_every
        self.policy = ViolationPolicy(tolerance, on_violation)
        self.audit = Audit()
        self.steps_taken = 0
        self._scratch = Scratch()  # reused buffers for the audit's parameter-sized temporaries
        # held entries of CPU second moments kept positive (`filler`); their true 0 written back
        # when the engine goes
        self._filler = Filler(optimizer)
        weakref.finalize(self, self._filler.release).atexit = False
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
        plan = self._filler.planned(binding, self.optimizer)
        self.binding, self._shards = binding, ShardPlan(binding)
        self._filler.commit(plan)

    def _sharded(self) -> bool:
        """Whether the optimizer holds sharded (DTensor) parameters: then `attach`, `project_` and
        `check` are collectives."""
        return any(is_sharded(p) for g in self.optimizer.param_groups for p in g["params"])

    # -- attach and detach: resolve and compute on the side, then commit at once -------------------
    def attach(self, target, constraint: Constraint) -> ConstraintEngine:
        return self.attach_all([(target, constraint)])

    def attach_all(self, items) -> ConstraintEngine:
        """`attach` for each ``(target, constraint)``, all or nothing. A collective when parameters
        are sharded (each is gathered once to bind and project it): call it on every rank."""
        if items and self._sharded():
            barrier("attach")
        new, owners = resolve(items, self.binding, self.model, self.optimizer)
        if not new:
            return self
        # the state's true values (no filler), projected
        writes, lbfgs = projection_writes(new, self.optimizer, self._filler.true_value)
        dsts = [d for d, _ in writes]
        srcs = [s for _, s in writes]
        binding = self.binding.replaced(shard_bounds(new), owners)
        view = ShardPlan(binding)
        plan = self._filler.planned(binding, self.optimizer)
        with deferred_interrupts(), torch.no_grad():
            if dsts:
                torch._foreach_copy_(dsts, srcs)  # one call: it runs whole or not at all
            # from here on plain Python only, which no torch call can interrupt
            for state, fresh in lbfgs:
                state.clear()
                state.update(fresh)
            self.binding, self._shards = binding, view
            self._filler.commit(plan, rewritten=new)  # only the new parameters' plans change
        return self

    def detach(self, target) -> ConstraintEngine:
        """Remove every constraint from the parameters ``target`` names."""
        matches = select(target, ParamIndex(self.model, self.optimizer))
        gone = [m.param for m in matches if m.param in self.binding.bounds]
        if not gone:
            raise ConstraintError(
                f"detach({target!r}): no constrained parameter among {[m.name for m in matches]}"
            )
        self._bind(self.binding.replaced(dict.fromkeys(gone)))
        return self

    # -- the step ----------------------------------------------------------------------------------
    def run_step(self, call, closure=None, skipped=None):
        """One step around ``call(closure)``, the wrapped optimizer's own step.

        Gradients are projected before it (or at each evaluation of ``closure``); afterwards
        every parameter is projected back, in a ``finally``, so even an exception from the inner
        step leaves every constrained parameter on its set. ``steps_taken`` counts inner steps
        that completed (and that ``skipped()``, a GradScaler's verdict, does not disown)."""
        if is_initialisation_step(self.optimizer):
            return call(closure)
        self._follow_casts()
        self._filler.refresh(self.optimizer)
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

    def _project_grads(self, watch) -> None:
        with self._shards.grad_groups(self.binding.groups) as groups:
            project_grads(groups, watch)

    def _project_params(self, watch) -> BaseException | None:
        with self._shards.param_groups(self.binding.groups) as groups:
            return project_params(groups, watch)

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
        binding, step, shards = self.binding, self.steps_taken, self._shards
        records = None
        if watch.audited:
            # sharded: partial sums and maxima of every rank, reduced once, so all ranks agree
            rows = shards.rows(watch) if shards else watch.rows(binding.ordered)
            records = self.audit.add(step, binding.names, binding.labels, [r[:4] for r in rows])
            norms = [r[4] for r in rows]
            bad = [i for i, n in enumerate(norms) if not math.isfinite(n)]
        else:
            bad = shards.nonfinite(watch) if shards else (watch.nonfinite() or [])
        if bad:
            if shards:
                shards.repair(self.optimizer, bad)
            else:
                repair(binding, self.optimizer, bad)
                self._filler.forget([binding.params[i] for i in bad])
        self._log()
        if bad:
            self.audit.note_nonfinite(step, [binding.names[i] for i in bad], [binding.labels[i] for i in bad])
            self.policy.nonfinite(step, [binding.names[i] for i in bad])
        if records is not None:
            self.policy.residuals(step, records, binding.params, norms)

    def _audit_due(self) -> bool:
        return self.audit_every > 0 and (self.steps_taken + 1) % self.audit_every == 0

    def _follow_casts(self) -> None:
        """Rebind the bounds of parameters cast or moved since attach (``model.to(...)``)."""
        changes = rebound_after_casts(self.binding)
        if changes:
            self._bind(self.binding.replaced(shard_bounds(changes)))

    def _log(self) -> None:
        """Every ``log_every`` steps, the latest audited step as one INFO block (with sharded
        parameters, on rank 0 only: every rank holds the same numbers). Logging never breaks
        training: a failing handler is the logging module's to report."""
        if not (self.log_every and self.steps_taken % self.log_every == 0 and self.audit.last):
            return
        if self._shards and world()[0] != 0:
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
        if self._shards:
            barrier("project_()")
        with deferred_interrupts():
            error = self._project_params(NoWatch())
        if error is not None:
            raise error

    @torch.no_grad()
    def check(self, atol: float | None = None) -> None:
        """Raise `ConstraintViolation` naming every parameter off its set, with its distance. A
        collective when parameters are sharded (one all-reduce; every rank raises alike)."""
        off = []
        if self._shards:
            barrier("check()")
            measured = self._shards.distances()
        else:
            measured = [
                (
                    float(torch.linalg.vector_norm(b.residual(p).float())),
                    float(torch.linalg.vector_norm(p.float())),
                )
                for b, p in zip(self.binding.ordered, self.binding.params)
            ]
        for param, bound, (distance, scale) in zip(self.binding.params, self.binding.ordered, measured):
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
        view = ShardPlan(binding)
        fill = self._filler.planned(binding, self.optimizer)
        with deferred_interrupts():  # nothing here can raise half-way
            self.binding, self._shards = binding, view
            self._filler.commit(fill)
            vars(self.audit).update(vars(plan.audit))
            self.steps_taken = plan.steps_taken

    def load_state_dict(self, state) -> None:
        self.commit_load(self.plan_load(state))

    # -- copies of the model -----------------------------------------------------------------------
    def project_module_(self, module: nn.Module) -> None:
        """Project the parameters of another module with the same names (an averaged or EMA
        copy, a re-loaded model) onto the attached sets; all or nothing."""
        writes = module_writes(self.binding, module)
        with deferred_interrupts(), torch.no_grad():
            if writes:
                torch._foreach_copy_([d for d, _ in writes], [v for _, v in writes])


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


def make_engine(
    optimizer: torch.optim.Optimizer, model: nn.Module | None, constraints, **options
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
        raise ConstraintError(
            f"constraints must be a dict {{target: constraint}}, got {type(constraints).__name__}"
        )
    engine = ConstraintEngine(optimizer, model, **options)
    try:
        engine.attach_all(list((constraints or {}).items()))
    except BaseException:
        engine._done_hook.remove()
        engine._filler.release()
        raise
    _ENGINES[optimizer] = weakref.ref(engine)
    return engine


def release(optimizer, engine: ConstraintEngine) -> None:
    """Let ``optimizer`` take another engine (a removed `constrain` handle)."""
    if engine_of(optimizer) is engine:
        del _ENGINES[optimizer]
    engine._done_hook.remove()
    engine._filler.release()  # the true 0 back in the state: later steps are the optimizer's own
