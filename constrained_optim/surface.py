"""What `ConstrainedOptimizer` and `constrain`'s handle both offer, delegated to their engine."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeVar

from torch import nn

from .audit import Audit
from .constraints.base import Constraint

if TYPE_CHECKING:
    from .engine import ConstraintEngine

#: what ``attach`` and ``detach`` take: a parameter, module or glob name, a compiled regex, a
#: module class or the parameter itself
Target = str | re.Pattern[str] | type[nn.Module] | nn.Parameter

_Surface = TypeVar("_Surface", bound="EngineSurface")


class EngineSurface:
    """``attach``, ``detach``, ``project_``, ``project_module_``, ``check``, ``audit`` and
    ``steps_taken`` over ``self.engine`` (a `ConstraintEngine`)."""

    engine: ConstraintEngine

    def attach(self: _Surface, target: Target, constraint: Constraint) -> _Surface:
        """Constrain the parameters ``target`` names to ``constraint``'s set, from now on.

        ``target``: a parameter name (``"layer.weight"``; every name of a weight-tied parameter
        selects it, with or without a DDP/``torch.compile`` wrapper's prefix), a module name (its
        ``weight``), an ``fnmatch`` glob over parameter names, a compiled regex (``fullmatch``),
        a module class (the ``weight`` of every such module) or an ``nn.Parameter``. The
        parameters and the optimizer state already held for them are projected at once. A
        second constraint on a parameter means the intersection; the same constraint again
        changes nothing. A collective when parameters are sharded (each newly constrained one is
        gathered once, to bind the set and project it; under gloo it starts with a monitored
        barrier, so a call on some ranks only fails after ``CONSTRAINED_OPTIM_BARRIER_TIMEOUT``
        seconds instead of hanging): call it on every rank, in the same order. Raises
        `ConstraintError` and changes nothing if the target matches nothing, a parameter is not
        held by the wrapped optimizer, or the constraint cannot take its shape or dtype.
        """
        self.engine.attach(target, constraint)
        return self

    def detach(self: _Surface, target: Target) -> _Surface:
        """Remove every constraint from the parameters ``target`` names."""
        self.engine.detach(target)
        return self

    def project_(self) -> None:
        """Project every constrained parameter onto its set now. A collective when parameters are
        sharded (gathered sets gather, norm sets all-reduce; under gloo a monitored barrier
        first): call it on every rank."""
        self.engine.project_()

    def project_module_(self, module: nn.Module) -> None:
        """Project another module's parameters of the same names onto the attached sets.

        For an averaged or EMA copy (``torch.optim.swa_utils.AveragedModel``): an average of
        points of a convex set (every linear set, boxes, balls) stays in it, up to rounding, but
        an average of points of a non-convex set (`UnitNorm`, `Orthogonal`, `LowRank`, sparsity
        patterns that change) does not; ``project_module_(averaged)`` puts the copy back on
        the sets. Names may carry a wrapper's prefix (``module.``, ``_orig_mod.``). A collective
        when parameters are sharded (each constrained parameter and its copy are gathered):
        call it on every rank.
        """
        self.engine.project_module_(module)

    def check(self, atol: float | None = None) -> None:
        """Raise `ConstraintViolation` naming every parameter off its set, with its distance.

        The default ``atol`` is a few float eps relative to each parameter's scale (its norm,
        times the square root of the smaller side of its matrix view). A collective when
        parameters are sharded (one all-reduce of every parameter's distance and norm, so every
        rank raises alike; gathered sets gather; under gloo a monitored barrier first, so a call
        on some ranks only fails after ``CONSTRAINED_OPTIM_BARRIER_TIMEOUT`` seconds instead of
        hanging): call it on every rank."""
        self.engine.check(atol)

    @property
    def audit(self) -> Audit:
        return self.engine.audit

    @property
    def steps_taken(self) -> int:
        return self.engine.steps_taken

    def _describe(self, head: str) -> str:
        lines = [head] + [f"  {b.name}: {b.constraint!r}" for b in self.engine.bounds.values()]
        return "\n".join(lines) + ")"
