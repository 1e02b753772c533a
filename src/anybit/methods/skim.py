"""SKIM: greedy per-row bit allocation over weighted k-means codebooks + a trainable scaling vector.

Recipe (shared/methods.md, docs/methods.md):
1. sensitivity s = diag(H) per input column (the calibration-only stand-in for SKIM's Fisher);
2. per row and candidate width, s-weighted k-means and its L-full error (``row_codebook_table``);
3. greedy (or exact Lagrangian) allocation of widths to rows under the honest budget, per layer
   or shared across the whole model (``scope``);
4. the allocated widths select their codebooks from the table;
5. a per-column scaling vector trained with assignments fixed, then one re-clustering in the
   scaled space; kept only where it lowers L-full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from anybit.methods.base import check_budget, check_scope, choose
from anybit.quant.kmeans import kmeans_codebooks
from anybit.quant.lfull import row_output_error
from anybit.quant.qweight import FP16_BITS, WIDTH_BITS, QuantizedWeight
from anybit.quant.rowlut import row_codebook_table
from anybit.quant.scaling import train_scaling_vector


def default_widths(budget: float) -> tuple[int, ...]:
    """Candidates floor-1 .. floor+1 around the budget (3.25 -> 2, 3, 4; 2.25 -> 1, 2, 3): each
    extra width costs a k-means pass over every row, and rows rarely go further from the mean."""
    base = math.floor(budget)
    return tuple(range(max(1, base - 1), min(8, base + 1) + 1))


def cluster_at_widths(w: torch.Tensor, s: torch.Tensor, bits: torch.Tensor):
    """Per-row codebooks at each row's own width: (lut (R, 2^max) fp16, codes (R, n) uint8)."""
    lut = torch.zeros(w.shape[0], 2 ** int(bits.max()), dtype=torch.float16, device=w.device)
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    for b in bits.unique().tolist():
        sel = bits == b
        lut[sel, : 2**b], codes[sel] = kmeans_codebooks(w[sel], s[sel], b)
    return lut, codes


def lut_reconstruction(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.gather(lut.float(), 1, codes.long())


@dataclass
class SKIM:
    budget: float
    scope: str = "layer"
    allocator: str = "greedy"
    widths: tuple[int, ...] = ()
    scaling: bool = True
    scaling_steps: int = 60
    name = "skim"
    _choices: dict = field(default_factory=dict, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_options(cls, bits, group_size=0, scope="layer", allocator="greedy", scaling=True,
                     scaling_steps=60, **_):
        budget = check_budget(cls.name, bits, 1.1)
        choose(allocator)
        return cls(budget, check_scope(scope), allocator, default_widths(budget), bool(scaling), int(scaling_steps))

    @property
    def needs_plan(self) -> bool:
        return self.scope == "model"

    def _fixed_bits(self, rows: int, cols: int) -> int:
        """Bits stored whatever the allocation: per-row widths and the scaling vector."""
        return WIDTH_BITS * rows + (FP16_BITS * cols if self.scaling else 0)

    def _table(self, weight, stats):
        w = weight.float()
        s = stats.act_sq.to(w.device)[None, :].expand_as(w).contiguous()
        return w, s, row_codebook_table(w, s, stats.hessian.to(w.device), self.widths)

    # -- model scope: plan every layer, allocate once ----------------------------------------
    def plan(self, weight, stats, name):
        _w, _s, table = self._table(weight, stats)
        self._plans[name] = (table.err, table.cost, self._fixed_bits(*weight.shape), weight.numel())

    def finish_plan(self):
        names = list(self._plans)
        err = torch.cat([self._plans[n][0] for n in names])
        cost = torch.cat([self._plans[n][1] for n in names])
        numel = sum(self._plans[n][3] for n in names)
        budget = self.budget * numel - sum(self._plans[n][2] for n in names)
        choice = choose(self.allocator)(err, cost, budget)
        start = 0
        for n in names:
            rows = self._plans[n][0].shape[0]
            self._choices[n] = choice[start : start + rows]
            start += rows
        self._plans.clear()

    # -- quantizing pass ------------------------------------------------------------------------
    def quantize(self, weight, stats, name=None) -> QuantizedWeight:
        rows, cols = weight.shape
        w = weight.float()
        s = stats.act_sq.to(w.device)[None, :].expand_as(w).contiguous()
        h = stats.hessian.to(w.device)
        widths = torch.tensor(self.widths)
        if self.scope == "model":
            bits = widths[self._choices[name]].to(w.device)
            lut, codes = cluster_at_widths(w, s, bits)
        else:
            _w, _s, table = self._table(weight, stats)
            budget = self.budget * rows * cols - self._fixed_bits(rows, cols)
            lut, codes, bits = table.assemble(choose(self.allocator)(table.err, table.cost, budget))
        q = QuantizedWeight(rows, cols, codes, bits.to(torch.int32).cpu(), lut=lut)
        q.meta["lfull"] = float(row_output_error(w, lut_reconstruction(lut, codes), h).sum())
        if self.scaling:
            q = self._apply_scaling(q, w, s, h)
        return q

    def _apply_scaling(self, q: QuantizedWeight, w, s, h) -> QuantizedWeight:
        a, _before, _after = train_scaling_vector(w, s, h, q.codes, q.lut.shape[1], self.scaling_steps)
        a16 = a.half().float()
        # One alternation: re-cluster W diag(a) with sensitivities s / a^2 at the same widths.
        lut, codes = cluster_at_widths(w * a16, s / a16**2, q.bits.to(w.device))
        lfull = float(row_output_error(w, lut_reconstruction(lut, codes) / a16, h).sum())
        if lfull >= q.meta["lfull"]:
            q.meta["scaling"] = "rejected"
            return q
        scaled = QuantizedWeight(q.out_features, q.in_features, codes, q.bits, lut=lut, input_scale=a16.half())
        scaled.meta.update(lfull=lfull, lfull_unscaled=q.meta["lfull"], scaling="kept")
        return scaled
