"""Learning a transformation of a pretrained CNN's filters, with gradients that reach it.

The question (shared/seeds 002): a small network transforms the filters of a fixed, pretrained
CNN (for instance rotates them), but assigning its output to ``conv.weight.data`` cuts the
graph, so the transformation never gets a gradient. The fix is to call the CNN with the
transformed filters as an input of the graph: ``torch.func.functional_call(cnn, {"conv.weight":
new_weight}, (x,))``. Nothing is written to ``.data``.

A transformation meant to rotate or reflect filters should preserve their norm, so its map (a
learned 9x9 matrix acting on each flattened 3x3 filter; the question's extra input, an angle, is
left out) is constrained with ``Orthogonal()``: the optimizer projects the map's gradient onto the tangent
space of the orthogonal matrices and puts the map back on them after every step. The task: the
CNN's filters, transformed, must reproduce the outputs of the same CNN with its filters rotated
by 90 degrees (a permutation of the 9 kernel entries, so an orthogonal map). The script prints,
per step, the loss, the norm of the gradient that reached the map, and the orthogonality
residual ``||M M^T - I||``.

    python examples/filter_transform.py --steps 60
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import nn
from torch.func import functional_call

import constrained_optim as co


class CNN(nn.Module):
    def __init__(self, filters: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, filters, 3)

    def forward(self, x):
        return self.conv(x)


class TransformationNet(nn.Module):
    """A learned linear map of each flattened 3x3 filter (starts as the identity)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(9, 9, bias=False)
        nn.init.eye_(self.linear.weight)

    def forward(self, weight):
        return self.linear(weight.reshape(weight.shape[0], 9)).view_as(weight)


def data_assignment_gives_no_gradient(cnn, transform, x) -> bool:
    """The question's way: write the transformed filters into ``.data``; the map gets no grad."""
    cnn.conv.weight.data = transform(cnn.conv.weight.data)
    cnn(x).sum().backward()
    return transform.linear.weight.grad is None


def orthogonality_residual(m: torch.Tensor) -> float:
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    return float((m @ m.T - eye).norm())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args(argv)
    console = Console()

    torch.manual_seed(0)
    pretrained = CNN().requires_grad_(False)  # fixed; only the transformation trains
    weight = pretrained.conv.weight.detach()
    rotated = torch.rot90(weight, 1, dims=(2, 3))  # the filters the task wants
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(64, 1, 12, 12, generator=gen)
    with torch.no_grad():
        targets = functional_call(pretrained, {"conv.weight": rotated}, (images,))

    probe = CNN()
    probe.load_state_dict(pretrained.state_dict())
    no_grad = data_assignment_gives_no_gradient(probe, TransformationNet(), images[:1])
    print(f"question's .data assignment: the transformation's gradient is None: {no_grad}")

    transform = TransformationNet()
    opt = co.ConstrainedOptimizer(
        torch.optim.SGD(transform.parameters(), lr=args.lr, momentum=0.9),
        transform,
        audit_every=max(1, args.steps // 5),
    )
    opt.attach("linear", co.Orthogonal())

    table = Table(title="training the filter transformation through functional_call")
    for column in ("step", "loss", "|grad| reaching the map", "||M M^T - I|| after the step"):
        table.add_column(column, justify="right")
    every = max(1, args.steps // 10)
    for step in track(range(1, args.steps + 1), description="training"):
        opt.zero_grad()
        new_weight = transform(weight)
        out = functional_call(pretrained, {"conv.weight": new_weight}, (images,))
        loss = F.mse_loss(out, targets)
        loss.backward()
        grad = float(transform.linear.weight.grad.norm())
        opt.step()
        if step % every == 0 or step == 1:
            table.add_row(
                str(step),
                f"{loss.item():.5f}",
                f"{grad:.4f}",
                f"{orthogonality_residual(transform.linear.weight.detach()):.2e}",
            )
    console.print(table)

    m = transform.linear.weight.detach()
    with torch.no_grad():
        final = F.mse_loss(
            functional_call(pretrained, {"conv.weight": transform(weight)}, (images,)), targets
        ).item()
    print(
        f"final loss {final:.2e}; filter norms preserved: "
        f"{torch.allclose(transform(weight).flatten(1).norm(dim=1), weight.flatten(1).norm(dim=1))}"
    )
    print(f"orthogonality residual ||M M^T - I|| = {orthogonality_residual(m):.2e}")

    console.print("\n[bold]Audit[/bold]")
    opt.audit.print(console)
    opt.check()
    print("check(): every constrained parameter is on its set")


if __name__ == "__main__":
    main()
