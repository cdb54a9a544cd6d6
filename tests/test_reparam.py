"""Projected training against training a reparametrized layer, where the maths says they agree
and where it says they differ."""

from __future__ import annotations

import pytest
import torch

import constrained_optim as co


def orthonormal_basis(k, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel())
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q.T.reshape(k, *shape)  # k orthonormal tensors of the given shape


def loss_of(w, x, y):
    return ((torch.nn.functional.conv2d(x, w).tanh() - y) ** 2).mean()


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_on_a_subspace_equals_sgd_on_its_coordinates(momentum, nesterov):
    """With W = Q theta (Q orthonormal), SGD on theta and projected SGD on W give the same W."""
    shape, k = (3, 2, 3, 3), 7
    basis = orthonormal_basis(k, shape)
    q = basis.reshape(k, -1).T  # (n, k), orthonormal columns
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64)
    theta0 = torch.randn(k, generator=gen, dtype=torch.float64)

    theta = torch.nn.Parameter(theta0.clone())
    reparam = torch.optim.SGD([theta], lr=0.3, momentum=momentum, nesterov=nesterov)

    model = torch.nn.Module()
    model.weight = torch.nn.Parameter((q @ theta0).view(shape).clone())
    opt = co.ConstrainedOptimizer(
        torch.optim.SGD([model.weight], lr=0.3, momentum=momentum, nesterov=nesterov), model
    ).attach("weight", co.Subspace(basis))

    for _ in range(15):
        reparam.zero_grad()
        loss_of((q @ theta).view(shape), x, y).backward()
        reparam.step()
        opt.zero_grad()
        loss_of(model.weight, x, y).backward()
        opt.step()
        torch.testing.assert_close(model.weight.detach(), (q @ theta.detach()).view(shape), rtol=0, atol=1e-9)


def test_tied_sgd_moves_a_group_by_the_mean_gradient():
    """A reparametrized shared value moves by the sum of its entries' gradients, projected SGD by
    the mean: the two agree when the projected run's learning rate is the group size times larger."""
    labels = torch.tensor([[0, 1], [1, 0]])  # [[a, b], [b, a]]: groups of 2
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 1, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 1, 2, 2, generator=gen, dtype=torch.float64)
    ab = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
    reparam = torch.optim.SGD([ab], lr=0.1)
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(ab.detach()[labels].view(1, 1, 2, 2).clone())
    opt = co.ConstrainedOptimizer(torch.optim.SGD([model.weight], lr=0.1 * 2), model)
    opt.attach("weight", co.Tied(labels))
    for _ in range(10):
        reparam.zero_grad()
        loss_of(ab[labels].view(1, 1, 2, 2), x, y).backward()
        reparam.step()
        opt.zero_grad()
        loss_of(model.weight, x, y).backward()
        opt.step()
        torch.testing.assert_close(model.weight.detach().view(2, 2), ab.detach()[labels], rtol=0, atol=1e-12)


def test_adam_in_a_rotated_basis_is_not_adam_on_the_coordinates():
    """Adam is not rotation-invariant: projected Adam on W and Adam on theta of W = Q theta part
    ways when Q is not axis-aligned (the README says so; this keeps the claim honest)."""
    shape, k = (4, 4), 3
    basis = orthonormal_basis(k, shape, seed=3)
    q = basis.reshape(k, -1).T
    target = torch.randn(shape, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.zeros(k, dtype=torch.float64))
    reparam = torch.optim.Adam([theta], lr=0.1)
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = co.ConstrainedOptimizer(torch.optim.Adam([model.weight], lr=0.1), model)
    opt.attach("weight", co.Subspace(basis))
    for _ in range(5):
        reparam.zero_grad()
        ((q @ theta).view(shape) - target).pow(2).sum().backward()
        reparam.step()
        opt.zero_grad()
        (model.weight - target).pow(2).sum().backward()
        opt.step()
    assert float((model.weight.detach() - (q @ theta.detach()).view(shape)).abs().max()) > 1e-3
