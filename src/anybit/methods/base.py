"""Checks shared by the method recipes."""

from __future__ import annotations

from anybit.errors import AnybitError

MAX_BITS = 8


def integer_bits(method: str, bits: float) -> int:
    """Uniform-width methods take a whole number of bits per code."""
    if bits != int(bits) or not 1 <= bits <= MAX_BITS:
        raise AnybitError(
            f"method {method} takes a whole number of bits from 1 to {MAX_BITS} (got {bits}); "
            "fractional budgets need a mixed-precision method such as skim"
        )
    return int(bits)


def check_group_size(group_size: int) -> int:
    if group_size < 0:
        raise AnybitError(f"group size must be 0 (per channel) or positive, got {group_size}")
    return group_size


def check_budget(method: str, budget: float, low: float = 1.0, high: float = MAX_BITS) -> float:
    """A budget is honest total bits per weight: codes, codebooks, scales, metadata, outliers."""
    if not low < budget <= high:
        raise AnybitError(f"method {method} takes a budget above {low:g} and at most {high:g} bits per weight "
                          f"(got {budget:g})")
    return float(budget)


def choose(allocator: str):
    """The allocator function for a name (``greedy``: SKIM's heap; ``lagrangian``: the exact reference)."""
    from anybit.quant.allocate import greedy_allocate, lagrangian_allocate
    from anybit.timing import timed

    table = {"greedy": greedy_allocate, "lagrangian": lagrangian_allocate}
    if allocator not in table:
        raise AnybitError(f"unknown allocator {allocator!r}: choose from {', '.join(table)}")

    @timed("allocation")
    def allocate(err, cost, budget):
        if float(cost.min(1).values.sum()) > budget:
            raise AnybitError(
                f"budget not reachable: the narrowest candidate width already needs "
                f"{float(cost.min(1).values.sum()) / budget:.2f}x the bits available (codebooks included)"
            )
        return table[allocator](err, cost, budget)

    return allocate


def check_scope(scope: str) -> str:
    if scope not in ("layer", "model"):
        raise AnybitError(f"budget scope must be 'layer' or 'model', got {scope!r}")
    return scope
