"""Seed question 002: a network that transforms a pretrained CNN's filters, trained end to end.

The question assigned the transformed filters to ``conv.weight.data``, which cuts the graph, so
no gradient reached the transformation network. Here the transformed filters go into the CNN
through ``torch.func.functional_call`` (no ``.data``), and `Orthogonal` keeps the learned filter
map a rotation/reflection of filter space, so it preserves every filter's norm. The task: make the
fixed CNN answer rotated images as it answers upright ones, rotated; the exact solution maps each
3x3 filter to its 90-degree rotation, an orthogonal map of filter space.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

import constrained_optim as co


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, bias=False)

    def forward(self, x):
        return self.conv(x)


class TransformationNet(nn.Module):
    """A linear map of each flattened 3x3 filter, starting at the identity."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(9, 9, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(9))

    def forward(self, filters):
        return self.linear(filters.reshape(-1, 9)).reshape(filters.shape)


def rotate(t):
    return torch.rot90(t, 1, (2, 3))


def batch(gen):
    x = torch.randn(8, 1, 8, 8, generator=gen)
    return rotate(x).contiguous(), x


def test_the_questions_data_assignment_gets_no_gradient():
    torch.manual_seed(0)
    cnn, net = CNN(), TransformationNet()
    cnn.conv.weight.data = net(cnn.conv.weight.data)  # the question's approach
    cnn(torch.ones(1, 1, 3, 3)).sum().backward()
    assert net.linear.weight.grad is None


def test_seed_002_filter_transform_trains_through_functional_call_and_stays_orthogonal():
    torch.manual_seed(0)
    cnn = CNN().requires_grad_(False)  # pretrained and fixed
    pretrained = cnn.conv.weight.detach().clone()
    net = TransformationNet()
    opt = co.ConstrainedOptimizer(torch.optim.Adam(net.parameters(), lr=0.05), net)
    opt.attach("linear", co.Orthogonal())
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(5, 9, generator=gen)
    losses = []
    for _ in range(80):
        rotated, upright = batch(gen)
        filters = net(cnn.conv.weight)
        out = functional_call(cnn, {"conv.weight": filters}, (rotated,))
        loss = (out - rotate(cnn(upright))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grad = net.linear.weight.grad
        assert grad is not None and float(grad.abs().max()) > 0  # the gradient reaches the transformer
        opt.step()
        losses.append(float(loss.detach()))
        W = net.linear.weight.detach()
        torch.testing.assert_close(W @ W.T, torch.eye(9), rtol=0, atol=1e-5)
        # norm-preserving: every filter (and any vector of filter space) keeps its length
        torch.testing.assert_close(
            net(pretrained).detach().flatten(1).norm(dim=1),
            pretrained.flatten(1).norm(dim=1),
            rtol=1e-5,
            atol=1e-6,
        )
        torch.testing.assert_close((probe @ W.T).norm(dim=1), probe.norm(dim=1), rtol=1e-5, atol=1e-6)
    assert torch.equal(cnn.conv.weight, pretrained)  # the CNN itself never changed
    assert losses[-1] < 1e-3 * losses[0], (losses[0], losses[-1])
    # the learned map rotates the pretrained filters
    torch.testing.assert_close(net(pretrained).detach(), rotate(pretrained), rtol=0, atol=2e-2)
    assert all(r.residual < 1e-5 for r in opt.audit.history)
