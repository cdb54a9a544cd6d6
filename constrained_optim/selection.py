"""Targets to parameters: ``"layer.weight"``, ``"layer"`` (its weight), ``"features.*.weight"``,
``re.compile(...)``, or an ``nn.Parameter``. Resolved once, at attach."""

from __future__ import annotations

import difflib
import fnmatch
import re

import torch
from torch import nn

from .errors import ConstraintError

GLOB_CHARS = frozenset("*?[")


def parameter_names(model: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict[str, nn.Parameter]:
    """Name -> parameter for every parameter the model has, else those the optimizer holds."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
        model = model._orig_mod
    if model is not None:
        return dict(model.named_parameters())
    return {
        f"param_groups[{g}].params[{i}]": p
        for g, group in enumerate(optimizer.param_groups)
        for i, p in enumerate(group["params"])
    }


def select(target, names: dict[str, nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs ``target`` means; raises `ConstraintError` if none."""
    if isinstance(target, torch.Tensor):
        found = [(n, p) for n, p in names.items() if p is target]
        if not found:
            raise ConstraintError(
                f"parameter of shape {tuple(target.shape)} is not a parameter of the model"
            )
        return found[:1]
    if isinstance(target, re.Pattern):
        found = [(n, p) for n, p in names.items() if target.fullmatch(n)]
        return found or no_match(f"regex {target.pattern!r}", target.pattern, names)
    if not isinstance(target, str):
        raise ConstraintError(
            f"target must be a name, a glob, a compiled regex or a parameter, got {type(target).__name__}"
        )
    if target in names:
        return [(target, names[target])]
    if f"{target}.weight" in names:
        return [(f"{target}.weight", names[f"{target}.weight"])]
    if GLOB_CHARS & set(target):
        found = [(n, p) for n, p in names.items() if fnmatch.fnmatchcase(n, target)]
        return found or no_match(f"glob {target!r}", target, names)
    return no_match(repr(target), target, names)


def no_match(what: str, text: str, names) -> list:
    close = difflib.get_close_matches(text, list(names), n=5, cutoff=0.4)
    hint = f"; closest: {', '.join(close)}" if close else f"; parameters: {', '.join(list(names)[:8])}"
    raise ConstraintError(f"{what} matches no parameter{hint}")
