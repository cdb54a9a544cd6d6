"""A trainable 2x2 kernel ``[[a+b, a-b], [a-b, a+b]]``, the question's toy task, with `Tied` and `Subspace`.

The question (shared/seeds 000) built the kernel from two parameters ``a`` and ``b`` with
``torch.tensor(...)`` and wrapped it in a new ``nn.Parameter``: that copies four numbers, which
then train independently (only the top-left entry moved). Here the model keeps its ordinary
``conv.weight`` and the optimizer keeps it of the form ``[[a+b, a-b], [a-b, a+b]]``, either as
``Tied([[0, 1], [1, 0]])`` (the diagonal shares one value, the off-diagonal another) or as
``Subspace`` of the two basis kernels ``B0 = [[1, 1], [1, 1]]`` and ``B1 = [[1, -1], [-1, 1]]``.
Both are the same set, so both runs give the same kernels.

On the learning rate: projected SGD moves a tied group by ``lr`` times the *mean* of its entries'
gradients; a reparametrized shared value (one number per group, as ``F.conv2d`` with a kernel
built from parameters) moves by ``lr`` times their *sum*, a factor of the group size (2 here).
The answer's ``a``, ``b`` (``W = a B0 + b B1``) adds a factor 2 more: each of ``a``, ``b`` touches
all 4 entries (``|B_k|^2 = 4``). The script checks both relations numerically.

    python examples/tied_kernel.py --steps 10
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import nn

import constrained_optim as co

INPUTS = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
# the question's label is [[2.0]]; the conv's output is 1x1, so shape it (1, 1, 1, 1) like the output
LABELS = torch.tensor([[2.0]]).view(1, 1, 1, 1)
DIAGONAL_AND_OFF = torch.tensor([[0, 1], [1, 0]])  # labels: [[p, q], [q, p]], p = a+b, q = a-b
B = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]]])  # B0, B1
GROUP_SIZE = 2

# what the question printed, epochs 0..9 (the top-left entry; the other three stayed 0)
QUESTION_PRINTED = [0.0, 0.4, 0.72, 0.976, 1.1808, 1.3446, 1.4757, 1.5806, 1.6645, 1.7316]


class MyModel(nn.Module):
    """The question's model, as written: the kernel is copied into a new, independent Parameter."""

    def __init__(self):
        super().__init__()
        a, b = nn.Parameter(torch.zeros(1, 1)), nn.Parameter(torch.zeros(1, 1))
        self.conv = nn.Conv2d(1, 1, 2, bias=False)
        # torch.tensor copies the values: four new numbers, no link to a and b
        kernel = torch.tensor([[[[(a + b).item(), (a - b).item()], [(a - b).item(), (a + b).item()]]]])
        self.conv.weight = nn.Parameter(kernel)

    def forward(self, x):
        return self.conv(x)


class Plain(nn.Module):
    """The same network with an ordinary conv layer, for the constrained runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 2, bias=False)
        nn.init.zeros_(self.conv.weight)  # the question starts from a = b = 0

    def forward(self, x):
        return self.conv(x)


def sgd_step(opt, model) -> None:
    opt.zero_grad()
    F.mse_loss(model(INPUTS), LABELS).backward()
    opt.step()


def kernels_by_epoch(model, opt, epochs: int, description: str) -> list[torch.Tensor]:
    """The kernel at the start of each epoch (as the question printed it), then after the last."""
    out = []
    for _ in track(range(epochs), description=description):
        out.append(model.conv.weight.detach()[0, 0].clone())
        sgd_step(opt, model)
    out.append(model.conv.weight.detach()[0, 0].clone())
    return out


def reparametrized(values: torch.Tensor, build, lr: float, epochs: int) -> list[torch.Tensor]:
    """SGD on ``values`` with the kernel ``build(values)`` passed to ``F.conv2d``: the answer's way."""
    values = nn.Parameter(values.clone())
    opt = torch.optim.SGD([values], lr=lr)
    out = []
    for _ in range(epochs):
        out.append(build(values).detach().clone())
        opt.zero_grad()
        F.mse_loss(F.conv2d(INPUTS, build(values).view(1, 1, 2, 2)), LABELS).backward()
        opt.step()
    out.append(build(values).detach().clone())
    return out


