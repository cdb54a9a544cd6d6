"""Layout-aware defaults: `MaxNorm`/`UnitNorm` units and `NMSparsity` groups follow the layer that
owns the weight (`constraints.layout`); an explicit ``dim`` always wins."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import constrained_optim as co
from constrained_optim.constraints.layout import input_dim, output_dim


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D`` as it is laid out: weight ``(in, out)``, ``nf`` outputs."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class Other(nn.Module):
    pass


@pytest.mark.parametrize(
    "owner, weight, out, inp",
    [
        (None, torch.zeros(4, 6), 0, -1),
        (nn.Linear(6, 4), torch.zeros(4, 6), 0, -1),
        (Other(), torch.zeros(4, 6), 0, -1),
        (nn.Conv2d(3, 8, 3), torch.zeros(8, 3, 3, 3), 0, 1),
        (nn.Conv1d(3, 8, 3, groups=1), torch.zeros(8, 3, 3), 0, 1),
        (nn.ConvTranspose2d(3, 8, 3), torch.zeros(3, 8, 3, 3), 1, 0),
        (Conv1D(8, 4), torch.zeros(4, 8), -1, 0),
        (nn.Embedding(10, 4), torch.zeros(10, 4), 0, -1),
        (nn.Conv2d(3, 8, 3), torch.zeros(8), 0, -1),  # a bias has no layout
    ],
    ids=["none", "linear", "unknown", "conv2d", "conv1d", "conv-transpose", "hf-conv1d", "embedding", "bias"],
)
def test_output_and_input_dims_of_each_layout(owner, weight, out, inp):
    assert (output_dim(owner, weight), input_dim(owner, weight)) == (out, inp)


def unit_norms(w, out):
    other = [d for d in range(w.dim()) if d != out % w.dim()]
    return torch.linalg.vector_norm(w, dim=other)


@pytest.mark.parametrize(
    "module",
    [nn.Linear(6, 4), nn.Conv2d(3, 5, 3), nn.ConvTranspose2d(3, 5, 3), Conv1D(5, 4), nn.Embedding(7, 3)],
    ids=type,
)
def test_max_norm_and_unit_norm_take_the_owners_output_units(module):
    w = module.weight.detach() * 5
    out = output_dim(module, w)
    y = w.clone()
    co.MaxNorm(1.0).bind(module.weight, "weight", module).project_(y)
    norms = unit_norms(y, out)
    assert norms.numel() == w.shape[out] and float(norms.max()) <= 1 + 1e-6
    z = w.clone()
    co.UnitNorm().bind(module.weight, "weight", module).project_(z)
    torch.testing.assert_close(unit_norms(z, out), torch.ones(w.shape[out]))


def test_without_an_owner_the_output_dim_is_0_and_an_explicit_dim_wins():
    layer = Conv1D(5, 4)  # (in=4, out=5)
    w = layer.weight.detach() * 5
    y = w.clone()
    co.MaxNorm(1.0).bind(layer.weight, "weight").project_(y)  # no owner: rows are units
    assert float(torch.linalg.vector_norm(y, dim=1).max()) <= 1 + 1e-6
    z = w.clone()
    co.MaxNorm(1.0, dim=1).bind(layer.weight, "weight", layer).project_(z)  # dim given: norms over dim 1
    torch.testing.assert_close(z, y)
    bias = w[0].clone()
    co.MaxNorm(1.0).bind(layer.bias, "bias", layer).project_(bias)  # a vector: one unit
    assert float(bias.norm()) <= 1 + 1e-6


def test_unit_traits_name_the_reduced_dims():
    conv = nn.Conv2d(3, 5, 3)
    assert co.MaxNorm(1.0).bind(conv.weight, "w", conv).traits.reduces == (1, 2, 3)
    transposed = nn.ConvTranspose2d(3, 5, 3)
    assert co.UnitNorm().bind(transposed.weight, "w", transposed).traits.reduces == (0, 2, 3)
    assert co.MaxNorm(1.0).bind(conv.bias, "b", conv).traits.reduces is None  # the whole vector


def groups_ok(w, n, m, dim):
    moved = w.movedim(dim, -1)
    return bool(((moved.reshape(*moved.shape[:-1], -1, m) != 0).sum(-1) <= n).all())


@pytest.mark.parametrize(
    "module, dim",
    [(nn.Linear(8, 4), -1), (nn.Conv2d(8, 4, 3), 1), (nn.ConvTranspose2d(8, 4, 3), 0), (Conv1D(4, 8), 0)],
    ids=str,
)
def test_nm_sparsity_groups_along_the_owners_input_dim(module, dim):
    torch.manual_seed(0)
    with torch.no_grad():
        module.weight.normal_()
    bound = co.NMSparsity(2, 4).bind(module.weight, "weight", module)
    y = torch.randn_like(module.weight)
    bound.project_(y)
    assert groups_ok(y, 2, 4, dim)
    assert bound.state_tensors()["keep"].shape == module.weight.shape
    free = co.NMSparsity(2, 4, fixed=False).bind(module.weight, "weight", module)
    assert free.traits.reduces == (dim % module.weight.dim(),)


def test_nm_sparsity_explicit_dim_wins_and_repr_shows_only_a_given_dim():
    conv = nn.Conv2d(3, 8, 3)  # 3 input channels: not a multiple of 4, but 8 outputs are
    with pytest.raises(co.ConstraintError, match=r"dim 1 .*size 3 is not a multiple of 4"):
        co.NMSparsity(2, 4).bind(conv.weight, "weight", conv)
    bound = co.NMSparsity(2, 4, dim=0).bind(conv.weight, "weight", conv)
    assert groups_ok(conv.weight.detach() * bound.state_tensors()["keep"], 2, 4, 0)
    assert repr(co.NMSparsity(2, 4)) == "NMSparsity(2:4)"
    assert repr(co.NMSparsity(2, 4, dim=0)) == "NMSparsity(2:4, dim=0)"
    assert repr(co.NMSparsity(1, 2, dim=-1, fixed=False)) == "NMSparsity(1:2, dim=-1, fixed=False)"
    with pytest.raises(co.ConstraintError, match="dim must be an int or None"):
        co.NMSparsity(2, 4, dim=1.0)
