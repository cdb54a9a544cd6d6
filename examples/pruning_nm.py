"""Fine-tuning a small model under fixed 2:4 structured sparsity (``NMSparsity(2, 4)``) with AdamW.

2:4 sparsity (at most 2 non-zeros in every group of 4 consecutive weights along the input
dimension) is the pattern sparse tensor cores accelerate. The usual recipe: train dense, prune
by magnitude, then fine-tune with the pattern held fixed. Here the model stays an ordinary
``nn.Module``; ``NMSparsity(2, 4)`` chooses each weight's pattern by magnitude when it is
attached and then behaves as a ``Mask``: gradients, AdamW's moments and its decoupled weight
decay never revive a pruned entry.

The script trains dense, attaches the constraint to every linear layer's weight with a glob,
fine-tunes, checks the pattern (every group of 4 has at most 2 non-zeros, and the pattern is
the one chosen at attach), and writes the audit plot with ``--plot PATH``.

    python examples/pruning_nm.py --steps 150 --plot nm_audit.png
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from torch import nn

import constrained_optim as co


class MLP(nn.Module):
    def __init__(self, d_in=32, hidden=64, classes=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model, opt, x, y, steps: int, description: str) -> None:
    gen = torch.Generator().manual_seed(steps)
    for _ in track(range(steps), description=description):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def groups_ok(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """At most ``n`` non-zeros in every group of ``m`` consecutive entries along the last dim."""
    return bool(((w.reshape(-1, m) != 0).sum(1) <= n).all())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="dense steps, and as many fine-tuning steps")
    parser.add_argument("--plot", metavar="PATH", help="write the audit plot (PNG) here")
    args = parser.parse_args(argv)
    console = Console()

    torch.manual_seed(0)
    x = torch.randn(2048, 32)
    y = (x @ torch.randn(32, 4)).argmax(1)  # four classes, linearly separable
    x_test, y_test = x[1536:], y[1536:]
    x, y = x[:1536], y[:1536]

    model = MLP()
    opt = co.ConstrainedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05),
        model,
        audit_every=max(1, args.steps // 5),
    )
    train(model, opt, x, y, args.steps, "dense     ")
    dense = accuracy(model, x_test, y_test)

    opt.attach("fc*.weight", co.NMSparsity(2, 4))  # prunes by magnitude now, then holds the pattern
    pattern = {n: p.detach() != 0 for n, p in model.named_parameters() if n.endswith("weight")}
    pruned = accuracy(model, x_test, y_test)
    train(model, opt, x, y, args.steps, "fine-tune ")
    tuned = accuracy(model, x_test, y_test)

    print(
        f"test accuracy: dense {dense:.3f}, right after 2:4 pruning {pruned:.3f}, "
        f"after fine-tuning {tuned:.3f}"
    )
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    print(
        f"every group of 4 holds at most 2 non-zeros: {all(groups_ok(w) for w in weights.values())}; "
        f"zero fraction {zeros:.3f}"
    )
    same = all(torch.equal(weights[n] != 0, pattern[n]) for n in weights)
    print(f"pattern is the one chosen at attach (fixed=True): {same}")

    console.print("\n[bold]Audit[/bold]")
    opt.audit.print(console)
    opt.check()
    print("check(): every constrained parameter is on its set")
    if args.plot:
        opt.audit.plot(args.plot)
        print(f"audit plot written to {args.plot}")


if __name__ == "__main__":
    main()
