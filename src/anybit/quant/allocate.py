"""Bit allocation: choose one candidate width per unit (row, column or group) under a bit budget.

Every allocator takes an error table ``err[u, c]`` (the layer-output error of unit u at candidate
c, non-increasing in c is typical but not required) and a cost table ``cost[u, c]`` (the honest
bits unit u stores at candidate c: codes plus its share of codebooks/metadata), and returns the
chosen candidate index per unit with total cost <= budget.

- ``greedy_allocate``: SKIM's heap. Start every unit at its cheapest candidate and repeatedly
  upgrade the unit whose next step buys the largest error drop per bit, while it fits.
- ``lagrangian_allocate``: the exact solution on the convex hull -- each unit minimises
  err + lam * cost for a multiplier found by bisection -- then a greedy fill of what is left.
  It also yields a lower bound on the optimum at the budget (``lagrangian_bound``).
- ``exact_allocate``: multiple-choice knapsack by dynamic programming over integer costs; the
  ground truth for small problems in tests.
- ``ranked_allocate``: two widths split by a ranking (CMPQ's activation norms, CLAQ's outlier
  order): the top-ranked units take the higher width, as many as the budget allows.
"""

from __future__ import annotations

import heapq

import torch


def _check(err: torch.Tensor, cost: torch.Tensor, budget: float) -> None:
    if err.shape != cost.shape:
        raise ValueError(f"error table {tuple(err.shape)} and cost table {tuple(cost.shape)} differ")
    if float(cost.min(1).values.sum()) > budget + 1e-6:
        raise ValueError(f"budget {budget:.0f} bits is below the cheapest allocation {float(cost.min(1).values.sum()):.0f}")


def greedy_allocate(err: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """SKIM's greedy heap; candidates ordered by cost within each unit."""
    _check(err, cost, budget)
    e = err.double().tolist()
    c = cost.double().tolist()
    n_cand = len(e[0])
    choice = [0] * len(e)
    spent = sum(row[0] for row in c)
    heap = []

    def push(u: int) -> None:
        k = choice[u]
        # Look past a step that does not help (non-convex tables) to the best ratio further on.
        best = None
        for nxt in range(k + 1, n_cand):
            extra = c[u][nxt] - c[u][k]
            if extra <= 0:
                continue
            ratio = (e[u][k] - e[u][nxt]) / extra
            if best is None or ratio > best[0]:
                best = (ratio, nxt)
        if best is not None and best[0] > 0:
            heapq.heappush(heap, (-best[0], u, k, best[1]))

    for u in range(len(e)):
        push(u)
    while heap:
        _neg, u, k, nxt = heapq.heappop(heap)
        if choice[u] != k:
            continue
        extra = c[u][nxt] - c[u][k]
        if spent + extra > budget + 1e-9:
            continue  # this upgrade no longer fits; cheaper ones elsewhere still may
        choice[u] = nxt
        spent += extra
        push(u)
    return torch.tensor(choice, dtype=torch.long)


def _pick(err: torch.Tensor, cost: torch.Tensor, lam: float) -> torch.Tensor:
    return (err + lam * cost).argmin(1)


def _spent(cost: torch.Tensor, choice: torch.Tensor) -> float:
    return float(cost.gather(1, choice[:, None]).sum())


def lagrangian_allocate(err: torch.Tensor, cost: torch.Tensor, budget: float, iters: int = 100) -> torch.Tensor:
    """Minimise sum err s.t. sum cost <= budget on the convex hull, then fill greedily."""
    _check(err, cost, budget)
    err, cost = err.double(), cost.double()
    lo, hi = 0.0, 1.0
    while _spent(cost, _pick(err, cost, hi)) > budget:
        hi *= 2
        if hi > 1e30:
            break
    for _ in range(iters):
        mid = (lo + hi) / 2
        if _spent(cost, _pick(err, cost, mid)) > budget:
            lo = mid
        else:
            hi = mid
    return _fill(err, cost, budget, _pick(err, cost, hi))


def _fill(err, cost, budget, choice) -> torch.Tensor:
    """Spend what is left on single upgrades, best error drop per bit first."""
    choice = choice.clone()
    spent = _spent(cost, choice)
    while True:
        cur_e = err.gather(1, choice[:, None])
        cur_c = cost.gather(1, choice[:, None])
        extra = cost - cur_c
        gain = cur_e - err
        ok = (extra > 0) & (gain > 0) & (extra <= budget - spent + 1e-9)
        if not bool(ok.any()):
            return choice
        ratio = torch.where(ok, gain / extra.clamp_min(1e-12), torch.full_like(gain, -1.0))
        flat = int(ratio.argmax())
        u, k = divmod(flat, err.shape[1])
        spent += float(extra[u, k])
        choice[u] = k


def lagrangian_bound(err: torch.Tensor, cost: torch.Tensor, budget: float, iters: int = 100) -> float:
    """max over lam of min_choice sum(err + lam * (cost - budget)): a lower bound on the optimum."""
    err, cost = err.double(), cost.double()

    def dual(lam: float) -> float:
        v = (err + lam * cost).min(1).values.sum()
        return float(v) - lam * budget

    lo, hi = 0.0, 1.0
    while _spent(cost, _pick(err, cost, hi)) > budget and hi < 1e30:
        hi *= 2
    # The dual is concave in lam; ternary search for its maximum.
    for _ in range(iters):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if dual(m1) < dual(m2):
            lo = m1
        else:
            hi = m2
    return dual((lo + hi) / 2)


def exact_allocate(err: torch.Tensor, cost: torch.Tensor, budget: int) -> torch.Tensor:
    """Exact multiple-choice knapsack by DP over integer costs (small problems only)."""
    _check(err, cost, budget)
    cost_i = cost.long()
    if not torch.equal(cost_i.double(), cost.double()):
        raise ValueError("exact_allocate needs integer costs")
    budget = int(budget)
    inf = float("inf")
    best = torch.full((budget + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for u in range(err.shape[0]):
        new = torch.full_like(best, inf)
        arg = torch.full((budget + 1,), -1, dtype=torch.long)
        for k in range(err.shape[1]):
            c = int(cost_i[u, k])
            if c > budget:
                continue
            cand = torch.full_like(best, inf)
            cand[c:] = best[: budget + 1 - c] + float(err[u, k])
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, k), arg)
        best = new
        choices.append(arg)
    b = int(best.argmin())
    choice = torch.zeros(err.shape[0], dtype=torch.long)
    for u in range(err.shape[0] - 1, -1, -1):
        k = int(choices[u][b])
        choice[u] = k
        b -= int(cost_i[u, k])
    return choice


def ranked_allocate(rank_score: torch.Tensor, cost: torch.Tensor, budget: float, low: int, high: int) -> torch.Tensor:
    """Candidate ``high`` for the top-scored units, ``low`` for the rest, as many high as fit."""
    order = torch.argsort(rank_score, descending=True)
    base = float(cost[:, low].sum())
    extra = (cost[order, high] - cost[order, low]).double().cumsum(0)
    n_high = int((extra <= budget - base + 1e-9).sum())
    choice = torch.full((rank_score.numel(),), low, dtype=torch.long)
    choice[order[:n_high]] = high
    return choice