def constrained(constraint, lr: float, epochs: int, description: str):
    model = Plain()
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    opt.attach("conv", constraint)  # module name -> conv.weight
    return kernels_by_epoch(model, opt, epochs, description), opt


def fmt(k: torch.Tensor) -> str:
    return f"[[{k[0, 0]:.4f}, {k[0, 1]:.4f}], [{k[1, 0]:.4f}, {k[1, 1]:.4f}]]"


def max_diff(xs, ys) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="epochs of the one-example task (default 10)")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    epochs, lr = args.steps, args.lr
    console = Console()

    question = MyModel()
    q_opt = torch.optim.SGD(question.parameters(), lr=lr)
    q_run = kernels_by_epoch(question, q_opt, epochs, "question's code")
    tied, tied_opt = constrained(co.Tied(DIAGONAL_AND_OFF), lr, epochs, "Tied          ")
    span, _ = constrained(co.Subspace(B), lr, epochs, "Subspace      ")

    table = Table(title=f"kernel at the start of each epoch (SGD, lr={lr})")
    for column in ("epoch", "question's code", "Tied([[0, 1], [1, 0]])", "Subspace(B0, B1)"):
        table.add_column(column, justify="right")
    for epoch in range(epochs + 1):
        table.add_row(
            str(epoch) if epoch < epochs else "final", fmt(q_run[epoch]), fmt(tied[epoch]), fmt(span[epoch])
        )
    console.print(table)

    shown = min(epochs, len(QUESTION_PRINTED))
    reproduced = all(abs(float(q_run[e][0, 0]) - QUESTION_PRINTED[e]) < 1e-4 for e in range(shown))
    print(f"question's code reproduces the numbers it printed: {reproduced}")
    last = tied[-1]
    a, b = float(last[0, 0] + last[0, 1]) / 2, float(last[0, 0] - last[0, 1]) / 2
    form = bool(last[0, 0] == last[1, 1] and last[0, 1] == last[1, 0])
    print(f"Tied kernel keeps the form [[a+b, a-b], [a-b, a+b]] bitwise: {form} (a = {a:.4f}, b = {b:.4f})")
    print(f"Tied and Subspace give the same kernels: max |difference| {max_diff(tied, span):.2e}")

    # -- the learning rate against reparametrized training -----------------------------------------------
    # one value per group: W = [[p, q], [q, p]]; SGD moves p by lr * (sum of the group's gradients)
    per_group = reparametrized(torch.zeros(2), lambda v: v[DIAGONAL_AND_OFF], lr, epochs)
    tied_scaled, _ = constrained(co.Tied(DIAGONAL_AND_OFF), lr * GROUP_SIZE, epochs, "Tied, lr x 2  ")
    # the answer's a, b: W = a B0 + b B1, each of a, b touching all four entries (|B_k|^2 = 4)
    ab = reparametrized(torch.zeros(2), lambda v: v[0] * B[0] + v[1] * B[1], lr, epochs)
    span_scaled, _ = constrained(co.Subspace(B), lr * 4, epochs, "Subspace, lr x 4")
    print(
        f"one value per group, lr={lr}  vs  Tied at lr x group size ({GROUP_SIZE}): "
        f"max |difference| {max_diff(per_group, tied_scaled):.2e}"
    )
    print(
        f"one value per group, lr={lr}  vs  Tied at the same lr: "
        f"max |difference| {max_diff(per_group, tied):.2e}"
    )
    print(
        f"F.conv2d with a, b, lr={lr}  vs  Subspace at lr x 4 (|B_k|^2): "
        f"max |difference| {max_diff(ab, span_scaled):.2e}"
    )
    agree = max_diff(per_group, tied_scaled) < 1e-5 and max_diff(ab, span_scaled) < 1e-5
    print(f"learning-rate relation holds (projected lr = group size x reparametrized lr): {agree}")

    console.print("\n[bold]Audit of the Tied run[/bold]")
    tied_opt.audit.print(console)


if __name__ == "__main__":
    main()
