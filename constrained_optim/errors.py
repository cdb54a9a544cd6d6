"""The two exceptions the library raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ConstraintError(ValueError):
    """Bad input at construction or attach: a target, a shape, a dtype or an argument."""


class ConstraintViolation(RuntimeError):
    """A parameter is off its set (under ``on_violation="raise"`` or ``check()``)."""


def describe(name: str, param: torch.Tensor) -> str:
    """``"conv.weight (shape (8, 3, 3, 3), torch.float32)"``: how errors name a parameter."""
    return f"{name} (shape {tuple(param.shape)}, {param.dtype})"
