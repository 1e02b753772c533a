"""SKIM: greedy per-row bit allocation over weighted k-means codebooks + a trainable scaling vector.

Recipe (shared/methods.md, docs/methods.md):
1. sensitivity s = diag(H) per input column (the calibration-only stand-in for SKIM's Fisher);
2. per row and candidate width, s-weighted k-means and its L-full error (``row_codebook_table``);
3. greedy (or exact Lagrangian) allocation of widths to rows under the honest budget, per layer
   or shared across the whole model (``scope``);
4. the allocated widths select their codebooks from the table;
5. a per-column scaling vector trained with assignments fixed, then one re-clustering in the
   scaled space; kept only where it lowers L-full;
6. (anybit extension, ``feedback``) GPTQ error feedback over the final codebooks: columns are
   assigned to each row's nearest centroid in turn and each column's error is pushed onto the
   columns not yet assigned, through the Cholesky factor of H^-1 (in the scaled space when a
   scaling vector is kept). Kept only where it lowers L-full.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from anybit.methods.base import check_budget, check_scope, choose
from anybit.quant.allocate import lagrangian_bound
from anybit.quant.gptq import CodebookColumnQuantizer, gptq_quantize
from anybit.quant.kmeans import codebooks_at_widths, decode
from anybit.quant.lfull import row_output_error
from anybit.quant.qweight import FP16_BITS, WIDTH_BITS, QuantizedWeight
from anybit.quant.rowlut import row_codebook_table
from anybit.quant.scaling import train_scaling_vector
from anybit.timing import stage


def candidate_widths(budget: float, cols: int) -> tuple[int, int, int]:
    """Three widths around what a row of ``cols`` codes affords at ``budget`` bits per weight,
    codebook included (3.25 bits on 576 columns -> 2, 3, 4; 4.0 bits -> 3, 4, 5 only on long
    rows). Each extra width costs a k-means pass over every row, and rows rarely go further."""
    fits = [b for b in range(1, 9) if cols * b + FP16_BITS * 2**b <= budget * cols]
    base = min(max(fits, default=1), 7)
    low = max(1, base - 1)
    return (low, low + 1, low + 2)


@dataclass
class SKIM:
    budget: float
    scope: str = "layer"
    allocator: str = "greedy"
    scaling: bool = False  # measured: it did not pay on the ladder (BENCHMARKS.md); `scaling=true` turns it on
    scaling_steps: int = 60
    feedback: bool = True
    name = "skim"
    _choices: dict = field(default_factory=dict, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_options(cls, bits, group_size=0, scope="layer", allocator="greedy", scaling=False,
                     scaling_steps=60, feedback=True, **_):
        budget = check_budget(cls.name, bits, 1.1)
        choose(allocator)
        return cls(budget, check_scope(scope), allocator, bool(scaling), int(scaling_steps), bool(feedback))

    @property
    def needs_plan(self) -> bool:
        return self.scope == "model"

    def _fixed_bits(self, rows: int, cols: int, scaling: bool | None = None) -> int:
        """Bits stored whatever the allocation: per-row widths and the scaling vector."""
        scaling = self.scaling if scaling is None else scaling
        return WIDTH_BITS * rows + (FP16_BITS * cols if scaling else 0)

    def _table(self, weight, stats):
        w = weight.float()
        s = stats.act_sq.to(w.device)[None, :].expand_as(w).contiguous()
        widths = candidate_widths(self.budget, w.shape[1])
        return row_codebook_table(w, s, stats.hessian.to(w.device), widths)

    # -- model scope: plan every layer, allocate once ----------------------------------------
    def plan(self, weight, stats, name):
        table = self._table(weight, stats)  # only the small error/cost tables are kept
        self._plans[name] = (table.err, table.cost, table.widths, self._fixed_bits(*weight.shape), weight.numel())

    def finish_plan(self):
        plans = list(self._plans.values())
        err = torch.cat([p[0] for p in plans])
        cost = torch.cat([p[1] for p in plans])
        budget = self.budget * sum(p[4] for p in plans) - sum(p[3] for p in plans)
        choice = choose(self.allocator)(err, cost, budget)
        start = 0
        for name, (layer_err, _cost, widths, _fixed, _numel) in self._plans.items():
            rows = layer_err.shape[0]
            self._choices[name] = torch.tensor(widths)[choice[start : start + rows]]  # widths per row
            start += rows
        self._plans.clear()

    # -- quantizing pass ------------------------------------------------------------------------
    def _allocate(self, table, rows: int, cols: int, scaling: bool, meta: dict):
        budget = self.budget * rows * cols - self._fixed_bits(rows, cols, scaling)
        choice = choose(self.allocator)(table.err, table.cost, budget)
        # How far the allocation is from optimal: its table error over the Lagrangian lower bound.
        with stage("allocation"):
            bound = lagrangian_bound(table.err, table.cost, budget)
        meta["alloc_gap"] = float(table.err.gather(1, choice[:, None].cpu()).sum()) / max(bound, 1e-30) - 1
        return table.assemble(choice)

    def quantize(self, weight, stats, name=None) -> QuantizedWeight:
        rows, cols = weight.shape
        w = weight.float()
        s = stats.act_sq.to(w.device)[None, :].expand_as(w).contiguous()
        h = stats.hessian.to(w.device)
        meta = {}
        if self.scope == "model":
            bits = self._choices[name].to(w.device)
            lut, codes = codebooks_at_widths(w, s, bits)
        else:
            table = self._table(weight, stats)
            lut, codes, bits = self._allocate(table, rows, cols, self.scaling, meta)
        q = self._row_codebook_weight(w, h, lut, codes, bits, meta)
        if self.scaling:
            q = self._apply_scaling(q, w, s, h)
            if q.input_scale is None and self.scope == "layer":
                # Scaling did not pay here: spend the bits reserved for it on the rows instead.
                q = self._row_codebook_weight(w, h, *self._allocate(table, rows, cols, False, meta), meta)
                q.meta["scaling"] = "rejected"
        if self.feedback:
            q = self._apply_feedback(q, w, h)
        return q

    @staticmethod
    def _row_codebook_weight(w, h, lut, codes, bits, meta: dict) -> QuantizedWeight:
        """The weight of per-row codebooks, with its L-full noted for the later steps' checks."""
        q = QuantizedWeight(w.shape[0], w.shape[1], codes, bits.to(torch.int32).cpu(), lut=lut, meta=meta)
        q.meta["lfull"] = float(row_output_error(w, decode(lut, codes), h).sum())
        return q

    def _apply_feedback(self, q: QuantizedWeight, w, h) -> QuantizedWeight:
        a = q.input_scale.float().to(w.device) if q.input_scale is not None else torch.ones(w.shape[1], device=w.device)
        # In the scaled space y = (W diag(a)) (x / a): weights W a, Hessian H / (a a^T).
        lut = q.lut.float().to(w.device)
        pad = torch.arange(lut.shape[1], device=w.device)[None, :] >= (2 ** q.bits.to(w.device).long())[:, None]
        grid = CodebookColumnQuantizer(lut.masked_fill(pad, torch.inf), w.shape[1])
        gptq_quantize(w * a, h / (a[:, None] * a[None, :]), grid)
        lfull = float(row_output_error(w, decode(q.lut, grid.codes) / a, h).sum())
        if lfull >= q.meta["lfull"]:
            q.meta["feedback"] = "rejected"
            return q
        q.meta.update(lfull=lfull, lfull_before_feedback=q.meta["lfull"], feedback="kept")
        return replace(q, codes=grid.codes)

    def _apply_scaling(self, q: QuantizedWeight, w, s, h) -> QuantizedWeight:
        a, _before, _after = train_scaling_vector(w, s, h, q.codes, q.lut.shape[1], self.scaling_steps)
        a16 = a.half().float()
        # One alternation: re-cluster W diag(a) with sensitivities s / a^2 at the same widths.
        lut, codes = codebooks_at_widths(w * a16, s / a16**2, q.bits.to(w.device))
        lfull = float(row_output_error(w, decode(lut, codes) / a16, h).sum())
        if lfull >= q.meta["lfull"]:
            q.meta["scaling"] = "rejected"
            return q
        scaled = QuantizedWeight(q.out_features, q.in_features, codes, q.bits, lut=lut, input_scale=a16.half(),
                                 meta=dict(q.meta))
        scaled.meta.update(lfull=lfull, lfull_unscaled=q.meta["lfull"], scaling="kept")
        return scaled
