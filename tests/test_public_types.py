"""The public API is annotated: every name in ``constrained_optim.__all__`` (classes: their
constructor and public methods and properties) has a type for each parameter and its return,
and the package ships ``py.typed`` so type checkers of user code read them (PEP 561)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import constrained_optim as co
from constrained_optim.audit import Audit


def public_callables():
    for name in co.__all__:
        obj = getattr(co, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj) and not issubclass(obj, BaseException):
            yield from members(name, obj)
    yield from members("Audit", Audit)


def members(name, cls):
    if "__init__" in vars(cls) or cls.__init__ is not object.__init__:
        yield f"{name}.__init__", cls.__init__
    for attr, value in inspect.getmembers(cls):
        if attr.startswith("_") or value is object.__init__:
            continue
        raw = inspect.getattr_static(cls, attr)
        if isinstance(raw, property):
            yield f"{name}.{attr}", raw.fget
        elif isinstance(raw, (classmethod, staticmethod)):
            yield f"{name}.{attr}", raw.__func__
        elif inspect.isfunction(raw) and raw.__module__.startswith("constrained_optim"):
            yield f"{name}.{attr}", raw


PUBLIC = sorted(dict(public_callables()).items())


@pytest.mark.parametrize("name, fn", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_api_is_annotated(name, fn):
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    missing = [
        p.name
        for i, p in enumerate(params)
        if p.annotation is inspect.Parameter.empty and not (i == 0 and p.name in ("self", "cls"))
    ]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    assert not missing, f"{name}{sig}: no annotation for {', '.join(missing)}"


def test_package_is_typed():
    assert (Path(co.__file__).parent / "py.typed").is_file()
