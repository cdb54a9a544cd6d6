"""The constraint families; each module holds the maths as pure functions and thin classes."""

from .base import Bound, Constraint
from .composite import Intersection, Projection
from .coordinate import Box, Fixed, Mask, NonNegative
from .linear import Affine, Subspace
from .manifolds import LowRank, Orthogonal
from .norms import MaxNorm, NormBall, Simplex, UnitNorm
from .sparsity import NMSparsity
from .symmetry import Invariant, Symmetric, Tied

__all__ = [
    "Affine",
    "Bound",
    "Box",
    "Constraint",
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
]
