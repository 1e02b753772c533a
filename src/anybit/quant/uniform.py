"""Asymmetric uniform (min-max) quantization: the RTN quantizer and GPTQ's grid."""

from __future__ import annotations

import torch

from anybit.quant.gptq import RowGrid


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to what fp16 storage keeps, so stored and in-memory models agree exactly."""
    return scale.to(torch.float16).to(scale.dtype)


def minmax_params(w: torch.Tensor, bits: int, include_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero point covering each row of ``w`` (shape rows x n).

    ``include_zero`` widens the range to contain 0, as GPTQ's reference quantizer does.
    Returns ``scale`` and ``zero`` of shape (rows,), both float; ``zero`` holds integers.
    """
    maxq = 2**bits - 1
    xmin = w.amin(dim=1)
    xmax = w.amax(dim=1)
    if include_zero:
        xmin = xmin.clamp(max=0)
        xmax = xmax.clamp(min=0)
    flat = xmin == xmax
    xmin = torch.where(flat, xmin - 1, xmin)
    xmax = torch.where(flat, xmax + 1, xmax)
    scale = round_scale((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_affine(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) for ``w`` given per-row ``scale``/``zero`` (broadcast on dim 1)."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)


def dequantize_affine(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale[:, None] * (codes - zero[:, None])


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = 0, include_zero: bool = True):
    """Round-to-nearest with per-row (``group_size`` 0) or per-row-per-group min-max grids.

    Returns ``(codes, scales, zeros)``: codes like ``w``; scales/zeros of shape (rows, groups).
    """
    rows, cols = w.shape
    g = group_size or cols
    codes = torch.empty_like(w)
    scales, zeros = [], []
    for start in range(0, cols, g):
        block = w[:, start : start + g]
        scale, zero = minmax_params(block, bits, include_zero)
        codes[:, start : start + g] = quantize_affine(block, scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


class AffineColumnQuantizer:
    """GPTQ column quantizer on min-max affine grids, one per row and group.

    ``group_bits`` gives each column group its width (uniform for GPTQ, mixed for SliM-LLM);
    ``params_fn(cols, bits, first) -> (scale, zero)`` picks a group's grid (plain min-max by
    default, SliM-LLM's salience-weighted search otherwise). Codes, scales and zeros are recorded in
    processing order so the result can be stored as-is.
    """

    def __init__(self, rows: int, cols: int, group_bits: torch.Tensor, group_size: int, params_fn=None,
                 device=None):
        self.group_size = group_size
        self.group_bits = group_bits
        self.params_fn = params_fn or (lambda cols, bits, first: minmax_params(cols, bits))
        n_groups = group_bits.numel()
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(rows, n_groups, device=device)
        self.zeros = torch.zeros(rows, n_groups, device=device)
        self._scale = self._zero = None
        self._bits = 0

    def start_group(self, cols: torch.Tensor, first: int) -> None:
        g = first // (self.group_size or cols.shape[1])
        self._bits = int(self.group_bits[g])
        self._scale, self._zero = self.params_fn(cols, self._bits, first)
        self.scales[:, g] = self._scale
        self.zeros[:, g] = self._zero

    def quantize_column(self, w: torch.Tensor, col: int) -> torch.Tensor:
        code = quantize_affine(w[:, None], self._scale, self._zero, self._bits)
        self.codes[:, col] = code[:, 0].to(torch.uint8)
        return dequantize_affine(code, self._scale, self._zero)[:, 0]

    def row_grid(self) -> RowGrid:
        return RowGrid(scale=self._scale, zero=self._zero, maxq=2**self._bits - 1)

    def record_codes(self, first: int, codes: torch.Tensor) -> None:
        self.codes[:, first : first + codes.shape[1]] = codes
