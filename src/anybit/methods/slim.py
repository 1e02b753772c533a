"""SliM-LLM: salience-driven group-wise bit allocation, GPTQ per group, salience-weighted calibration.

Groups are ``group_size`` consecutive columns spanning all rows (affine grids per row and group).
1. salience d_ij = w_ij^2 / [H^-1]_jj^2, summed per group;
2. SBA: groups sorted by salience; for p = 0..G/2 the top p take N+1 bits and the bottom p N-1
   (average N); each split is fake-quantized (per-row min-max RTN per group) and scored by
   KL(softmax(X W_hat^T) || softmax(X W^T)) on calibration inputs; the lowest KL wins.
   Budgets between integers (anybit extension): a fraction of the groups, the most salient,
   start at N+1 so the honest budget is met, and the +/-1 pairs are searched around that;
3. GPTQ error feedback group by group at each group's width;
4. SQC: per row and group, the grid's range is shrunk by tau in [0.9, 1.1] (101 candidates) to
   minimise error; ``sqc="code"`` sums the errors of salient and other weights equally, as the
   official code does; ``sqc="paper"`` averages each set separately so the few salient weights
   count as much as the many others; ``sqc="off"`` skips the search. Salient means z-score of
   salience above ``salient_z``: 2 in the official code (default), 3 (3 sigma) in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anybit.errors import AnybitError
from anybit.methods.base import check_budget
from anybit.quant.gptq import gptq_quantize, inverse_hessian_factor
from anybit.quant.qweight import QuantizedWeight
from anybit.quant.uniform import AffineColumnQuantizer, dequantize_affine, minmax_params, quantize_affine, round_scale

TAUS = torch.linspace(0.9, 1.1, 101)


def group_salience(w: torch.Tensor, h: torch.Tensor, group: int, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-weight salience (rows, cols) and its sum per column group (G,)."""
    u = inverse_hessian_factor(h, percdamp)
    hinv_diag = (u * u).sum(0)  # diag(H^-1) = diag(U^T U)
    sal = w.float() ** 2 / hinv_diag[None, :] ** 2
    cols = w.shape[1]
    sums = torch.stack([sal[:, g : g + group].sum() for g in range(0, cols, group)])
    return sal, sums


