import torch

from anybit.quant.allocate import (
    exact_allocate, greedy_allocate, lagrangian_allocate, lagrangian_bound, ranked_allocate,
)


def convex_table(units=40, cands=5, seed=0):
    """Errors decreasing and convex in cost per unit, as L-full over widths is in practice."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(units, 1, generator=g) * 10 + 0.1
    err = scale * 4.0 ** -torch.arange(cands, dtype=torch.float64)[None, :]
    cost = (torch.arange(1, cands + 1) * 8)[None, :].expand(units, -1).double().clone()
    return err, cost


def _spent(cost, choice):
    return float(cost.gather(1, choice[:, None]).sum())


def _error(err, choice):
    return float(err.gather(1, choice[:, None]).sum())


def test_budgets_are_hit_exactly_on_integer_steps():
    err, cost = convex_table()
    for budget in (40 * 8, 40 * 12, 40 * 20, 40 * 24 + 8, 40 * 40):
        for alloc in (greedy_allocate, lagrangian_allocate):
            choice = alloc(err, cost, budget)
            # Every unit step costs 8 bits: a budget that is a multiple of 8 is spent to the bit.
            assert _spent(cost, choice) == min(budget, 40 * 40)


def test_greedy_equals_exact_on_convex_tables():
    for seed in range(5):
        err, cost = convex_table(units=12, cands=4, seed=seed)
        for budget in (12 * 8 + 24, 12 * 16, 12 * 24 + 16):
            greedy = greedy_allocate(err, cost, budget)
            exact = exact_allocate(err, cost, budget)
            assert abs(_error(err, greedy) - _error(err, exact)) <= 1e-9 * _error(err, exact)


def test_lagrangian_bound_is_below_every_feasible_allocation():
    g = torch.Generator().manual_seed(3)
    err = torch.rand(10, 4, generator=g, dtype=torch.float64).sort(1, descending=True).values
    cost = torch.tensor([[3.0, 5.0, 9.0, 12.0]], dtype=torch.float64).expand(10, -1)
    budget = 70
    bound = lagrangian_bound(err, cost, budget)
    exact = exact_allocate(err, cost, budget)
    assert bound <= _error(err, exact) + 1e-9
    assert _error(err, greedy_allocate(err, cost, budget)) >= _error(err, exact) - 1e-9


def test_non_convex_tables_stay_within_budget():
    g = torch.Generator().manual_seed(4)
    err = torch.rand(30, 6, generator=g, dtype=torch.float64)
    cost = torch.rand(30, 6, generator=g, dtype=torch.float64).cumsum(1) * 10
    budget = float(cost[:, 2].sum())
    for alloc in (greedy_allocate, lagrangian_allocate):
        assert _spent(cost, alloc(err, cost, budget)) <= budget + 1e-6


def test_ranked_gives_high_width_to_top_scores():
    cost = torch.tensor([[10.0, 20.0]]).expand(6, -1)
    score = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 0.0])
    choice = ranked_allocate(score, cost, budget=60 + 20, low=0, high=1)
    assert choice.tolist() == [0, 1, 0, 1, 0, 0]
