"""A constraint family written outside the library: every slice along ``dim`` has mean 0.

Run it: ``.venv/bin/python docs/snippets/zero_mean.py``.
"""

from __future__ import annotations

import torch

import constrained_optim as co
from constrained_optim.constraints.base import Bound, Constraint, Traits


class ZeroMean(Constraint):
    """``{W : W.mean(dim) = 0}``: each slice along ``dim`` sums to zero (a linear subspace)."""

    linear = True

    def __init__(self, dim: int = -1):
        self.dim = dim

    def _bind(self, param, name, owner):
        # validate against this one parameter; raise ConstraintError if it cannot take the set
        # (attach then changes nothing), naming the parameter and what was expected
        if not -param.dim() <= self.dim < param.dim():
            raise co.ConstraintError(
                f"{name} (shape {tuple(param.shape)}): {self!r} needs dim in [{-param.dim()}, {param.dim()})"
            )
        return ZeroMeanBound(self, name, param, self.dim % param.dim())

    def __repr__(self):
        return f"ZeroMean(dim={self.dim})"


class ZeroMeanBound(Bound):
    def __init__(self, constraint, name, param, dim):
        # what the set is, stated once: linear and convex, the gradient is projected, the
        # projection is exact only to rounding, and one unit spans `dim`
        traits = Traits(linear=True, convex=True, projects_grad=True, reduces=(dim,))
        super().__init__(constraint, name, param, traits)
        self.dim = dim

    def project_(self, x):
        # compute the result, then write it back with one in-place op
        x.sub_(x.mean(self.dim, keepdim=True))

    def project_grad_(self, g, x):
        # the tangent space of a linear set is the set itself
        g.sub_(g.mean(self.dim, keepdim=True))


if __name__ == "__main__":
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = co.ConstrainedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model, {"weight": ZeroMean(dim=1)}
    )
    for _ in range(20):
        opt.zero_grad()
        model(torch.randn(16, 6)).square().mean().backward()
        opt.step()
    opt.check()
    print("largest row mean:", float(model.weight.detach().mean(1).abs().max()))
    opt.audit.print()
