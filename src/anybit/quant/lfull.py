"""The layer-output error SKIM calls "L-full": for each row, dw H dw^T with dw = w - w_hat."""

from __future__ import annotations

import torch

from anybit.timing import timed


@timed("lfull")
def row_output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row ||X dw_r||^2 / tokens = dw_r H dw_r^T, batched over rows (R,)."""
    d = (w - w_hat).float()
    return ((d @ h.float()) * d).sum(1)
