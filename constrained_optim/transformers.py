"""HuggingFace `transformers`: the audit in the Trainer's logs (needs the ``hf`` extra).

Two ways to train with constraints under ``transformers.Trainer``:

- pass the optimizer: ``Trainer(..., optimizers=(co.ConstrainedOptimizer(AdamW(...), model,
  {...}), None))``;
- or let the Trainer build its own and constrain it as it is built:
  ``constrain_trainer(trainer, {...})``, which also resumes the constraints' state from a
  checkpoint's ``optimizer.pt`` (the Trainer loads that before any callback's
  ``on_train_begin``, so a handle made there would start its step count and audit afresh).

`AuditCallback` adds the latest audited step's figures to the Trainer's logs, the same names as
`constrained_optim.lightning.AuditCallback`: ``constraints/<name>/drift``, ``.../residual``,
``.../grad_blocked`` per constrained parameter and ``constraints/drift_max`` and
``constraints/residual_max`` over all of them. They land in ``trainer.state.log_history`` (and so
in ``trainer_state.json`` of each checkpoint); ``report_to`` integrations (TensorBoard, W&B, ...)
receive them when the callback runs before theirs, which is what `AuditCallback.add_to` arranges
(the Trainer runs the callbacks given as ``callbacks=`` after its reporting ones).

>>> import torch, constrained_optim as co
>>> from constrained_optim.transformers import AuditCallback
>>> model = torch.nn.Linear(4, 4)
>>> opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
...                               {"weight": co.MaxNorm(1.0)})
>>> model(torch.randn(8, 4)).square().sum().backward()
>>> opt.step()
>>> logs = {"loss": 1.5}
>>> AuditCallback(opt).add_figures(logs)
True
>>> for key in sorted(logs):
...     print(key)
constraints/drift_max
constraints/residual_max
constraints/weight/drift
constraints/weight/residual
loss
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from .errors import ConstraintError

__all__ = ["AuditCallback", "constrain_trainer"]

METRICS = ("drift", "drift_max", "residual", "grad_blocked")


def _unwrapped(optimizer):
    """``optimizer`` and what it wraps (accelerate's ``AcceleratedOptimizer``, DeepSpeed's
    wrappers, ... hold the real one as ``.optimizer``), outermost first."""
    seen: list[object] = []
    while optimizer is not None and all(optimizer is not s for s in seen):
        seen.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return seen


class AuditCallback(TrainerCallback):
    """Adds each audited step's figures to the Trainer's logs.

    For each constrained parameter ``name`` and each of ``metrics`` (fields of `AuditRecord`):
    ``{prefix}/{name}/{metric}``, plus ``{prefix}/drift_max`` and ``{prefix}/residual_max`` over
    all parameters. Non-finite values (``grad_blocked`` is ``nan`` where no gradient was
    projected) are left out. An audited step is reported once, at the first log after it (with
    ``logging_steps=N`` that is the latest audited step every N steps); evaluation logs that
    follow at the same step get nothing. With several sources the prefix gains the source's
    index.

    ``sources``: `ConstrainedOptimizer` s or `constrain` handles (anything with an ``audit``
    whose ``last`` holds the latest step's records); append to ``callback.sources`` to add one
    made later (a handle made in ``on_train_begin``). None: the `ConstrainedOptimizer` the
    Trainer steps, found through accelerate's wrapper.
    """

    def __init__(self, *sources, metrics=("drift", "residual", "grad_blocked"), prefix: str = "constraints"):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ConstraintError(f"AuditCallback: unknown metrics {unknown}; choose from {METRICS}")
        if len(sources) == 1 and isinstance(sources[0], (list, tuple)):
            sources = tuple(sources[0])
        for source in sources:
            self._check(source)
        self.sources = list(sources)
        self.metrics = tuple(metrics)
        self.prefix = prefix
        self._reported: dict[int, int] = {}  # id(audit) -> the last step reported

    @staticmethod
    def _check(source) -> None:
        if not hasattr(getattr(source, "audit", None), "last"):
            raise ConstraintError(
                "AuditCallback: sources must be ConstrainedOptimizers or constrain() handles, "
                f"got {type(source).__name__}"
            )

    def add_to(self, trainer) -> AuditCallback:
        """Install on ``trainer`` ahead of its other callbacks, so its ``report_to`` loggers
        receive the figures too; returns self."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def _sources(self, optimizer):
        if self.sources:
            return self.sources
        from .optimizer import ConstrainedOptimizer

        return [o for o in _unwrapped(optimizer) if isinstance(o, ConstrainedOptimizer)][:1]

    def add_figures(self, logs: dict, optimizer=None) -> bool:
        """Add the figures of each source's latest audited step not yet reported to ``logs``;
        returns whether any were added. ``optimizer``: the one the Trainer steps, searched when
        no sources were given."""
        sources = self._sources(optimizer)
        added = False
        for index, source in enumerate(sources):
            self._check(source)
            records = list(source.audit.last)
            if not records:
                continue
            measured = records[0].step
            if self._reported.get(id(source.audit)) == measured:
                continue
            self._reported[id(source.audit)] = measured
            prefix = self.prefix if len(sources) == 1 else f"{self.prefix}/{index}"
            for r in records:
                for m in self.metrics:
                    value = getattr(r, m)
                    if math.isfinite(value):
                        logs[f"{prefix}/{r.name}/{m}"] = value
            for field in ("drift", "residual"):
                values = [getattr(r, field) for r in records if math.isfinite(getattr(r, field))]
                if values:
                    logs[f"{prefix}/{field}_max"] = max(values)
            added = True
        return added

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        before = set(logs)
        if not self.add_figures(logs, kwargs.get("optimizer")):
            return
        # the Trainer appended a copy of these logs to log_history before calling back: add the
        # figures there too, so they are in trainer.state.log_history and trainer_state.json
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and before <= set(history[-1]):
            history[-1].update({k: v for k, v in logs.items() if k not in before})


def constrain_trainer(trainer, constraints: dict, **options) -> AuditCallback:
    """Constrain the optimizer ``trainer`` builds, as soon as it builds it, and report its audit.

    The Trainer's ``create_optimizer`` is wrapped on the instance: the optimizer it returns is
    given to `constrain` with ``trainer.model`` and ``constraints`` (``options``: `constrain`'s
    keyword arguments). That happens before ``train(resume_from_checkpoint=...)`` loads the
    checkpoint's ``optimizer.pt`` into it, so the step count, the audit and data chosen at
    attach (an N:M pattern) resume too. Returns the `AuditCallback`, installed ahead of the
    Trainer's reporting callbacks; ``callback.sources[0]`` is the handle once built.
    """
    from .engine import engine_of
    from .hooks import constrain, stepping_optimizer

    callback = AuditCallback()
    build = trainer.create_optimizer

    def create_optimizer(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        if engine_of(stepping_optimizer(optimizer)) is None:  # built once, constrained once
            callback.sources.append(constrain(optimizer, trainer.model, constraints, **options))
        return optimizer

    trainer.create_optimizer = create_optimizer
    return callback.add_to(trainer)
