"""CMPQ: channel-wise mixed precision from activation norms, per-channel k-means, fp16 outliers.

1. rank input channels (columns) by the L2 norm of their calibration activations;
2. the top-ranked channels take the higher of two widths, as many as the honest budget allows
   after the outliers' storage;
3. one k-means codebook per channel at its width (the channel's weights share one activation,
   so plain, unweighted k-means is the right objective within a column);
4. two outlier sets kept in fp16: activation-based (largest |w| x activation norm) and
   quantization-aware (largest quantization error x activation norm after a first pass); the
   channels are then re-clustered without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from anybit.methods.base import check_budget
from anybit.quant import outliers as sparse
from anybit.quant.allocate import ranked_allocate
from anybit.quant.kmeans import codebooks_at_widths, decode
from anybit.quant.qweight import FP16_BITS, WIDTH_BITS, QuantizedWeight


def column_codebooks(w: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor):
    """One codebook per column at each column's width: (lut (cols, 2^max) fp16, codes (rows, cols))."""
    lut, codes_t = codebooks_at_widths(w.t().contiguous(), weight.t().contiguous(), bits.to(w.device))
    return lut, codes_t.t().contiguous()


def column_widths(score: torch.Tensor, rows: int, budget_bits: float) -> torch.Tensor:
    """Two adjacent widths over the columns, the higher one for the top-scored columns."""
    score = score.cpu()
    cols = score.numel()
    per_col = budget_bits / cols
    low = max(1, min(7, math.floor((per_col - FP16_BITS * 2) / rows)))
    while low > 1 and rows * low + FP16_BITS * 2**low > per_col:
        low -= 1
    widths = (low, low + 1)
    cost = torch.tensor([[rows * b + FP16_BITS * 2**b for b in widths]], dtype=torch.float64).expand(cols, -1)
    return torch.tensor(widths)[ranked_allocate(score, cost, budget_bits, 0, 1)]


@dataclass
class CMPQ:
    budget: float
    outlier_fraction: float = 0.005  # both outlier kinds together (the paper: ~0.45-0.5%)
    name = "cmpq"

    @classmethod
    def from_options(cls, bits, group_size=0, outlier_fraction=0.005, **_):
        return cls(check_budget(cls.name, bits, 1.2), float(outlier_fraction))

    def quantize(self, weight, stats, name=None) -> QuantizedWeight:
        rows, cols = weight.shape
        w = weight.float()
        act_norm = (stats.act_sq * stats.n_tokens).sqrt().to(w.device)
        n_out = int(round(self.outlier_fraction * w.numel()))
        budget = self.budget * w.numel() - WIDTH_BITS * cols - sparse.outlier_bits(n_out, rows, cols)
        bits = column_widths(act_norm, rows, budget).to(w.device)

        # Activation-based outliers: half the outlier budget on |w| x activation norm.
        act_pos = sparse.top_fraction(w.abs() * act_norm[None, :], self.outlier_fraction / 2)
        keep_mask = sparse.mask(w.shape, act_pos, w.device)
        lut, codes = column_codebooks(w, (~keep_mask).float(), bits)
        # Quantization-aware outliers: the worst remaining errors, weighted by activation norm.
        err = (w - decode(lut, codes.t()).t()).abs() * act_norm[None, :]
        q_pos = sparse.top_fraction(err, (n_out - act_pos.numel()) / w.numel(), exclude=act_pos)
        positions = torch.cat([act_pos, q_pos]).sort().values
        keep_mask = sparse.mask(w.shape, positions, w.device)
        lut, codes = column_codebooks(w, (~keep_mask).float(), bits)
        return QuantizedWeight(rows, cols, codes, bits.to(torch.int32).cpu(), lut=lut, lut_axis=1,
                               outliers=sparse.keep(w, positions))