def fake_quantize_groups(w: torch.Tensor, group: int, bits: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(w)
    for g, start in enumerate(range(0, w.shape[1], group)):
        block = w[:, start : start + group]
        b = int(bits[g])
        scale, zero = minmax_params(block, b)
        out[:, start : start + group] = dequantize_affine(quantize_affine(block, scale, zero, b), scale, zero)
    return out


def output_kl(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """KL(softmax(x w_hat^T) || softmax(x w^T)), averaged over tokens (the paper's direction)."""
    log_q = F.log_softmax(x @ w_hat.t(), -1)
    log_p = F.log_softmax(x @ w.t(), -1)
    return float((log_q.exp() * (log_q - log_p)).sum(-1).mean())


def salience_bits(sums: torch.Tensor, base: torch.Tensor, x, w, group) -> torch.Tensor:
    """SBA: the +/-1 pairing of salient/unsalient groups with the lowest output KL."""
    order = torch.argsort(sums.cpu(), descending=True)
    best, best_kl = base, None
    for p in range(0, sums.numel() // 2 + 1):
        bits = base.clone()
        bits[order[:p]] += 1
        bits[order[sums.numel() - p :]] -= 1
        if bool((bits < 1).any()) or bool((bits > 8).any()):
            continue
        kl = output_kl(x, w, fake_quantize_groups(w, group, bits))
        if best_kl is None or kl < best_kl:
            best, best_kl = bits, kl
    return best


class SalienceWeightedGrid:
    """``params_fn`` for AffineColumnQuantizer: min-max grid with the range shrink tau searched."""

    def __init__(self, salience: torch.Tensor, group: int, mode: str, salient_z: float = 2.0):
        self.salience, self.group, self.mode, self.salient_z = salience, group, mode, salient_z

    def __call__(self, cols: torch.Tensor, bits: int, first: int):
        if self.mode == "off":
            return minmax_params(cols, bits)
        sal = self.salience[:, first : first + cols.shape[1]]
        z = (sal - sal.mean()) / sal.std().clamp_min(1e-20)
        salient = (z > self.salient_z).float()
        xmin = cols.amin(1).clamp(max=0)
        xmax = cols.amax(1).clamp(min=0)
        maxq = 2**bits - 1
        best_err = best_scale = best_zero = None
        for tau in TAUS.tolist():
            scale = round_scale(((xmax - xmin) * tau / maxq).clamp_min(1e-10))
            zero = torch.round(-xmin * tau / scale).clamp(0, maxq)
            err = (dequantize_affine(quantize_affine(cols, scale, zero, bits), scale, zero) - cols) ** 2
            e_sal, e_rest = (err * salient).sum(1), (err * (1 - salient)).sum(1)
            if self.mode == "paper":
                n_sal = salient.sum(1).clamp_min(1)
                e = e_sal / n_sal + e_rest / (cols.shape[1] - salient.sum(1)).clamp_min(1)
            else:
                e = e_sal + e_rest
            if best_err is None:
                best_err, best_scale, best_zero = e, scale, zero
            else:
                better = e < best_err
                best_err = torch.where(better, e, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
        return best_scale, best_zero


@dataclass
class SliM:
    budget: float
    group_size: int = 128
    sqc: str = "code"
    salient_z: float = 2.0
    percdamp: float = 0.01
    name = "slim"
    keep_inputs = 2048  # calibration tokens kept per linear for the KL score
    # Group widths move a layer's bits in steps of a whole group, so what one layer leaves
    # unspent is carried to the next: the model as a whole meets the budget.
    _numel_done: int = 0
    _bits_done: int = 0

    @classmethod
    def from_options(cls, bits, group_size=0, sqc="code", salient_z=2.0, **_):
        if sqc not in ("code", "paper", "off"):
            raise AnybitError(f"sqc must be 'code', 'paper' or 'off', got {sqc!r}")
        return cls(check_budget(cls.name, bits, 1.5), group_size or 128, sqc, float(salient_z))

    def quantize(self, weight, stats, name=None) -> QuantizedWeight:
        rows, cols = weight.shape
        w = weight.float()
        h = stats.hessian.to(w.device)
        g = self.group_size
        n_groups = math.ceil(cols / g)
        sal, sums = group_salience(w, h, g, self.percdamp)
        # Honest budget per group: codes + fp16 scale/zero per row. Mixed widths add a byte per
        # group on top (< 0.001 bits/weight on real shapes), so 3.25 bits with groups of 128
        # still buys 3-bit codes on average.
        target = self.budget * (self._numel_done + w.numel()) - self._bits_done
        code_budget = target - n_groups * 32 * rows
        sizes = torch.tensor([min(g, cols - s) for s in range(0, cols, g)], dtype=torch.float64) * rows
        n_base = min(8, math.floor(code_budget / float(sizes.sum())))
        if n_base < 1:
            raise AnybitError(f"budget {self.budget} bits is too low for slim with groups of {g}")
        base = torch.full((n_groups,), n_base, dtype=torch.long)
        # Fractional budgets: the most salient groups start one bit higher, as many as fit.
        spare = code_budget - float((sizes * n_base).sum())
        for gi in torch.argsort(sums.cpu(), descending=True).tolist():
            if spare >= float(sizes[gi]) and n_base < 8:
                base[gi] += 1
                spare -= float(sizes[gi])
        x = stats.inputs.to(w.device) if stats.inputs is not None else None
        bits = salience_bits(sums, base, x, w, g) if x is not None else base
        grid = AffineColumnQuantizer(rows, cols, bits, g, SalienceWeightedGrid(sal, g, self.sqc, self.salient_z), device=w.device)
        gptq_quantize(w, h, grid, percdamp=self.percdamp)
        q = QuantizedWeight(rows, cols, grid.codes, bits.to(torch.int32), scales=grid.scales.half(),
                            zeros=grid.zeros.half(), group_size=g)
        self._numel_done += w.numel()
        self._bits_done += q.total_bits()
        return q
