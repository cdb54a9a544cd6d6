"""The constraints' part of a checkpoint: written fresh, validated whole before anything loads.

Layout (plain Python data and tensors, so ``torch.load(weights_only=True)`` reads it)::

    {"version": 1, "steps_taken": int, "audit": Audit.state_dict(),
     "parameters": {name: {"type": str, "constraint": repr, "shape": tuple, "tensors": {key: Tensor}}}}

`save` copies every tensor, so a saved dict never changes with later steps or loads.

Distributed checkpoints (``torch.distributed.checkpoint``): ``get_state_dict(model, opt)`` keeps
only the optimizer's ``"state"`` (re-keyed by parameter name) and ``"param_groups"``, so there the
same data rides in each constrained parameter's own entry (`into_param_state`)::

    state[fqn]["constraint.spec"]         JSON: name, type, constraint, shape
    state[fqn]["constraint.steps_taken"]  0-d int64 tensor (every entry)
    state[fqn]["constraint.data.<key>"]   the bound's data; a DTensor sharded like the parameter
                                          for a sharded one, so DCP reshards it like ``exp_avg``
    state[fqn]["constraint.audit"]        JSON of the audit (history and summaries), first entry

Every key exists however long the run, so a fresh optimizer's state dict matches a saved one key
for key (the audit travels as one opaque leaf whatever its length). `from_param_state` reads it
back into the layout above, and `plan_load` validates it as any checkpoint. ``StateDictOptions(
flatten_optimizer_state_dict=True)`` is not supported (it keeps only the optimizer's own keys).
`plan_load` checks every field (version, types, values, shapes, each family's data through
`Bound.check_state`) and builds the new bounds and audit off to the side; the engine then swaps
them in. A checkpoint that does not fit raises `ConstraintError` listing every problem, and
nothing has changed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from .audit import Audit, AuditRecord, ParamSummary
from .binding import Binding
from .constraints.base import Bound
from .distributed import called_from
from .errors import ConstraintError

CHECKPOINT_VERSION = 1
NO_CONSTRAINT_STATE = (
    "the checkpoint holds no constraint state (it was not saved by a ConstrainedOptimizer or a "
    "constrain() handle); to start constraints from a plain optimizer's checkpoint, load it into "
    "the wrapped optimizer first and attach afterwards"
)


def save(binding: Binding, steps_taken: int, audit: Audit) -> dict:
    return {
        "version": CHECKPOINT_VERSION,
        "steps_taken": steps_taken,
        "audit": audit.state_dict(),
        "parameters": {
            b.name: {
                "type": type(b.constraint).__name__,
                "constraint": repr(b.constraint),
                "shape": tuple(b.shape),
                "tensors": {k: v.detach().clone() for k, v in b.state_tensors().items()},
            }
            for b in binding.bounds.values()
        },
    }


@dataclass(frozen=True)
class LoadPlan:
    """What a validated checkpoint loads: new bounds (built from its data), audit and count."""

    bounds: dict[nn.Parameter, Bound]
    audit: Audit
    steps_taken: int


def plan_load(state, binding: Binding) -> LoadPlan:
    """Validate ``state`` against the attached constraints; raise listing every problem."""
    if not isinstance(state, dict) or not {"steps_taken", "audit", "parameters"} <= set(state):
        raise ConstraintError(NO_CONSTRAINT_STATE)
    _check_version(state.get("version", None), "version" in state)
    problems, mismatches = [], []
    steps = state["steps_taken"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        problems.append(f"steps_taken must be an int >= 0, got {steps!r}")
    audit, why = _audit_from(state["audit"])
    if audit is None:
        problems.append(f"the audit state cannot be loaded: {why}")
    saved = state["parameters"]
    bounds: dict[nn.Parameter, Bound] = {}
    if not isinstance(saved, dict):
        problems.append(f"parameters must be a dict of name -> entry, got {type(saved).__name__}")
    else:
        mismatches = _parameter_problems(saved, binding, bounds)
    if problems or mismatches:
        head = (
            "the checkpoint's constraints do not match the attached ones"
            if mismatches and not problems
            else "the checkpoint's constraint state does not fit"
        )
        raise ConstraintError(
            f"{head} (nothing was loaded):\n  "
            + "\n  ".join(problems + mismatches)
            + "\nattach the same constraints to the same parameters before loading; to resume "
            "with other constraints, load the wrapped optimizer's state alone and attach them after"
        )
    assert audit is not None  # else a problem above raised
    return LoadPlan(bounds, audit, steps)


def _check_version(version, present: bool) -> None:
    if not present:
        raise ConstraintError("the checkpoint's constraint state has no format version (nothing was loaded)")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConstraintError(f"the checkpoint's constraint format version must be an int, got {version!r}")
    if version > CHECKPOINT_VERSION:
        raise ConstraintError(
            f"the checkpoint's constraint state is format {version}, newer than this constrained_optim "
            f"reads ({CHECKPOINT_VERSION}); upgrade constrained_optim (nothing was loaded)"
        )
    if version != CHECKPOINT_VERSION:
        raise ConstraintError(
            f"the checkpoint's constraint state is format {version}; this constrained_optim reads "
            f"format {CHECKPOINT_VERSION} (nothing was loaded)"
        )


ENTRY_KEYS = {"type", "constraint", "shape", "tensors"}


def _parameter_problems(saved: dict, binding: Binding, out: dict) -> list[str]:
    """Every difference between the saved entries and the attached bounds; fills ``out`` with the
    new bounds where an entry fits."""
    attached = {b.name: (p, b) for p, b in binding.bounds.items()}
    problems = [
        f"{name}: the checkpoint constrains it to "
        f"{entry.get('constraint') if isinstance(entry, dict) else entry}; here it has no constraint"
        for name, entry in saved.items()
        if name not in attached
    ]
    for name, (param, bound) in attached.items():
        here = repr(bound.constraint)
        entry = saved.get(name)
        if entry is None:
            problems.append(f"{name}: constrained to {here} here; the checkpoint has no constraint on it")
            continue
        if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            problems.append(f"{name}: entry {keys}, expected a dict with keys {sorted(ENTRY_KEYS)}")
            continue
        shape = entry["shape"]
        if entry["type"] != type(bound.constraint).__name__:
            problems.append(
                f"{name}: constraint type {entry['type']} ({entry['constraint']}) in the checkpoint, "
                f"{type(bound.constraint).__name__} ({here}) here"
            )
        elif not isinstance(shape, (tuple, list)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in shape
        ):
            problems.append(f"{name}: shape must be a tuple of ints, got {shape!r}")
        elif tuple(shape) != bound.shape:
            problems.append(f"{name}: shape {tuple(shape)} in the checkpoint, {bound.shape} here")
        elif entry["constraint"] != here:
            problems.append(f"{name}: {entry['constraint']} in the checkpoint, {here} here")
        else:
            ok, reason = bound.check_state(entry["tensors"])
            if not ok:
                problems.append(f"{name}: {here}: {reason}")
            else:
                out[param] = bound.with_state(entry["tensors"])
    return problems


_RECORD_TYPES = {f.name: f.type for f in fields(AuditRecord)}


def _audit_from(state) -> tuple[Audit | None, str]:
    """A new `Audit` from its ``state_dict``, or None and what is wrong."""
    if not isinstance(state, dict):
        return None, f"must be a dict, got {type(state).__name__}"
    for key in ("history", "last"):
        records = state.get(key)
        if not isinstance(records, list):
            return None, f"{key} must be a list of records, got {type(records).__name__}"
        for i, r in enumerate(records):
            ok, why = _record_ok(r)
            if not ok:
                return None, f"{key}[{i}]: {why}"
    summaries = state.get("summaries", [])
    if not isinstance(summaries, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) for s in summaries
    ):
        return None, "summaries must be a list of dicts with a name"
    names = {f.name for f in fields(ParamSummary)}
    for s in summaries:
        for k, v in s.items():
            if (
                k in names
                and k not in ("name", "constraint")
                and v is not None
                and (isinstance(v, bool) or not isinstance(v, (int, float)))
            ):
                return None, f"summary {s['name']}: {k} must be a number, got {v!r}"
    max_history = state.get("max_history", 10_000)
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 0:
        return None, f"max_history must be an int >= 0, got {max_history!r}"
    audit = Audit()
    try:
        audit.load_state_dict(state)
    except (ValueError, TypeError, KeyError) as err:
        return None, str(err)
    return audit, ""


def _record_ok(r) -> tuple[bool, str]:
    if not isinstance(r, dict) or set(r) != set(_RECORD_TYPES):
        got = sorted(r) if isinstance(r, dict) else type(r).__name__
        return False, f"record {got}, expected the fields {sorted(_RECORD_TYPES)}"
    if isinstance(r["step"], bool) or not isinstance(r["step"], int) or r["step"] < 0:
        return False, f"step must be an int >= 0, got {r['step']!r}"
    for key in ("name", "constraint"):
        if not isinstance(r[key], str):
            return False, f"{key} must be a string, got {r[key]!r}"
    for key in ("drift", "drift_max", "residual", "grad_blocked"):
        v = r[key]
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or (key != "grad_blocked" and not math.isnan(v) and v < 0)
        ):
            return False, f"{key} must be a number >= 0 (or nan), got {v!r}"
    return True, ""


def check_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict, binding: Binding) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, and the shapes of the per-parameter state
    of constrained parameters, made before anything is loaded."""
    from .state import FIRST_MOMENTS, POINTS, SECOND_MOMENTS

    saved = state_dict.get("param_groups")
    saved_state = state_dict.get("state")
    if (
        not isinstance(saved, list)
        or not isinstance(saved_state, dict)
        or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved)
    ):
        raise ConstraintError("the checkpoint holds no optimizer state (no 'state' and 'param_groups')")
    here = [len(g["params"]) for g in optimizer.param_groups]
    there = [len(g["params"]) for g in saved]
    if here != there:
        raise ConstraintError(
            f"the checkpoint's parameter groups hold {there} parameters, the wrapped "
            f"{type(optimizer).__name__}'s hold {here} (nothing was loaded)"
        )
    ids = [i for g in saved for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    shaped = FIRST_MOMENTS | SECOND_MOMENTS | POINTS
    problems = []
    for saved_id, param in zip(ids, params):
        bound = binding.bounds.get(param)
        entry = saved_state.get(saved_id)
        if bound is None or not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if key in shaped and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(param.shape):
                problems.append(
                    f"{bound.name}: optimizer state {key} of shape {tuple(value.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
    if problems:
        raise ConstraintError(
            "the checkpoint's optimizer state does not fit (nothing was loaded):\n  " + "\n  ".join(problems)
        )


# -- distributed checkpoints: the constraint state in the parameters' own entries ---------------------
PREFIX = "constraint."


def called_by_dcp() -> bool:
    """Whether ``torch.distributed.checkpoint``'s ``get_state_dict`` asks for this state dict (it
    keeps the per-parameter entries only)."""
    return called_from("_get_optim_state_dict")


def _ordered(optimizer, state_dict) -> list[tuple[object, nn.Parameter]]:
    """(saved id, live parameter) in order, as ``Optimizer.load_state_dict`` pairs them."""
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list):
        return []
    ids = [i for g in saved if isinstance(g, dict) for i in g.get("params", [])]
    return list(zip(ids, [p for g in optimizer.param_groups for p in g["params"]]))


def into_param_state(state_dict: dict, optimizer, binding: Binding, constraints: dict) -> dict:
    """``state_dict`` (a new dict; its entries copied, never the optimizer's own) with the
    constraint state in the constrained parameters' entries, for ``get_state_dict``."""
    out = dict(state_dict)
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    audit = json.dumps(constraints["audit"])
    first = True
    for pid, param in _ordered(optimizer, state_dict):
        bound = binding.bounds.get(param)
        if bound is None:
            continue
        entry = constraints["parameters"][bound.name]
        slot = state.setdefault(pid, {})
        slot[PREFIX + "spec"] = json.dumps(
            {
                "name": bound.name,
                "type": entry["type"],
                "constraint": entry["constraint"],
                "shape": list(entry["shape"]),
            }
        )
        slot[PREFIX + "steps_taken"] = torch.tensor(constraints["steps_taken"], dtype=torch.int64)
        for key, value in entry["tensors"].items():
            slot[PREFIX + "data." + key] = value
        if first:
            slot[PREFIX + "audit"] = audit
            first = False
    out["state"] = state
    return out


def from_param_state(state_dict: dict) -> tuple[dict | None, dict]:
    """The constraint state held in per-parameter entries (a distributed checkpoint) in the layout
    `plan_load` reads, or None if there is none; and ``state_dict`` without those entries (a new
    dict: the caller's is not changed). Raises `ConstraintError` for entries that do not parse."""
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(state, dict) or not any(
        isinstance(e, dict) and any(isinstance(k, str) and k.startswith(PREFIX) for k in e)
        for e in state.values()
    ):
        return None, state_dict
    stripped, parameters, steps, audit, problems = {}, {}, set(), None, []
    for pid, entry in state.items():
        if not isinstance(entry, dict):
            stripped[pid] = entry
            continue
        mine = {k: v for k, v in entry.items() if isinstance(k, str) and k.startswith(PREFIX)}
        rest = {k: v for k, v in entry.items() if k not in mine}
        if rest or not mine:
            stripped[pid] = rest
        if not mine:
            continue
        try:
            spec = json.loads(mine[PREFIX + "spec"])
            name = spec["name"]
            parameters[name] = {
                "type": spec["type"],
                "constraint": spec["constraint"],
                "shape": tuple(spec["shape"]),
                "tensors": {
                    k[len(PREFIX + "data.") :]: v for k, v in mine.items() if k.startswith(PREFIX + "data.")
                },
            }
            count = mine[PREFIX + "steps_taken"]
            steps.add(
                int(count)
                if isinstance(count, torch.Tensor) and count.numel() == 1 and not count.is_floating_point()
                else repr(count)
            )
            if PREFIX + "audit" in mine:
                audit = json.loads(mine[PREFIX + "audit"])
        except (KeyError, TypeError, ValueError) as err:
            problems.append(
                f"parameter entry {pid!r}: unreadable constraint state ({type(err).__name__}: {err})"
            )
    if audit is None:
        problems.append("no entry holds the audit (constraint.audit)")
    if len(steps) != 1 or not isinstance(next(iter(steps), None), int):
        problems.append(
            f"the entries disagree on steps_taken or do not hold an int: {sorted(map(str, steps))}"
        )
    if problems:
        raise ConstraintError(
            "the checkpoint's constraint state does not fit (nothing was loaded):\n  " + "\n  ".join(problems)
        )
    rest = dict(state_dict)
    rest["state"] = stripped
    return {
        "version": CHECKPOINT_VERSION,
        "steps_taken": steps.pop(),
        "audit": audit,
        "parameters": parameters,
    }, rest


def split_constraints(state_dict: dict) -> tuple[object, dict]:
    """``(constraint state, optimizer state_dict)`` from a checkpoint: the ``"constraints"`` entry
    of `ConstrainedOptimizer.state_dict`, else the per-parameter entries of a distributed
    checkpoint; neither: None. ``state_dict`` is not changed."""
    state_dict = dict(state_dict)
    constraints = state_dict.pop("constraints", None)
    from_entries, state_dict = from_param_state(state_dict)
    return (constraints if constraints is not None else from_entries), state_dict
