"""Optimizer state at attach: what each per-parameter state tensor is, and how it is projected.

A constraint added to a warm optimizer must hold from the next step, so the state already held
for the parameter is made consistent with the set: first moments (momentum, ``exp_avg``) go onto
the tangent space; non-negative second moments (``exp_avg_sq``) stay non-negative (zeroed on held
entries, averaged within tied groups); a state tensor that is itself a point (ASGD's ``ax``) is
projected onto the set. LBFGS's curvature history (flat vectors over all its parameters, pairs
measured on the unconstrained problem) is dropped, so it restarts from the projected gradient.
Other state not shaped like the parameter (Adafactor's factored rows and columns) is left as it
is; the post-step projection covers those optimizers.

The zeros on held entries are the true values; on CPU the engine keeps a positive filler in the
live second moments there so that ``sqrt`` does not meet an exact 0 (`constrained_optim.filler`),
and every state dict, attach and detach reads or writes the true 0 back.
"""

from __future__ import annotations

import torch

from .constraints.base import Bound

FIRST_MOMENTS = frozenset({"momentum_buffer", "exp_avg", "grad_avg", "prev"})
SECOND_MOMENTS = frozenset(
    {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf", "step_size"}
)
POINTS = frozenset({"ax"})


def state_role(key: str, value, param: torch.Tensor) -> str | None:
    """``"moment"``, ``"scale"``, ``"point"`` or None (not shaped like the parameter)."""
    if not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return None
    if key in FIRST_MOMENTS:
        return "moment"
    if key in SECOND_MOMENTS:
        return "scale"
    if key in POINTS:
        return "point"
    # an optimizer this table does not know: a non-negative tensor is taken for a second moment
    return "scale" if bool((value >= 0).all()) else "moment"


LBFGS_HISTORY = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss", "al")


def restarted_history(optimizer: torch.optim.Optimizer, state: dict) -> dict | None:
    """LBFGS's per-parameter state with its curvature history dropped (a new dict), so it starts
    its next step afresh as on its first iteration; None for other optimizers."""
    if not isinstance(optimizer, torch.optim.LBFGS) or "n_iter" not in state:
        return None
    fresh = {k: v for k, v in state.items() if k not in LBFGS_HISTORY}
    fresh["n_iter"] = 0
    return fresh


@torch.no_grad()
def projected_state(bound: Bound, state: dict, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """New tensors for the state entries the set changes, computed on copies (``state`` is not
    touched); ``param`` is the already projected parameter (tangent spaces are taken there)."""
    out = {}
    for key, value in state.items():
        role = state_role(key, value, param)
        if role is None:
            continue
        new = value.clone()
        if role == "moment":
            bound.project_moment_(new, param)
        elif role == "scale":
            bound.project_scale_(new)
        else:
            bound.project_point_(new)
        out[key] = new
    return out
