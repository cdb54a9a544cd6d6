"""Optimizer-side constraints for PyTorch: any ``torch.optim`` optimizer, parameters kept on a set."""

from .audit import AuditRecord
from .constraints import Affine, Constraint, Fixed, Invariant, Mask, Subspace, Symmetric, Tied
from .errors import ConstraintError, ConstraintViolation
from .hooks import ConstraintHandle, constrain
from .optimizer import ConstrainedOptimizer

__version__ = "0.1.0"

__all__ = [
    "Affine",
    "AuditRecord",
    "ConstrainedOptimizer",
    "Constraint",
    "ConstraintError",
    "ConstraintHandle",
    "ConstraintViolation",
    "Fixed",
    "Invariant",
    "Mask",
    "Subspace",
    "Symmetric",
    "Tied",
    "constrain",
]
