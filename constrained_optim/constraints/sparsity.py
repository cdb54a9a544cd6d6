"""N:M structured sparsity: at most ``n`` non-zeros in every group of ``m`` consecutive entries
along a dim (2:4 is what sparse tensor cores run).

The nearest N:M-sparse point keeps the ``n`` largest magnitudes of each group and zeros the rest.
With ``fixed=True`` that pattern is chosen once, at attach, and the set is then the linear set of
a `Mask` (gradients, momentum and second moments held at zero on pruned entries); with
``fixed=False`` it is chosen again at every projection, so pruned entries can grow back.
"""

from __future__ import annotations

import torch

from ..errors import ConstraintError, describe
from .base import Bound, Constraint, Traits, normalize_dims
from .coordinate import MaskBound
from .layout import input_dim

# -- pure maths ---------------------------------------------------------------------------------
#: groups up to this size are ranked by pairwise comparison (``m (m - 1) / 2`` compares), larger
#: ones by a sort
RANK_MAX_M = 8
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def nm_keep(x: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """A uint8 tensor shaped like ``x``: 1 on the ``n`` largest ``|x|`` of every group of ``m``
    consecutive entries along ``dim`` (ties go to the lower index), 0 elsewhere."""
    moved = x.movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).abs()
    if m <= RANK_MAX_M and groups.element_size() in _BITS:
        keep = _rank_keep(groups, n, m)
        return keep.view(moved.shape).movedim(-1, dim).contiguous()
    order = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(groups.shape, dtype=torch.uint8, device=x.device).scatter_(-1, order, 1)
    return keep.view(moved.shape).movedim(-1, dim).contiguous()


def _rank_keep(groups: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The stable descending sort's first ``n`` of each row of ``groups`` (magnitudes), without a
    sort: an entry's rank is how many entries of its row are larger, plus how many equal ones
    come before it. Compared as the bits of the magnitudes (ordered as the values for
    non-negative floats, NaN above inf, as the sort puts them), each pair once; the ranks are
    counted in one contiguous int8 plane per position (strided uint8 counters of the rows
    themselves cost twice as much), starting from the position: ``rank_j = j - #{i < j : x_j >
    x_i} + #{k > j : x_k > x_j}``."""
    rows = groups.reshape(-1, m)
    keys = rows.view(_BITS[rows.element_size()]).unbind(-1)
    rank = torch.arange(m, dtype=torch.int8, device=groups.device).unsqueeze(1).repeat(1, rows.shape[0])
    for i in range(m):
        for j in range(i + 1, m):
            later = (keys[j] > keys[i]).view(torch.int8)  # the later entry outranks only if larger
            rank[i].add_(later)
            rank[j].sub_(later)
    kept = rank.lt_(n).unbind(0)
    return torch.stack(kept, dim=1).view(torch.uint8).view(groups.shape)


# -- NMSparsity ------------------------------------------------------------------------------------
class NMSparsity(Constraint):
    """At most ``n`` non-zeros in every group of ``m`` consecutive entries along ``dim``.

    ``dim=None`` (default) is the owning layer's input dim (`layout`): -1 for ``nn.Linear`` and
    unknown modules, 1 (input channels) for ``nn.Conv*``, 0 for ``nn.ConvTranspose*`` and for
    layers stored ``(in, out)`` such as transformers' ``Conv1D``; a given ``dim`` always wins.
    ``fixed=True`` (default) chooses the pattern by magnitude at attach and then behaves exactly
    as a `Mask` with it (gradients and optimizer state are held at zero on pruned entries; the
    pattern is saved with the optimizer's ``state_dict``). ``fixed=False`` keeps the ``n`` largest
    of every ``m`` at each projection and does not project gradients. The size along the dim
    must be a multiple of ``m``.

    >>> import torch, constrained_optim as co
    >>> w = torch.nn.Parameter(torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]]))
    >>> with torch.no_grad():
    ...     co.NMSparsity(2, 4).bind(w, "w").project_(w)
    >>> w.data
    tensor([[ 0., -3.,  2.,  0.],
            [ 1.,  1.,  0.,  0.]])
    """

    def __init__(self, n: int = 2, m: int = 4, dim: int | None = None, fixed: bool = True) -> None:
        for what, v in (("n", n), ("m", m)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConstraintError(f"NMSparsity: {what} must be an int, got {v!r}")
        if m < 1 or not 1 <= n <= m:
            raise ConstraintError(f"NMSparsity: needs 1 <= n <= m, got n={n}, m={m}")
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool)):
            raise ConstraintError(f"NMSparsity: dim must be an int or None, got {dim!r}")
        self.n, self.m, self.dim, self.fixed = n, m, dim, bool(fixed)

    def _bind(self, param, name, owner):
        if param.dim() == 0:
            raise ConstraintError(f"{describe(name, param)}: {self!r} needs at least 1 dim")
        given = input_dim(owner, param) if self.dim is None else self.dim
        (dim,) = normalize_dims(given, param.dim(), name, param, repr(self))
        if param.shape[dim] % self.m:
            raise ConstraintError(
                f"{describe(name, param)}: {self!r} groups dim {dim} in runs of {self.m}, but its "
                f"size {param.shape[dim]} is not a multiple of {self.m}"
            )
        if self.fixed:
            with torch.no_grad():
                keep = nm_keep(param.detach(), self.n, self.m, dim)
            return NMMaskBound(self, name, param, keep, dim)
        return NMBound(self, name, param, dim)

    def __repr__(self):
        dim = f", dim={self.dim}" if self.dim is not None else ""
        fixed = "" if self.fixed else ", fixed=False"
        return f"NMSparsity({self.n}:{self.m}{dim}{fixed})"


def _per_group(keep: torch.Tensor, n: int, m: int, dim: int) -> bool:
    """Whether a 0/1 pattern keeps at most ``n`` of every ``m`` along ``dim``."""
    moved = keep.movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    return bool((groups.sum(-1) <= n).all())


class NMMaskBound(MaskBound):
    """The pattern chosen at attach, held as a `Mask` (a linear set from then on); checkpoint data
    must be an N:M pattern along the same dim."""

    constraint: NMSparsity

    def __init__(self, constraint, name, param, keep, dim):
        super().__init__(constraint, name, param, keep)
        self.dim = dim

    def check_values(self, tensors):
        ok, reason = super().check_values(tensors)
        c = self.constraint
        if ok and not _per_group(tensors["keep"], c.n, c.m, self.dim):
            return False, f"keep must keep at most {c.n} of every {c.m} along dim {self.dim}"
        return ok, reason


class NMBound(Bound):
    """The pattern chosen again at every projection; one unit is a group of ``m`` along ``dim``."""

    def __init__(self, constraint, name, param, dim):
        super().__init__(
            constraint, name, param, Traits(exact=True, reduces=(dim,), measured_projection=True)
        )
        self.n, self.m, self.dim = constraint.n, constraint.m, dim

    def project_(self, x):
        x.mul_(nm_keep(x, self.n, self.m, self.dim))

    def project_measured_(self, x, out=None):
        # the pattern chosen once: the entries it drops are the gap (x - x * keep, into ``out``)
        keep = nm_keep(x, self.n, self.m, self.dim)
        gap = torch.addcmul(x, x, keep, value=-1, out=out)
        x.mul_(keep)
        return gap

    def gap(self, x):
        return x * (1 - nm_keep(x, self.n, self.m, self.dim))
