"""Optimizer-side constraints for PyTorch: any ``torch.optim`` optimizer, parameters kept on a set."""

from .audit import AuditRecord
from .constraints import (
    Affine,
    Box,
    Constraint,
    Fixed,
    Intersection,
    Invariant,
    LowRank,
    Mask,
    MaxNorm,
    NMSparsity,
    NonNegative,
    NormBall,
    Orthogonal,
    Projection,
    Simplex,
    Subspace,
    Symmetric,
    Tied,
    UnitNorm,
)
from .errors import ConstraintError, ConstraintViolation
from .hooks import ConstraintHandle, constrain
from .optimizer import ConstrainedOptimizer

__version__ = "0.1.0"

__all__ = [
    "Affine",
    "AuditRecord",
    "Box",
    "ConstrainedOptimizer",
    "Constraint",
    "ConstraintError",
    "ConstraintHandle",
    "ConstraintViolation",
    "Fixed",
    "Intersection",
    "Invariant",
    "LowRank",
    "Mask",
    "MaxNorm",
    "NMSparsity",
    "NonNegative",
    "NormBall",
    "Orthogonal",
    "Projection",
    "Simplex",
    "Subspace",
    "Symmetric",
    "Tied",
    "UnitNorm",
    "constrain",
]
