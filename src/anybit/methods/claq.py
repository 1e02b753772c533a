"""CLAQ: column-wise k-means inside GPTQ, outlier-guided precision, outlier reservation.

1. outlier order OO_j = number of weights in column j with |w| >= 13 mean|W|;
2. columns by OO: the top ones take the high width (4 bits), the rest the low one (2 below a
   3-bit budget, else 3) -- the paper's fractions (T-2)/2 and T-3 count index bits only; here
   the fraction is whatever the honest budget leaves after codebooks and reserved outliers;
3. reservation: the top 10% of columns by OO keep ``reserve_top`` of each tail in fp16, the
   others ``reserve_rest``;
4. GPTQ (act-order, blocks of 128): each column gets an unweighted k-means codebook of its
   error-compensated values (reserved weights excluded and kept exactly). Departure: the
   codebooks of a block's 128 columns are fitted together, batched, when GPTQ reaches the
   block (as GPTQ fits a group's grid at the group's start); each column is then assigned on
   its values as updated within the block, its centroids moved to the means of what they
   received, and assigned again. Fitting one column at a time cost ~50 ms a column (hours
   on a 135M model); this costs one batched k-means per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anybit.methods.base import check_budget
from anybit.methods.cmpq import column_widths
from anybit.quant import outliers as sparse
from anybit.quant.gptq import act_order_permutation, gptq_quantize
from anybit.quant.kmeans import assign_nearest, codebooks_at_widths
from anybit.quant.scaling import centroids_given_codes
from anybit.quant.qweight import Outliers, QuantizedWeight, WIDTH_BITS, index_bits


def outlier_order(w: torch.Tensor, factor: float = 13.0) -> torch.Tensor:
    return (w.abs() >= factor * w.abs().mean()).sum(0)


def reservation(w: torch.Tensor, order: torch.Tensor, top: float, rest: float, top_cols: float = 0.1) -> torch.Tensor:
    """Boolean (rows, cols): each column's tails to keep in fp, ``top`` per tail for the top columns."""
    rows, cols = w.shape
    per_tail = torch.full((cols,), rest)
    per_tail[torch.argsort(order, descending=True)[: int(round(top_cols * cols))]] = top
    n_tail = (per_tail * rows).round().long().to(w.device)
    rank_hi = torch.argsort(torch.argsort(w, 0, descending=True), 0)
    rank_lo = torch.argsort(torch.argsort(w, 0), 0)
    return (rank_hi < n_tail[None, :]) | (rank_lo < n_tail[None, :])


class ColumnKMeansQuantizer:
    """GPTQ column quantizer: k-means codebooks per column, reserved entries kept exactly."""

    def __init__(self, rows: int, bits: torch.Tensor, reserved: torch.Tensor, block: int = 128):
        self.group_size = block
        self.bits, self.reserved = bits, reserved  # in processing order
        device = reserved.device
        self.lut = torch.zeros(bits.numel(), 2 ** int(bits.max()), dtype=torch.float16, device=device)
        self.codes = torch.zeros(rows, bits.numel(), dtype=torch.uint8, device=device)
        self.kept = torch.zeros(rows, bits.numel(), dtype=torch.float16, device=device)

    def start_group(self, cols: torch.Tensor, first: int) -> None:
        span = slice(first, first + cols.shape[1])
        live = (~self.reserved[:, span]).float().t().contiguous()
        lut, _ = codebooks_at_widths(cols.t().contiguous(), live, self.bits[span].to(cols.device))
        self.lut[span, : lut.shape[1]] = lut

    def quantize_column(self, w: torch.Tensor, col: int) -> torch.Tensor:
        k = 2 ** int(self.bits[col])
        live = ~self.reserved[:, col]
        lut = self.lut[col, :k].float()[None, :]
        codes = assign_nearest(w[None, :], lut)
        # One Lloyd step on the updated values: centroids to the means of their members.
        moved = centroids_given_codes(w[None, :], live.float()[None, :], codes, k)
        has = torch.zeros(1, k, device=w.device).scatter_add_(1, codes, live.float()[None, :]) > 0
        lut = torch.where(has, moved, lut).to(torch.float16).float().sort(1).values
        codes = assign_nearest(w[None, :], lut)
        self.lut[col, :k] = lut[0].half()
        self.codes[:, col] = codes[0].to(torch.uint8)
        kept = w.half()
        self.kept[:, col] = kept
        return torch.where(live, lut[0][codes[0]], kept.float())


@dataclass
class CLAQ:
    budget: float
    reserve_top: float = 0.014
    reserve_rest: float = 0.004
    percdamp: float = 0.01
    name = "claq"

    @classmethod
    def from_options(cls, bits, group_size=0, reserve_top=0.014, reserve_rest=0.004, **_):
        return cls(check_budget(cls.name, bits, 1.2), float(reserve_top), float(reserve_rest))

    def quantize(self, weight, stats, name=None) -> QuantizedWeight:
        rows, cols = weight.shape
        w = weight.float()
        h = stats.hessian.to(w.device)
        order = outlier_order(w)
        reserved = reservation(w, order, self.reserve_top, self.reserve_rest)
        n_res = int(reserved.sum())
        fixed = WIDTH_BITS * cols + index_bits(cols) * cols + sparse.outlier_bits(n_res, rows, cols)
        # Ties in OO (most columns have none) are broken by column magnitude.
        score = order.double() + w.abs().sum(0).double() / (w.abs().sum(0).max().double() + 1)
        bits = column_widths(score.cpu(), rows, self.budget * w.numel() - fixed).to(w.device)
        perm = act_order_permutation(h)
        grid = ColumnKMeansQuantizer(rows, bits[perm], reserved[:, perm])
        gptq_quantize(w, h, grid, percdamp=self.percdamp, perm=perm)
        # Reserved weights are stored as sparse outliers, at their original positions.
        positions = reserved.reshape(-1).nonzero().squeeze(1)
        values = grid.kept[:, torch.argsort(perm)].reshape(-1)[positions]
        return QuantizedWeight(rows, cols, grid.codes, bits[perm].to(torch.int32), lut=grid.lut, lut_axis=1,
                               perm=perm.to(torch.int32), outliers=Outliers(positions, values))
