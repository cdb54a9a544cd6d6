"""`NMSparsity` against brute force over every pattern; the fixed pattern behaves as a `Mask`."""

from __future__ import annotations

import itertools

import pytest
import torch

import constrained_optim as co


def projected(constraint, x):
    b = constraint.bind(torch.nn.Parameter(x.clone()), "w")
    y = x.clone()
    with torch.no_grad():
        b.project_(y)
    return y


def brute_force_nm(x: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """The nearest point with at most n non-zeros in each group of m along dim: for every group,
    try every set of kept entries and keep the one that removes the least energy."""
    moved = x.movedim(dim, -1).contiguous()
    out = torch.zeros_like(moved)
    flat_in, flat_out = moved.view(-1, m), out.view(-1, m)
    for g in range(flat_in.shape[0]):
        best = min(
            itertools.combinations(range(m), n),
            key=lambda keep: float(sum(flat_in[g, j] ** 2 for j in range(m) if j not in keep)),
        )
        flat_out[g, list(best)] = flat_in[g, list(best)]
    return out.movedim(-1, dim)


@pytest.mark.parametrize(
    "n, m, dim, shape",
    [
        (2, 4, -1, (3, 8)),
        (1, 4, -1, (2, 3, 4)),
        (3, 4, 0, (8, 3)),
        (2, 6, 1, (2, 12, 2)),
        (1, 2, 0, (4, 5)),
    ],
)
@pytest.mark.parametrize("fixed", [True, False])
def test_selection_is_the_brute_force_nearest_pattern(n, m, dim, shape, fixed):
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(
        projected(co.NMSparsity(n, m, dim=dim, fixed=fixed), x), brute_force_nm(x, n, m, dim), rtol=0, atol=0
    )


def test_ties_keep_the_lower_index():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 2.0, 2.0, -2.0]])
    keep = projected(co.NMSparsity(2, 4, fixed=False), x) != 0
    assert keep[0].tolist() == [True, True, False, False]
    assert keep[2].tolist() == [True, True, False, False]
    bound = co.NMSparsity(2, 4).bind(torch.nn.Parameter(torch.zeros(2, 4)), "w")
    assert bound.state_tensors()["keep"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_fixed_pattern_is_chosen_at_attach_and_held_like_a_mask():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = co.ConstrainedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    x = torch.randn(16, 8)
    for _ in range(3):  # warm: Adam holds moments for every entry
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    expected = brute_force_nm(model.weight.detach(), 2, 4, -1) != 0
    opt.attach("weight", co.NMSparsity(2, 4))
    keep = model.weight.detach() != 0
    assert torch.equal(keep, expected)
    state = opt.state[model.weight]
    assert bool((state["exp_avg"][~keep] == 0).all()) and bool((state["exp_avg_sq"][~keep] == 0).all())
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        assert float(model.weight.grad.abs()[~keep].sum()) > 0
        opt.step()
        assert bool((model.weight.detach()[~keep] == 0).all())  # the same pattern, exactly
    assert opt.audit.last[0].grad_blocked > 0  # the pruned entries' gradient was removed


def test_free_pattern_lets_pruned_entries_grow_back():
    p = torch.nn.Parameter(torch.tensor([[4.0, 3.0, 0.1, 0.2]]))
    opt = co.ConstrainedOptimizer(torch.optim.SGD([p], lr=1.0)).attach(p, co.NMSparsity(2, 4, fixed=False))
    assert p.detach().tolist() == [[4.0, 3.0, 0.0, 0.0]]
    p.grad = torch.tensor([[5.0, 0.0, -6.0, 0.0]])  # pushes entry 2 above entry 0
    opt.step()
    assert p.detach().tolist() == [[0.0, 3.0, 6.0, 0.0]]


def test_fixed_pattern_is_saved_with_the_optimizer_and_restored():
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    a = torch.nn.Parameter(w.clone())
    opt_a = co.ConstrainedOptimizer(torch.optim.SGD([a], lr=0.1)).attach(a, co.NMSparsity(2, 4))
    keep = opt_a.engine.bounds[a].state_tensors()["keep"].clone()
    b = torch.nn.Parameter(torch.randn(4, 8))  # different values: a different pattern at attach
    bound_b = co.NMSparsity(2, 4).bind(b, "b")
    assert not torch.equal(bound_b.state_tensors()["keep"], keep)
    bound_b = bound_b.with_state({"keep": keep})
    y = torch.randn(4, 8)
    with torch.no_grad():
        bound_b.project_(y)
    assert torch.equal(y != 0, keep.bool() & (y != 0)) and torch.equal(
        (y == 0) | keep.bool(), torch.ones_like(keep, dtype=torch.bool)
    )


def test_bad_arguments_and_shapes_raise_naming_the_parameter():
    for n, m in [(0, 4), (5, 4), (-1, 2), (1, 0)]:
        with pytest.raises(co.ConstraintError, match="1 <= n <= m"):
            co.NMSparsity(n, m)
    with pytest.raises(co.ConstraintError, match="int"):
        co.NMSparsity(2.0, 4)
    model = torch.nn.Linear(6, 3)
    opt = co.ConstrainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(co.ConstraintError, match=r"weight \(shape \(3, 6\).*size 6 is not a multiple of 4"):
        opt.attach("weight", co.NMSparsity(2, 4))
    with pytest.raises(co.ConstraintError, match=r"dim 2 is out of range"):
        opt.attach("weight", co.NMSparsity(1, 3, dim=2))


def _sorted_keep(x, n, m, dim):
    """The reference: a stable descending sort's first n of every group."""
    moved = x.movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).abs()
    order = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(groups.shape, dtype=torch.uint8).scatter_(-1, order, 1)
    return keep.view(moved.shape).movedim(-1, dim).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 16)])
def test_rank_keep_equals_the_stable_sort_with_ties_zeros_and_non_finite(n, m, dtype):
    from constrained_optim.constraints.sparsity import nm_keep

    gen = torch.Generator().manual_seed(n * 100 + m)
    x = torch.randn(6, 32, 3, generator=gen, dtype=dtype)
    flat = x.view(-1)
    flat[::7] = flat[1::7]  # ties
    flat[::5] = -flat[::5].abs()  # equal magnitudes of opposite signs
    flat[::11] = 0.0
    flat[2::13] = -0.0
    flat[3::17] = float("inf")
    flat[4::19] = float("nan")
    for dim in (1,):
        assert torch.equal(nm_keep(x, n, m, dim), _sorted_keep(x, n, m, dim))
    y = x.permute(1, 0, 2).contiguous()
    assert torch.equal(nm_keep(y, n, m, 0), _sorted_keep(y, n, m, 0))


def test_rank_keep_matches_brute_force_over_every_tie_pattern():
    """Every 2:4 group of values from {0, 1, -1, 2} (every tie pattern, signs included): the kept
    pair is the first two indices ordered by (-|x|, index)."""
    from constrained_optim.constraints.sparsity import nm_keep

    rows = torch.tensor(list(itertools.product([0.0, 1.0, -1.0, 2.0], repeat=4)))
    keep = nm_keep(rows, 2, 4, 1)
    for row, k in zip(rows.abs(), keep):
        # brute force: order indices by (-|x|, index), keep the first two
        order = sorted(range(4), key=lambda i: (-float(row[i]), i))[:2]
        expected = torch.zeros(4, dtype=torch.uint8)
        expected[order] = 1
        assert torch.equal(k, expected), (row, k)
