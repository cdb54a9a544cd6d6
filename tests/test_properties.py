"""Property-based checks: random shapes, patterns and values against plain-Python references."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import constrained_optim as co

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def tied_problem(draw):
    lead = draw(st.integers(1, 3))
    n = draw(st.integers(1, 12))
    labels = draw(st.lists(st.integers(-3, 4), min_size=n, max_size=n))
    values = draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=lead * n, max_size=lead * n))
    return torch.tensor(labels), torch.tensor(values, dtype=torch.float64).view(lead, n)


@SETTINGS
@given(tied_problem())
def test_tied_is_the_group_mean(problem):
    labels, x = problem
    y = x.clone()
    with torch.no_grad():
        co.Tied(labels).bind(torch.nn.Parameter(x.clone()), "w").project_(y)
    xs, ls = x.numpy(), labels.numpy()
    for row in range(xs.shape[0]):
        for label in set(ls.tolist()):
            members = ls == label
            np.testing.assert_allclose(
                y.numpy()[row, members], xs[row, members].mean(), rtol=1e-12, atol=1e-9
            )
            assert len(set(y.numpy()[row, members].tolist())) == 1  # bitwise one value per group


@st.composite
def masked_problem(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    n = int(np.prod(shape))
    mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    x = draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=n, max_size=n))
    value = draw(st.floats(-5, 5, width=32))
    return torch.tensor(mask).view(shape), torch.tensor(x).view(shape), value


@SETTINGS
@given(masked_problem())
def test_mask_and_fixed_against_entrywise_rules(problem):
    mask, x, value = problem
    p = torch.nn.Parameter(x.clone())
    y, z = x.clone(), x.clone()
    with torch.no_grad():
        co.Mask(mask).bind(p, "w").project_(y)
        co.Fixed(mask, value).bind(p, "w").project_(z)
    for i in range(x.numel()):
        keep = bool(mask.flatten()[i])
        assert y.flatten()[i] == (x.flatten()[i] if keep else 0.0)
        assert z.flatten()[i] == (torch.tensor(value, dtype=x.dtype) if keep else x.flatten()[i])


@SETTINGS
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_symmetric_is_the_mean_with_the_transpose(n, seed):
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = x.clone()
    with torch.no_grad():
        co.Symmetric().bind(torch.nn.Parameter(x.clone()), "w").project_(y)
    for i in range(n):
        for j in range(n):
            assert y[i, j] == y[j, i]
            assert abs(float(y[i, j]) - (float(x[i, j]) + float(x[j, i])) / 2) <= 1e-12 * (
                1 + abs(float(x[i, j]))
            )


@SETTINGS
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=10), st.floats(-5, 0), st.floats(0, 5))
def test_box_is_the_entrywise_clamp(values, low, high):
    x = torch.tensor(values, dtype=torch.float64)
    y = x.clone()
    with torch.no_grad():
        co.Box(low, high).bind(torch.nn.Parameter(x.clone()), "w").project_(y)
    assert y.tolist() == [min(max(v, low), high) for v in values]
