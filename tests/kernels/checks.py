"""Shared checks of the kernel tests."""

from __future__ import annotations

import torch


def rel_err(y, ref):
    """Relative error of y against ref; fails when y has NaN/inf (an element left unwritten)."""
    y, ref = y.double(), ref.double()
    assert torch.isfinite(y).all(), "output has NaN/inf: some element was not written"
    return ((y - ref).norm() / ref.norm()).item()
