"""Targets to parameters, resolved once at attach.

A target is a parameter's name (``"layer.weight"``), a module's name (``"layer"``: its weight), an
`fnmatch` glob over parameter names (``"features.*.weight"``), a compiled `re.Pattern` (matched
with ``fullmatch``), a module class (``nn.Linear``: the weight of every such module) or an
`nn.Parameter`. `ParamIndex` resolves the model once: every name of every parameter (a
weight-tied parameter has several), the canonical name of each (its first name in the inner
model, the one checkpoints are keyed by) and the module that holds it. A model wrapped by
DDP/DataParallel (``module.``) or `torch.compile` (``_orig_mod.``) is looked through: names work
with or without the wrappers' prefixes.

>>> from torch import nn
>>> class LM(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.embed, self.norm, self.head = nn.Embedding(8, 4), nn.LayerNorm(4), nn.Linear(4, 8)
...         self.head.weight = self.embed.weight  # tied
>>> lm = LM()
>>> index = ParamIndex(nn.DataParallel(lm), torch.optim.SGD(lm.parameters(), lr=0.1))
>>> [m.name for m in select("module.head", index)]  # the tied head is the embedding's weight
['embed.weight']
>>> [m.name for m in select("*.weight", index)], [m.name for m in select(nn.Linear, index)]
(['embed.weight', 'norm.weight'], ['embed.weight'])
>>> [(m.name, type(m.owner).__name__) for m in select("*.bias", index)]
[('norm.bias', 'LayerNorm'), ('head.bias', 'Linear')]
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConstraintError

__all__ = ["Match", "ParamIndex", "select", "unwrap"]

GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Match:
    """One parameter a target selects."""

    name: str  # canonical: its first name in the inner model (wrapper prefixes stripped)
    param: nn.Parameter
    owner: nn.Module | None  # the module holding it as a direct parameter; None without a model

    def __eq__(self, other) -> bool:  # by identity of the tensors, never elementwise
        if not isinstance(other, Match):
            return NotImplemented
        return self.name == other.name and self.param is other.param and self.owner is other.owner

    def __hash__(self) -> int:
        return hash((self.name, id(self.param), id(self.owner)))


def _inner(model):
    """``(the wrapped module, the attribute that holds it)``, or ``(None, None)`` if ``model`` is
    not a DDP/DataParallel or torch.compile wrapper."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    if isinstance(model, parallel) and isinstance(getattr(model, "module", None), nn.Module):
        return model.module, "module"
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(inner, nn.Module) and isinstance(model, nn.Module):
        return inner, "_orig_mod"
    return None, None


def unwrap(model):
    """``model`` without its DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``)
    wrappers, however they are stacked."""
    while True:
        inner, _ = _inner(model)
        if inner is None:
            return model
        model = inner


def _wrapper_prefixes(model) -> list[str]:
    """The prefixes a name of the inner model takes at each level of wrapping, outermost first:
    ``["module._orig_mod.", "_orig_mod."]`` for ``DataParallel(torch.compile(m))``."""
    segments = []
    while True:
        inner, attr = _inner(model)
        if inner is None:
            break
        segments.append(attr)
        model = inner
    return [".".join(segments[i:]) + "." for i in range(len(segments))]


