"""A positive filler in the held entries of CPU second-moment state, never seen from outside.

On a CPU, ``sqrt`` of an exact 0 (or of a denormal) is several times slower than of a normal
number. A parameter whose set holds entries at 0 (`Mask`, ``Fixed(..., 0.0)``, a fixed
`NMSparsity` pattern, intersections holding entries) gets exactly-zero gradients there, so
Adam's ``exp_avg_sq`` is exactly 0 on those entries and its step takes about twice as long as a
dense one. The update on a held entry is ``exp_avg / (sqrt(v) + eps)`` with ``exp_avg`` exactly
0, so it is exactly 0 (with the same sign) for every positive finite ``v``: the engine keeps ``v``
at a normal positive value there (1.0, put back before it decays to the smallest normal's square
root), and the parameters stay bit for bit what they were without it.

Invisible: the state dicts the optimizer hands out (``optimizer.state_dict()``, through a
state-dict post-hook placed first; hence `ConstrainedOptimizer.state_dict` and a `constrain`
handle's checkpoints) hold copies with the true 0 on held entries; the live state is not
changed. Detach, a removed handle, a rebinding and a collected engine write the 0 back; attach
reads the true values. Only state verified to be exactly 0 on the held entries when first seen
is filled (from then on the constrained step keeps it 0: the projected gradient and the
parameter are exactly 0 there), so state loaded with other values there is left as it is.

Resolved at attach: which parameters (plain CPU tensors, not DTensor shards; on an accelerator
``sqrt(0)`` is not slow), their held entries (`Bound.held_zeros`, once per bound) and which state
keys (per optimizer class, checked against its maths: Adam, AdamW, NAdam, RAdam ``exp_avg_sq``
and ``max_exp_avg_sq``; RMSprop ``square_avg``; Adagrad ``sum``. Not Adadelta, whose ``sqrt``
takes ``v + eps``, nor Adamax, whose ``exp_inf`` is at least ``eps``). The step only counts: a
held value decays by the group's ``beta2`` (``alpha`` for RMSprop, 1 for Adagrad) per step, and
is put back in one pass when the next step would take it below ``sqrt(finfo.tiny)``, so for
Adam's 0.999 in float32 once in about 43,000 steps, for any beta in (0, 1) before it is subnormal.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch

from .binding import Binding
from .checkpoint import _ordered
from .constraints.base import Bound, HeldZeros
from .distributed import is_sharded


def _beta2(group: dict) -> float:
    return float(group["betas"][1])


#: optimizer class -> (state keys whose held entries feed a sqrt, per-step decay of their value)
FILLED: dict[type, tuple[tuple[str, ...], Callable[[dict], float]]] = {
    torch.optim.Adam: (("exp_avg_sq", "max_exp_avg_sq"), _beta2),
    torch.optim.AdamW: (("exp_avg_sq", "max_exp_avg_sq"), _beta2),
    torch.optim.NAdam: (("exp_avg_sq",), _beta2),
    torch.optim.RAdam: (("exp_avg_sq",), _beta2),
    torch.optim.RMSprop: (("square_avg",), lambda g: float(g["alpha"])),
    torch.optim.Adagrad: (("sum",), lambda g: 1.0),
}

FILL = 1.0

_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bound -> HeldZeros | None


def held_of(bound: Bound) -> HeldZeros | None:
    """``bound.held_zeros()``, resolved once per bound."""
    try:
        return _HELD[bound]
    except KeyError:
        found = _HELD[bound] = bound.held_zeros()
        return found


class _Record:
    """One state tensor seen by the filler: verified (exactly 0 on the held entries when first
    seen) or not, and the log of a lower bound of its held value."""

    __slots__ = ("ref", "param", "held", "ok", "level", "floor")

    def __init__(self, tensor: torch.Tensor, param, held: HeldZeros, ok: bool):
        self.ref = weakref.ref(tensor)
        self.param = weakref.ref(param)
        self.held = held
        self.ok = ok
        self.level = -math.inf  # not filled yet
        self.floor = 0.5 * math.log(torch.finfo(tensor.dtype).tiny)

    @property
    def filled(self) -> bool:
        return self.ok and self.level > -math.inf


class Filler:
    """The filler of one engine's optimizer (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.keys, self.decay = FILLED.get(type(optimizer), ((), _beta2))
        self.plan: list[tuple[torch.nn.Parameter, HeldZeros, int, int]] = []
        self.records: dict[int, _Record] = {}
        self._hook = optimizer.register_state_dict_post_hook(self.true_state_dict, prepend=True)

    # -- resolved at attach --------------------------------------------------------------------------
    def planned(self, binding: Binding, optimizer: torch.optim.Optimizer) -> list:
        """The plan for ``binding`` (computed on the side: `commit` installs it)."""
        plan: list[tuple[torch.nn.Parameter, HeldZeros, int, int]] = []
        if not self.keys:
            return plan
        where = {
            id(p): (gi, i) for gi, g in enumerate(optimizer.param_groups) for i, p in enumerate(g["params"])
        }
        for param, bound in binding.bounds.items():
            if param.device.type != "cpu" or is_sharded(param) or id(param) not in where:
                continue
            held = held_of(bound)
            if held is not None:
                plan.append((param, held, *where[id(param)]))
        return plan

    def commit(self, plan: list, rewritten=()) -> None:
        """Install ``plan``. State filled for held entries the plan no longer has gets its true 0
        back, except state in ``rewritten`` (attach wrote it whole, from the true values)."""
        now = {id(p): h for p, h, _, _ in plan}
        skip = {id(p) for p in rewritten}
        for key, rec in list(self.records.items()):
            param = rec.param()
            if rec.ref() is None or param is None:
                del self.records[key]
                continue
            if now.get(id(param)) is rec.held:
                continue
            del self.records[key]
            if id(param) not in skip:
                self._unfill(rec)
        self.plan = plan

    # -- the step: arithmetic only ---------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, optimizer: torch.optim.Optimizer) -> None:
        """Before a step: put the filler back where the step would take it below its floor."""
        state, groups = optimizer.state, optimizer.param_groups
        for param, held, gi, i in self.plan:
            entry = state.get(param)
            if not entry:
                continue  # no state yet: the first step creates it
            group = groups[gi] if gi < len(groups) else None
            if group is None or i >= len(group["params"]) or group["params"][i] is not param:
                continue  # param_groups rearranged since attach: left alone (never wrong)
            factor = self.decay(group)
            step = math.log(factor) if factor > 0 else -math.inf
            for key in self.keys:
                v = entry.get(key)
                if v is None:
                    continue
                rec = self.records.get(id(v))
                if rec is None or rec.ref() is not v:
                    rec = self.records[id(v)] = self._first_sight(v, param, held)
                if not rec.ok:
                    continue
                if rec.level + step < rec.floor:
                    if step < rec.floor:  # one step takes even 1.0 below it (beta2 ~ 0): no use
                        continue
                    held.put_(v, FILL)
                    rec.level = 0.0
                rec.level += step

    @staticmethod
    def _first_sight(v: torch.Tensor, param, held: HeldZeros) -> _Record:
        ok = (
            v.device.type == "cpu"
            and v.is_floating_point()
            and v.shape == param.shape
            and not is_sharded(v)
            and held.all_zero(v)
        )
        return _Record(v, param, held, ok)

    def forget(self, params) -> None:
        """The held entries of ``params``' state were written (a repair): fill them again at the
        next step."""
        ids = {id(p) for p in params}
        for rec in self.records.values():
            if id(rec.param()) in ids and rec.ok:
                rec.level = -math.inf

    # -- the true values -------------------------------------------------------------------------------
    def true_value(self, v: object) -> object:
        """``v`` with the true 0 on filled held entries (a copy), or ``v`` itself."""
        if not isinstance(v, torch.Tensor):
            return v
        rec = self.records.get(id(v))
        if rec is None or rec.ref() is not v or not rec.filled:
            return v
        return rec.held.zeroed(v)

    @torch.no_grad()
    def true_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        """A state-dict post-hook: the filled keys of planned parameters as copies with their true
        values (copies even where nothing is filled yet, so a state dict kept across later steps
        never shows the filler); the live state and the optimizer's per-parameter dicts are not
        touched. Other entries stay torch's own (references)."""
        if not self.plan:
            return state_dict
        planned = {id(p) for p, _, _, _ in self.plan}
        state = dict(state_dict["state"])
        for pid, param in _ordered(optimizer, state_dict):
            entry = state.get(pid)
            if id(param) not in planned or not isinstance(entry, dict):
                continue
            true = dict(entry)
            for key in self.keys:
                v = entry.get(key)
                if isinstance(v, torch.Tensor):
                    value = self.true_value(v)
                    true[key] = value.clone() if value is v else value
            state[pid] = true
        out = dict(state_dict)
        out["state"] = state
        return out

    @torch.no_grad()
    def _unfill(self, rec: _Record) -> None:
        v = rec.ref()
        if v is not None and rec.filled:
            rec.held.put_(v, 0.0)
            rec.level = -math.inf

    def release(self) -> None:
        """Write the true 0 back everywhere and stop (a removed handle, a collected engine)."""
        for rec in self.records.values():
            self._unfill(rec)
        self.records.clear()
        self.plan = []
        self._hook.remove()
