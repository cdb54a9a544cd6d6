"""The constraint families; each module holds the maths as pure functions and thin classes."""

from .base import Bound, Constraint
from .coordinate import Fixed, Mask
from .linear import Affine, Subspace
from .symmetry import Invariant, Symmetric, Tied

__all__ = ["Affine", "Bound", "Constraint", "Fixed", "Invariant", "Mask", "Subspace", "Symmetric", "Tied"]
