"""The user questions in shared/seeds, answered: each question's own setting, with the library."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import constrained_optim as co


# -- 000: a 2x2 kernel [[a+b, a-b], [a-b, a+b]] from two numbers -------------------------------------
class SeedZero(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 2, bias=False)


SEED0_X = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
SEED0_Y = torch.tensor([[[[2.0]]]])
PLUS_MINUS = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]]])


@pytest.mark.parametrize("how", ["Tied", "Subspace"])
def test_seed_000_kernel_stays_a_plus_minus_b(how):
    """The question's toy task; the trained kernel keeps its [[a+b, a-b], [a-b, a+b]] form."""
    model = SeedZero()
    constraint = co.Tied(torch.tensor([[0, 1], [1, 0]])) if how == "Tied" else co.Subspace(PLUS_MINUS)
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    opt.attach("conv", constraint)
    for _ in range(10):
        opt.zero_grad()
        F.mse_loss(model.conv(SEED0_X), SEED0_Y).backward()
        opt.step()
        w = model.conv.weight.detach()[0, 0]
        a, b = (w[0, 0] + w[0, 1]) / 2, (w[0, 0] - w[0, 1]) / 2
        assert w[0, 0] == w[1, 1] and w[0, 1] == w[1, 0]  # bitwise
        torch.testing.assert_close(w, torch.stack([torch.stack([a + b, a - b]), torch.stack([a - b, a + b])]))
    # the question's model only ever changed w[0, 0]; here the tied partner moved with it
    assert float(w[1, 1]) != 0.0 and float(model.conv(SEED0_X).detach()) > 0.5


def test_seed_000_matches_training_a_and_b_directly():
    """The answer's way (train a, b and build the kernel for F.conv2d) moves W = a B0 + b B1 by
    lr * B B^T g, projected SGD by lr * P g = lr * B B^T g / 4 (|B_k|^2 = 4): equal at 4x the lr."""
    a = nn.Parameter(torch.tensor(0.1))
    b = nn.Parameter(torch.tensor(-0.3))
    direct = torch.optim.SGD([a, b], lr=0.1)
    model = SeedZero()
    with torch.no_grad():
        model.conv.weight.copy_((0.1 * PLUS_MINUS[0] - 0.3 * PLUS_MINUS[1]).view(1, 1, 2, 2))
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1 * 4), model)
    opt.attach("conv", co.Subspace(PLUS_MINUS))
    for _ in range(10):
        direct.zero_grad()
        kernel = (a * PLUS_MINUS[0] + b * PLUS_MINUS[1]).view(1, 1, 2, 2)
        F.mse_loss(F.conv2d(SEED0_X, kernel), SEED0_Y).backward()
        direct.step()
        opt.zero_grad()
        F.mse_loss(model.conv(SEED0_X), SEED0_Y).backward()
        opt.step()
        kernel = (a * PLUS_MINUS[0] + b * PLUS_MINUS[1]).detach()
        torch.testing.assert_close(model.conv.weight.detach()[0, 0], kernel, rtol=1e-6, atol=1e-6)


# -- 001: W[i, j, a, b] == W[j, i, ks-1-a, ks-1-b] with F.conv2d ----------------------------------------
def test_seed_001_transpose_flip_symmetry_with_functional_conv():
    nf, ks = 3, 3
    model = nn.Module()
    model.W = nn.Parameter(torch.randn(nf, nf, ks, ks))
    model.b = nn.Parameter(torch.zeros(nf))
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model)
    opt.attach("W", co.Symmetric(dims=(0, 1), flip=(2, 3)))
    x = torch.randn(4, nf, 8, 8)
    target = torch.randn(4, nf, 8, 8)
    before = model.W.detach().clone()
    for _ in range(10):
        opt.zero_grad()
        F.mse_loss(F.conv2d(x, model.W, bias=model.b, padding=1), target).backward()
        opt.step()
        W = model.W.detach()
        for i in range(nf):
            for j in range(nf):
                for a in range(ks):
                    for b in range(ks):
                        assert W[i, j, a, b] == W[j, i, ks - 1 - a, ks - 1 - b]
    assert not torch.equal(model.W.detach(), before)


# -- 003: the centre of a dilated 3x3 kernel held at exactly 0 ------------------------------------------
class BaseModel(nn.Module):
    """The question's model, narrower so the test is quick."""

    def __init__(self, width=8):
        super().__init__()
        self.cnn1 = nn.Conv2d(3, width, 3, padding=1)
        self.cnn3 = nn.Conv2d(width, width, 3, padding=1)
        self.cnn4_dialation = nn.Conv2d(width, width, 3, padding=5, dilation=5)
        self.cnn5_1x1 = nn.Conv2d(width, width, 1)

    def forward(self, x):
        x = F.relu(self.cnn3(F.max_pool2d(F.relu(self.cnn1(x)), 2)))
        return self.cnn5_1x1(F.relu(self.cnn4_dialation(x)))


OPTIMIZERS = {
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
}


def train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("target", ["cnn4_dialation", "cnn4_dialation.weight"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_seed_003_centre_stays_exactly_zero_after_a_warm_start(name, target):
    torch.manual_seed(0)
    model = BaseModel()
    opt = co.ConstrainedOptimizer(OPTIMIZERS[name](model.parameters()), model)
    train(model, opt, 5)  # warm: momentum and Adam moments hold values for the centre
    opt.attach(target, co.Fixed((..., 1, 1), 0.0))
    before = model.cnn4_dialation.weight.detach().clone()
    for step in range(20):
        train(model, opt, 1, seed=step + 1)
        assert float(model.cnn4_dialation.weight.detach()[..., 1, 1].abs().max()) == 0.0
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    assert not torch.equal(model.cnn4_dialation.weight.detach()[..., off_centre], before[..., off_centre])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_seed_003_the_gradient_hook_answer_drifts(name):
    """The forum's answer (zero the centre's gradient with a hook) lets momentum and Adam move it."""
    torch.manual_seed(0)
    model = BaseModel()
    inner = OPTIMIZERS[name](model.parameters())
    train(model, inner, 5)
    with torch.no_grad():
        model.cnn4_dialation.weight[..., 1, 1] = 0.0

    def hook(grad):
        grad = grad.clone()
        grad[..., 1, 1] = 0
        return grad

    model.cnn4_dialation.weight.register_hook(hook)
    train(model, inner, 20, seed=1)
    assert float(model.cnn4_dialation.weight.detach()[..., 1, 1].abs().max()) > 1e-3