class ParamIndex:
    """The parameters a model (else the optimizer) has, by every name, resolved once.

    - ``names``: every name of every parameter, tied duplicates included, as the inner model
      names them (``named_parameters(remove_duplicate=False)`` of `unwrap` (model)); without a
      model, ``"param_groups[g].params[i]"`` for each parameter the optimizer holds.
    - ``name_of(param)``: its canonical name, the first of its names (what
      ``model.named_parameters()`` calls it); ``owner_of(param)``: the module whose own
      ``_parameters`` hold it under that name (None without a model).
    - ``lookup(name)``: the parameter with that name, with or without the wrappers' prefixes.
    """

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None = None):
        self.model = None if model is None else unwrap(model)
        self.prefixes: list[str] = [] if model is None else _wrapper_prefixes(model)
        self.names: dict[str, nn.Parameter] = {}
        self._canonical: dict[int, str] = {}  # id(param) -> canonical name
        self._owner: dict[int, nn.Module | None] = {}
        self._order: dict[int, int] = {}  # id(param) -> position of its canonical name
        if self.model is not None:
            for module_name, module in self.model.named_modules(remove_duplicate=False):
                for local, param in module._parameters.items():
                    if param is None:
                        continue
                    name = f"{module_name}.{local}" if module_name else local
                    self._add(name, param, module)
        elif optimizer is not None:
            for g, group in enumerate(optimizer.param_groups):
                for i, param in enumerate(group["params"]):
                    self._add(f"param_groups[{g}].params[{i}]", param, None)

    def _add(self, name: str, param: nn.Parameter, owner: nn.Module | None) -> None:
        if name in self.names:  # a module reachable twice repeats its names
            return
        self.names[name] = param
        if id(param) not in self._canonical:
            self._canonical[id(param)] = name
            self._owner[id(param)] = owner
            self._order[id(param)] = len(self._order)

    # -- queries -----------------------------------------------------------------------------------
    def __contains__(self, param) -> bool:
        return id(param) in self._canonical

    def name_of(self, param) -> str:
        """The canonical name of ``param``; `KeyError` if the index does not have it."""
        try:
            return self._canonical[id(param)]
        except KeyError:
            raise KeyError(f"parameter of shape {tuple(param.shape)} is not in the index") from None

    def owner_of(self, param) -> nn.Module | None:
        """The module holding ``param`` under its canonical name (None without a model)."""
        self.name_of(param)  # KeyError for a stranger
        return self._owner[id(param)]

    def lookup(self, name: str) -> nn.Parameter | None:
        """The parameter called ``name`` (inner, or with a wrapper's prefix); None if none."""
        param = self.names.get(name)
        if param is not None:
            return param
        for prefix in self.prefixes:
            if name.startswith(prefix):
                return self.names.get(name[len(prefix) :])
        return None

    def match(self, param) -> Match:
        return Match(self.name_of(param), param, self._owner[id(param)])

    def all_names(self):
        """``(name, param)`` for every name, also with each wrapper's prefix (for globs)."""
        for prefix in ("", *self.prefixes):
            for name, param in self.names.items():
                yield prefix + name, param

    def matches(self, params) -> list[Match]:
        """Each of ``params`` once, in model order."""
        unique = {id(p): p for p in params}
        return [self.match(p) for p in sorted(unique.values(), key=lambda p: self._order[id(p)])]

    def __repr__(self) -> str:
        return f"ParamIndex({len(self._canonical)} parameters, {len(self.names)} names)"


def select(target, index: ParamIndex) -> list[Match]:
    """The parameters ``target`` means, each once, in model order; raises `ConstraintError` if
    none (naming the closest parameter names)."""
    if isinstance(target, torch.Tensor):
        if target not in index:
            raise ConstraintError(f"parameter of shape {tuple(target.shape)} is not a parameter of the model")
        return [index.match(target)]
    if isinstance(target, re.Pattern):
        found = [p for n, p in index.all_names() if target.fullmatch(n)]
        return index.matches(found) or no_match(f"regex {target.pattern!r}", target.pattern, index)
    if isinstance(target, type) and issubclass(target, nn.Module):
        return _select_class(target, index)
    if not isinstance(target, str):
        raise ConstraintError(
            "target must be a parameter or module name, a glob, a compiled regex, a module class "
            f"or a parameter, got {type(target).__name__}"
        )
    for name in (target, f"{target}.weight"):
        param = index.lookup(name)
        if param is not None:
            return [index.match(param)]
    if GLOB_CHARS & set(target):
        found = [p for n, p in index.all_names() if fnmatch.fnmatchcase(n, target)]
        return index.matches(found) or no_match(f"glob {target!r}", target, index)
    return no_match(repr(target), target, index)


def _select_class(cls: type, index: ParamIndex) -> list[Match]:
    model = index.model
    if model is None:
        raise ConstraintError(f"a module class ({cls.__name__}) as target needs the model")
    found = []
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(module, cls) and weight is not None and weight in index:
            found.append(weight)
    if found:
        return index.matches(found)
    classes = list(dict.fromkeys(type(m).__name__ for m in model.modules()))
    held = [c for c in classes if c == cls.__name__]
    why = "has no weight parameter" if held else "is not among the model's modules"
    raise ConstraintError(
        f"module class {cls.__module__}.{cls.__qualname__} {why}; the model has: {', '.join(classes)}"
    )


def no_match(what: str, text: str, index: ParamIndex) -> list:
    names = list(index.names)
    close = difflib.get_close_matches(text, names, n=5, cutoff=0.4)
    if not close and index.prefixes:  # a wrapped name typed against the inner ones
        for prefix in index.prefixes:
            if text.startswith(prefix):
                close = difflib.get_close_matches(text[len(prefix) :], names, n=5, cutoff=0.4)
                break
    hint = f"; closest: {', '.join(close)}" if close else f"; parameters: {', '.join(names[:8])}"
    raise ConstraintError(f"{what} matches no parameter{hint}")
