"""Dense-and-sparse outliers: a few weights kept in fp16, the rest quantized.

Selection is by a score per weight (magnitude x activation scale, quantization error x
sensitivity, ...); the kept weights are stored as CSR and replace the de-quantized values at
their positions. Their storage counts in the bit budget (``Outliers.storage_bits``).
"""

from __future__ import annotations

import torch

from anybit.quant.qweight import FP16_BITS, Outliers, index_bits


def top_fraction(score: torch.Tensor, fraction: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Flat positions of the ``fraction`` highest scores, sorted; ``exclude`` positions are skipped."""
    flat = score.reshape(-1).float().clone()
    if exclude is not None and exclude.numel():
        flat[exclude] = -torch.inf
    k = int(round(fraction * flat.numel()))
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    return flat.topk(k).indices.sort().values


def outlier_bits(count: int, rows: int, cols: int) -> int:
    """Bits ``count`` outliers cost in CSR: value + column index each, plus the row pointer."""
    return 0 if count == 0 else count * (FP16_BITS + index_bits(cols)) + (rows + 1) * 32


def keep(w: torch.Tensor, positions: torch.Tensor) -> Outliers:
    """The fp16 values of ``w`` at ``positions``."""
    return Outliers(positions.cpu(), w.reshape(-1)[positions].to(torch.float16).cpu())


def mask(shape, positions: torch.Tensor, device=None) -> torch.Tensor:
    """Boolean (rows, cols) that is True at ``positions``."""
    m = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=device)
    m[positions] = True
    return m.view(shape)
