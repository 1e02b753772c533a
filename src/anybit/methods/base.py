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
