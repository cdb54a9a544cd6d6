"""A dilated 3x3 kernel whose centre must stay exactly 0, under SGD-momentum, Adam and AdamW.

The question (shared/seeds 003): ``cnn4_dialation`` is a dilated 3x3 convolution whose kernel
centre must stay 0 while the other eight entries train. The accepted answer zeroes the centre's
gradient with a hook; its own author notes that momentum and Adam still move the entry, since
their update is built from past gradients and running moments, not just the current gradient.

This script trains the question's model (narrower, on synthetic data, so it runs in seconds)
twice from the same warm start (5 unconstrained steps, then the centre is zeroed):

- with the gradient-hook answer on the plain optimizer;
- with ``co.Fixed((..., 1, 1), 0.0)`` attached to ``cnn4_dialation`` through
  ``ConstrainedOptimizer``, which also projects the optimizer's warm state at attach;

and prints the centre's largest ``|w|`` after the remaining steps. Then it saves a checkpoint
(the model's own ``state_dict`` and ``opt.state_dict()``), loads it into fresh objects, trains
on, and shows the constraint still holds and the resumed run equals the uninterrupted one.

    python examples/frozen_centre.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from torch import nn

import constrained_optim as co

WARMUP = 5
OPTIMIZERS = {
    "SGD-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "Adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
}


class BaseModel(nn.Module):
    """The question's ``base_Model`` with ``width`` channels instead of 32/100."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.cnn1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1)
        self.cnn2 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.cnn3 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1)
        self.cnn4_dialation = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=5, dilation=5)
        self.cnn5_1x1 = nn.Conv2d(width, width, kernel_size=1)

    def forward(self, x):
        x = F.relu(self.cnn3(self.maxpool1(F.relu(self.cnn2(F.relu(self.cnn1(x)))))))
        return self.cnn5_1x1(F.relu(self.cnn4_dialation(x)))


def make_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The synthetic data: the same batch at a given step in every run, with targets from a
    randomly initialised teacher of the same shape."""
    torch.manual_seed(1)
    teacher = BaseModel()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        return [(x, teacher(x)) for x in (torch.randn(4, 3, 24, 24, generator=gen) for _ in range(n))]


BATCHES: list[tuple[torch.Tensor, torch.Tensor]] = []


def train_step(model, opt, step: int) -> float:
    x, y = BATCHES[step]
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def centre_max(model) -> float:
    return float(model.cnn4_dialation.weight.detach()[..., 1, 1].abs().max())


def warm_start(make_opt):
    """A fresh model and optimizer after ``WARMUP`` unconstrained steps (momentum and Adam's
    moments now hold values for the centre)."""
    torch.manual_seed(0)
    model = BaseModel()
    opt = make_opt(model.parameters())
    for step in range(WARMUP):
        train_step(model, opt, step)
    return model, opt


def zero_centre_grad(grad):
    """The forum answer's hook, fixed so it does what it says on a [out, in, 3, 3] weight:
    clear the centre of every kernel (``res[1][1]`` would clear kernel (1, 1)) and return it."""
    grad = grad.clone()
    grad[..., 1, 1] = 0
    return grad


def audit_every(steps: int) -> int:
    return max(1, steps // 4)  # about four audited steps in the table


def run_hook(make_opt, steps: int) -> float:
    model, opt = warm_start(make_opt)
    with torch.no_grad():
        model.cnn4_dialation.weight[..., 1, 1] = 0.0
    model.cnn4_dialation.weight.register_hook(zero_centre_grad)
    for step in range(WARMUP, WARMUP + steps):
        train_step(model, opt, step)
    return centre_max(model)


def run_library(make_opt, steps: int, description: str):
    model, inner = warm_start(make_opt)
    opt = co.ConstrainedOptimizer(inner, model, audit_every=audit_every(steps))
    opt.attach("cnn4_dialation", co.Fixed((..., 1, 1), 0.0))  # module name -> its .weight
    worst = 0.0
    for step in track(range(WARMUP, WARMUP + steps), description=description):
        train_step(model, opt, step)
        worst = max(worst, centre_max(model))
    return model, opt, worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps after the warm start (default 20)")
    parser.add_argument("--resume-steps", type=int, default=5, help="steps after loading the checkpoint")
    args = parser.parse_args(argv)
    console = Console()
    BATCHES[:] = make_batches(WARMUP + args.steps + args.resume_steps)

    console.print(
        f"[bold]Centre of cnn4_dialation after {WARMUP} warm-up steps, zeroing, "
        f"then {args.steps} steps[/bold]"
    )
    results = {}
    for name, make_opt in OPTIMIZERS.items():
        hook = run_hook(make_opt, args.steps)
        model, opt, worst = run_library(make_opt, args.steps, f"{name:12s}")
        results[name] = (model, opt)
        print(
            f"{name:12s} centre max |w|: gradient hook {hook:.3g}   "
            f"constrained_optim {centre_max(model)} (largest after any step: {worst})"
        )

    name = "AdamW"
    model, opt = results[name]
    console.print(f"\n[bold]Audit of the constrained {name} run[/bold]")
    opt.audit.print(console)

    # -- checkpoint: the model's own state_dict (keys unchanged) plus opt.state_dict() ----------------
    console.print(f"\n[bold]Checkpoint after {WARMUP + args.steps} steps, reloaded into fresh objects[/bold]")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        checkpoint = torch.load(path)

    fresh = BaseModel()
    fresh.load_state_dict(checkpoint["model"])
    resumed = co.ConstrainedOptimizer(
        OPTIMIZERS[name](fresh.parameters()), fresh, audit_every=audit_every(args.steps)
    )
    resumed.attach("cnn4_dialation", co.Fixed((..., 1, 1), 0.0))
    resumed.load_state_dict(checkpoint["opt"])
    print("model state_dict keys unchanged:", list(checkpoint["model"]) == list(BaseModel().state_dict()))

    start = WARMUP + args.steps
    for step in range(start, start + args.resume_steps):
        train_step(model, opt, step)  # the uninterrupted run
        train_step(fresh, resumed, step)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    print(
        f"after {args.resume_steps} more steps: resumed centre max |w| {centre_max(fresh)}; "
        f"resumed run equals uninterrupted run: {same}"
    )
    resumed.check()
    print("check(): every constrained parameter is on its set")


if __name__ == "__main__":
    main()
