"""PyTorch Lightning: the audit as logged metrics (needs the ``lightning`` extra).

A `LightningModule` whose ``configure_optimizers`` returns a `ConstrainedOptimizer` trains with
its constraints as it is: Lightning calls ``optimizer.step(closure=...)`` and the wrapper projects
the gradients the closure leaves. `AuditCallback` sends each audited step's records through
``LightningModule.log``, so they reach whatever loggers the trainer has (TensorBoard, CSV, ...).

>>> import lightning.pytorch as pl, constrained_optim as co
>>> from constrained_optim.lightning import AuditCallback
>>> trainer = pl.Trainer(callbacks=[AuditCallback(metrics=("residual",))], logger=False,
...                      enable_progress_bar=False, enable_model_summary=False)
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback

from .errors import ConstraintError
from .hooks import ConstraintHandle
from .optimizer import ConstrainedOptimizer

METRICS = ("drift", "drift_max", "residual", "grad_blocked")


class AuditCallback(Callback):
    """Logs the audit of every audited optimizer step through ``pl_module.log``.

    For each constrained parameter ``name`` and each of ``metrics`` (fields of `AuditRecord`):
    ``{prefix}/{name}/{metric}``, plus the summary ``{prefix}/drift_max`` and
    ``{prefix}/residual_max`` over all parameters. Non-finite values (``grad_blocked`` is
    ``nan`` where no gradient was projected) are left out. With several optimizers the prefix
    gains the optimizer's index.

    ``sources``: the `ConstrainedOptimizer` s or `constrain` handles to report; by default every
    `ConstrainedOptimizer` among ``trainer.optimizers``.
    """

    def __init__(
        self, metrics=("drift", "residual", "grad_blocked"), prefix: str = "constraints", sources=None
    ):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ConstraintError(f"AuditCallback: unknown metrics {unknown}; choose from {METRICS}")
        self.metrics = tuple(metrics)
        self.prefix = prefix
        self.sources = None if sources is None else list(sources)
        self._logged: dict[int, int] = {}  # id(engine) -> last step logged

    def _engines(self, trainer):
        sources = self.sources
        if sources is None:
            sources = [o for o in trainer.optimizers if isinstance(o, ConstrainedOptimizer)]
        for source in sources:
            if not isinstance(source, (ConstrainedOptimizer, ConstraintHandle)):
                raise ConstraintError(
                    f"AuditCallback: sources must be ConstrainedOptimizers or constrain() handles, "
                    f"got {type(source).__name__}"
                )
        return [s.engine for s in sources]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engines = self._engines(trainer)
        for index, engine in enumerate(engines):
            step = engine.steps_taken
            if self._logged.get(id(engine)) == step:  # no new step (gradient accumulation)
                continue
            records = [r for r in engine.audit.last if r.step == step]
            if not records:
                continue
            self._logged[id(engine)] = step
            prefix = self.prefix if len(engines) == 1 else f"{self.prefix}/{index}"
            values = {
                f"{prefix}/{r.name}/{m}": getattr(r, m)
                for r in records
                for m in self.metrics
                if math.isfinite(getattr(r, m))
            }
            values[f"{prefix}/drift_max"] = max(r.drift for r in records)
            values[f"{prefix}/residual_max"] = max(r.residual for r in records)
            pl_module.log_dict(values, on_step=True, on_epoch=False)
