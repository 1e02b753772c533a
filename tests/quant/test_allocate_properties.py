"""Properties of the bit allocators on random tables (hypothesis): every allocation is in range and
within budget, the exact DP is never beaten, and greedy is exact where theory says it must be."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anybit.quant.allocate import (
    exact_allocate, greedy_allocate, lagrangian_allocate, lagrangian_bound, ranked_allocate,
)

FAST = settings(max_examples=150, deadline=None, database=None)
TOL = 1e-9


def _spent(cost, choice) -> float:
    return float(cost.gather(1, choice[:, None]).sum())


def _error(err, choice) -> float:
    return float(err.gather(1, choice[:, None]).sum())


@st.composite
def tables(draw, convex: bool = False):
    """(err, cost, budget): integer costs increasing along each unit's candidates, as widths cost;
    a budget between the cheapest and the dearest allocation. ``convex``: every step costs the
    same and errors fall by shrinking amounts -- where greedy is provably optimal."""
    units, cands = draw(st.integers(1, 10)), draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if convex:
        step = draw(st.integers(1, 20))
        base = torch.randint(1, 30, (units, 1), generator=g).double()
        cost = base + step * torch.arange(cands, dtype=torch.float64)[None, :]
        gains = torch.rand(units, cands - 1, generator=g, dtype=torch.float64).sort(1, descending=True).values
        err = torch.cat([torch.zeros(units, 1, dtype=torch.float64), -gains.cumsum(1)], 1) + gains.sum(1, True) + 1
    else:
        cost = torch.randint(1, 30, (units, cands), generator=g).cumsum(1).double()
        err = torch.rand(units, cands, generator=g, dtype=torch.float64) * 10
    low, high = float(cost[:, 0].sum()), float(cost[:, -1].sum())
    budget = int(low + draw(st.floats(0, 1.2)) * (high - low))
    return err, cost, budget


def _check_allocation(choice, cost, budget):
    units, cands = cost.shape
    assert choice.dtype == torch.long and tuple(choice.shape) == (units,)
    assert bool(((choice >= 0) & (choice < cands)).all())
    assert _spent(cost, choice) <= budget + 1e-6


@FAST
@given(tables())
def test_every_allocator_stays_in_range_and_budget(table):
    err, cost, budget = table
    for allocate in (greedy_allocate, lagrangian_allocate, exact_allocate):
        _check_allocation(allocate(err, cost, budget), cost, budget)


@FAST
@given(tables())
def test_exact_is_never_beaten_and_the_bound_is_below_it(table):
    err, cost, budget = table
    best = _error(err, exact_allocate(err, cost, budget))
    for allocate in (greedy_allocate, lagrangian_allocate):
        assert _error(err, allocate(err, cost, budget)) >= best - TOL * max(1.0, best)
    assert lagrangian_bound(err, cost, budget) <= best + 1e-6 * max(1.0, best)


@FAST
@given(tables(convex=True))
def test_greedy_equals_exact_on_convex_tables(table):
    err, cost, budget = table
    greedy, exact = _error(err, greedy_allocate(err, cost, budget)), _error(err, exact_allocate(err, cost, budget))
    assert greedy == pytest.approx(exact, rel=1e-12, abs=1e-12)


@FAST
@given(tables())
def test_a_budget_below_the_cheapest_allocation_is_refused(table):
    err, cost, _budget = table
    too_little = float(cost[:, 0].sum()) - 1
    for allocate in (greedy_allocate, lagrangian_allocate, exact_allocate):
        with pytest.raises(ValueError, match="below the cheapest"):
            allocate(err, cost, too_little)


@FAST
@given(units=st.integers(1, 40), seed=st.integers(0, 2**16), share=st.floats(0, 1.2))
def test_ranked_gives_the_top_scores_the_high_width_as_far_as_the_budget_goes(units, seed, share):
    g = torch.Generator().manual_seed(seed)
    score = torch.randperm(units, generator=g).double()  # distinct: the ranking is unambiguous
    low_cost = torch.randint(1, 20, (units,), generator=g).double()
    cost = torch.stack([low_cost, low_cost + torch.randint(0, 20, (units,), generator=g)], 1)
    base, top = float(cost[:, 0].sum()), float(cost[:, 1].sum())
    budget = base + share * (top - base)
    choice = ranked_allocate(score, cost, budget, low=0, high=1)
    _check_allocation(choice, cost, budget)
    high = choice == 1
    if bool(high.any()):  # every unit ranked above a high one is high too
        assert bool(high[score > score[high].min()].all())
    if not bool(high.all()):  # and the next unit in rank would not have fit
        nxt = int(torch.where(high, torch.full_like(score, -1), score).argmax())
        assert _spent(cost, choice) + float(cost[nxt, 1] - cost[nxt, 0]) > budget
