"""Intra-layer tied conv weights ``W[i, j, a, b] == W[j, i, ks-1-a, ks-1-b]`` for ``F.conv2d``.

The question (shared/seeds 001) symmetrised a free tensor in ``forward``,
``W = (W0 + flip(W0).permute(1, 0, 2, 3)) / 2``, and asked how to avoid the redundant entries of
``W0``. Here ``W`` itself is the parameter passed to ``F.conv2d``, and the optimizer keeps it in
the set with ``Symmetric(dims=(0, 1), flip=(2, 3))``: the gradient (and Adam's moments) are
projected onto the symmetric tensors, so only the set's free directions ever move, and the
parameter is projected back after every step (``(W + T(W)) / 2``, symmetric bitwise).

The script trains ``W`` with Adam to match a symmetric teacher, checks the symmetry exactly
(``torch.equal``) after training, and counts the free parameters the set leaves: its dimension
is the number of orbits of the index map ``(i, j, a, b) -> (j, i, ks-1-a, ks-1-b)``, which is
``(nf^2 ks^2 + nf [ks odd]) / 2``, and the rank of the library's projection. ``W`` is still
stored in full; what the set removes is the directions the optimizer can move in.

It also trains the question's own symmetrise-in-forward model from the same start: the swap-flip
only permutes entries, so Adam (without weight decay) gives the same ``W`` both ways, up to
rounding. The difference: here the parameter itself is the symmetric tensor (what you read, save
or export), and ``forward`` does no extra work.

    python examples/transpose_flip_symmetry.py --steps 100 --nf 4 --ks 3
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from torch import nn

import constrained_optim as co


def swap_flip(w: torch.Tensor) -> torch.Tensor:
    """``T(W)[i, j, a, b] = W[j, i, ks-1-a, ks-1-b]``."""
    return w.flip(2, 3).permute(1, 0, 2, 3)


class TiedConv(nn.Module):
    """A conv layer through the functional interface, with ``W`` an ordinary parameter."""

    def __init__(self, nf: int, ks: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(nf, nf, ks, ks) / (nf * ks))
        self.b = nn.Parameter(torch.zeros(nf))
        self.pad = ks // 2

    def forward(self, x):
        return F.conv2d(x, self.W, bias=self.b, stride=1, padding=self.pad)


class SymmetrisedInForward(TiedConv):
    """The question's own model: a free ``W0``, symmetrised on every forward."""

    def forward(self, x):
        w = (self.W + swap_flip(self.W)) / 2.0
        return F.conv2d(x, w, bias=self.b, stride=1, padding=self.pad)


def orbit_count(nf: int, ks: int) -> int:
    """Number of orbits of ``(i, j, a, b) -> (j, i, ks-1-a, ks-1-b)``, by enumeration."""
    seen, orbits = set(), 0
    for i in range(nf):
        for j in range(nf):
            for a in range(ks):
                for b in range(ks):
                    if (i, j, a, b) not in seen:
                        orbits += 1
                        seen |= {(i, j, a, b), (j, i, ks - 1 - a, ks - 1 - b)}
    return orbits


def projector_rank(nf: int, ks: int) -> int:
    """Rank of the library's projection as a matrix (``opt.project_()`` applied to every unit
    tensor): the dimension of the set it projects onto."""
    n = nf * nf * ks * ks
    holder = nn.Module()
    holder.W = nn.Parameter(torch.zeros(nf, nf, ks, ks, dtype=torch.float64))
    opt = co.ConstrainedOptimizer(torch.optim.SGD(holder.parameters(), lr=0.0), holder)
    opt.attach("W", co.Symmetric(dims=(0, 1), flip=(2, 3)))
    columns = torch.eye(n, dtype=torch.float64)
    with torch.no_grad():
        for column in columns:
            holder.W.copy_(column.view_as(holder.W))
            opt.project_()
            column.copy_(holder.W.flatten())
    return int(torch.linalg.matrix_rank(columns))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--nf", type=int, default=4, help="channels in and out")
    parser.add_argument("--ks", type=int, default=3, help="kernel size")
    args = parser.parse_args(argv)
    nf, ks = args.nf, args.ks
    console = Console()

    torch.manual_seed(0)
    teacher = TiedConv(nf, ks)
    with torch.no_grad():
        teacher.W.copy_(teacher.W + swap_flip(teacher.W))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, nf, 12, 12, generator=gen)
    with torch.no_grad():
        y = teacher(x)

    model = TiedConv(nf, ks)
    theirs = SymmetrisedInForward(nf, ks)
    theirs.load_state_dict(model.state_dict())  # same start: their W is symmetrised in forward
    opt = co.ConstrainedOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), model, audit_every=max(1, args.steps // 5)
    )
    opt.attach("W", co.Symmetric(dims=(0, 1), flip=(2, 3)))  # projects W at attach
    their_opt = torch.optim.Adam(theirs.parameters(), lr=1e-2)

    first = F.mse_loss(model(x), y).item()
    for _ in track(range(args.steps), description="training"):
        for m, o in ((model, opt), (theirs, their_opt)):
            o.zero_grad()
            loss = F.mse_loss(m(x), y)
            loss.backward()
            o.step()
    final = F.mse_loss(model(x), y).item()
    print(f"loss {first:.4f} -> {final:.4f} after {args.steps} Adam steps")

    W = model.W.detach()
    print(f"W == T(W) exactly (torch.equal) after training: {torch.equal(W, swap_flip(W))}")
    entries = all(
        bool(W[i, j, a, b] == W[j, i, ks - 1 - a, ks - 1 - b])
        for i in range(nf)
        for j in range(nf)
        for a in range(ks)
        for b in range(ks)
    )
    print(f"W[i, j, a, b] == W[j, i, ks-1-a, ks-1-b] for every index: {entries}")
    their_w = ((theirs.W + swap_flip(theirs.W)) / 2).detach()
    print(
        f"same W as the question's symmetrise-in-forward model: max |difference| "
        f"{float((W - their_w).abs().max()):.2e}"
    )

    closed_form = (nf * nf * ks * ks + nf * (ks % 2)) // 2
    orbits, rank = orbit_count(nf, ks), projector_rank(nf, ks)
    print(
        f"free parameters (nf={nf}, ks={ks}): {orbits} orbits, closed form "
        f"(nf^2 ks^2 + nf [ks odd]) / 2 = {closed_form}, rank of the projection = {rank}; "
        f"stored entries {W.numel()}"
    )
    print(f"free-parameter counts agree: {orbits == closed_form == rank}")

    console.print("\n[bold]Audit[/bold]")
    opt.audit.print(console)
    opt.check()
    print("check(): every constrained parameter is on its set")


if __name__ == "__main__":
    main()
