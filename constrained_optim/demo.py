"""A short, real training run under several constraints, audited: ``python -m constrained_optim demo``.

A tiny CNN learns to classify synthetic 16x16 images (four classes: a fixed random pattern per
class plus noise) with AdamW, while the optimizer keeps:

- ``stem.weight`` (8, 3, 3, 3) isotropic, ``Tied`` with labels ``[[0, 1, 0], [1, 2, 1], [0, 1, 0]]``
  over each 3x3 kernel (corners share a value, edges another; the set of such kernels has
  dimension 3 per kernel);
- ``mix.weight`` (8, 8, 3, 3) transpose-flip symmetric, ``Symmetric(dims=(0, 1), flip=(2, 3))``:
  ``W[i, j, a, b] == W[j, i, 2-a, 2-b]``;
- ``dilated.weight`` (8, 8, 3, 3) with its kernel centres held at 0, ``Fixed((..., 1, 1), 0.0)``;
- ``proj.weight`` (8, 8) orthogonal, ``Orthogonal()``, and ``head.weight`` (4, 8) with every
  output unit's norm at most 1, ``MaxNorm(1.0)``.

It prints the loss and accuracy as it goes, the audit table, an independent check of each set
from its definition, and a final ``check()``. From a shell::

    python -m constrained_optim demo --steps 80 [--plot audit.png]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import constrained_optim as co

ISOTROPIC = torch.tensor([[0, 1, 0], [1, 2, 1], [0, 1, 0]])


class TinyNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.dilated = nn.Conv2d(width, width, 3, padding=2, dilation=2)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = F.relu(self.dilated(F.relu(self.mix(x))))
        return self.head(F.relu(self.proj(x.mean((2, 3)))))


def constraints() -> dict[str, co.Constraint]:
    """What the demo attaches, by module name (each module's weight)."""
    return {
        "stem": co.Tied(ISOTROPIC),
        "mix": co.Symmetric(dims=(0, 1), flip=(2, 3)),
        "dilated": co.Fixed((..., 1, 1), 0.0),
        "proj": co.Orthogonal(),
        "head": co.MaxNorm(1.0),
    }


def class_patterns(gen: torch.Generator, classes: int = 4) -> torch.Tensor:
    """One pattern per class: a colour and a smooth random texture."""
    colour = torch.randn(classes, 3, 1, 1, generator=gen)
    texture = F.interpolate(torch.randn(classes, 3, 4, 4, generator=gen), size=16, mode="bilinear")
    return colour + texture


def synthetic_data(patterns: torch.Tensor, n: int, gen: torch.Generator, noise: float = 1.0):
    """``n`` noisy images of the class patterns, and their labels."""
    labels = torch.randint(0, patterns.shape[0], (n,), generator=gen)
    return patterns[labels] + noise * torch.randn(n, *patterns.shape[1:], generator=gen), labels


def verify(model: TinyNet) -> list[tuple[str, bool, str]]:
    """Each constraint checked from its definition, independently of the library's projections."""
    with torch.no_grad():
        stem, mix = model.stem.weight, model.mix.weight
        centre = float(model.dilated.weight[..., 1, 1].abs().max())
        out = [
            (
                "stem isotropic (tied entries bitwise equal)",
                all(
                    bool((stem[..., ISOTROPIC == v] == stem[..., ISOTROPIC == v][..., :1]).all())
                    for v in range(3)
                ),
                "",
            ),
            (
                "mix == mix.transpose(0, 1).flip(2, 3) (torch.equal)",
                torch.equal(mix, mix.transpose(0, 1).flip(2, 3)),
                "",
            ),
            ("dilated centre max |w|", centre == 0.0, f"{centre}"),
        ]
        w = model.proj.weight
        residual = float((w @ w.T - torch.eye(w.shape[0])).norm())
        out.append(("proj orthogonal, ||W W^T - I||", residual < 1e-5, f"{residual:.1e}"))
        largest = float(model.head.weight.norm(dim=1).max())
        out.append(("head max row norm <= 1", largest <= 1.0 + 1e-6, f"{largest:.4f}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m constrained_optim demo",
        description="A short training run under several constraints, audited.",
    )
    parser.add_argument("--steps", type=int, default=80, help="training steps (default 80)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PATH", help="write the audit plot (PNG; needs matplotlib)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    patterns = class_patterns(gen)
    images, labels = synthetic_data(patterns, 512, gen)
    test_images, test_labels = synthetic_data(patterns, 256, gen)

    model = TinyNet()
    attached = constraints()
    opt = co.ConstrainedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2),
        model,
        constraints=attached,
        audit_every=1,
        log_every=max(1, args.steps // 2),
    )
    if not logging.getLogger().handlers:  # an application's choice: show the library's INFO log
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("constrained_optim").setLevel(logging.INFO)
    print(f"TinyNet on synthetic images, AdamW, {args.steps} steps; constrained parameters:")
    for target, constraint in attached.items():
        print(f"  {target}.weight {tuple(model.get_parameter(target + '.weight').shape)}: {constraint!r}")

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(test_images).argmax(1) == test_labels).float().mean())

    print(f"test accuracy before training: {accuracy():.3f}")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, images.shape[0], (32,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 8) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"test accuracy after {args.steps} steps: {accuracy():.3f}")

    opt.audit.print()
    if args.plot:
        opt.audit.plot(args.plot)
        print(f"audit plot written to {args.plot}")
    for what, ok, value in verify(model):
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + value if value else ''}")
    opt.check()
    print(
        f"check(): all {len(attached)} constrained parameters are on their sets "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0
