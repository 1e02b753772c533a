"""GPTQ error feedback with a pluggable per-column quantizer.

Columns are quantized one at a time; each column's error is pushed onto the columns not yet
quantized through the upper Cholesky factor of H^-1 (Frantar et al., 2023). What grid a
column lands on is the quantizer's business: RTN's affine grid, per-group widths (SliM-LLM) or
a per-column k-means codebook (CLAQ) all plug in through ``ColumnQuantizer``. Where a group's
grid is one per row, fixed for all its columns (``row_grid``: affine grids, per-row codebooks),
a GPU quantizes each block of columns in one kernel launch (``anybit.kernels.gptq_columns``)
instead of a few small launches a column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from anybit.kernels import use_triton
from anybit.timing import timed


@dataclass(frozen=True)
class RowGrid:
    """What every column of a group lands on, one grid per row: ``values`` (rows x K), each row's
    points ascending (+inf past its own count, never nearest), with the ``midpoints`` between them
    (rows x K - 1) that decide which is nearest; or, without values, the affine grid
    code = clamp(round(w / scale) + zero, 0, maxq), value = scale * (code - zero) (``scale``,
    ``zero``: rows)."""

    values: torch.Tensor | None = None
    midpoints: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    maxq: int = 0


class ColumnQuantizer(Protocol):
    group_size: int  # 0: one group spanning all columns

    def start_group(self, cols: torch.Tensor, first: int) -> None:
        """Called when GPTQ reaches column ``first`` (a group start), with the current,
        error-compensated values of the group's columns (rows x group)."""

    def quantize_column(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Return the de-quantized value of column ``col`` (in GPTQ's processing order)."""

    # Optional, for the fused path of ``gptq_quantize``: quantizers whose group's grid is one per row,
    # the same for all the group's columns (CLAQ's per-column codebooks are not).
    def row_grid(self) -> RowGrid:
        """The current group's grid (after ``start_group``), for a kernel that quantizes a block of
        its columns at once."""

    def record_codes(self, first: int, codes: torch.Tensor) -> None:
        """Keep the codes (rows x n) that the kernel found on ``row_grid`` for columns ``first`` on."""


def inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H)."""
    h = h.clone()
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    l = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)


def act_order_permutation(h: torch.Tensor) -> torch.Tensor:
    """Columns by descending diag(H): the most-excited inputs are quantized first."""
    return torch.argsort(torch.diag(h), descending=True)


@timed("gptq")
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    quantizer: ColumnQuantizer,
    blocksize: int = 128,
    percdamp: float = 0.01,
    perm: torch.Tensor | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Quantize ``w`` (rows x cols) column by column against Hessian ``h`` (cols x cols).

    ``perm`` (e.g. ``act_order_permutation(h)``) sets the processing order; the quantizer sees
    columns in that order. Returns the de-quantized matrix in the original column order.
    ``fused``: each block of columns in one kernel launch (``anybit.kernels.gptq_columns``); by
    default where the Triton kernels run on ``w``'s device and the quantizer has a ``row_grid``
    whose groups can start blocks (a group a multiple of ``blocksize``, or a divisor of it: then
    blocks of one group -- the block size changes when the later columns are updated, not what
    they become). The result is the column loop's up to rounding (see the kernel module).
    """
    w = w.detach().clone().float()
    h = h.detach().clone().float()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = inverse_hessian_factor(h, percdamp)
    group = quantizer.group_size or cols
    aligned = group % blocksize == 0 or group >= cols or blocksize % group == 0
    if fused is None:
        fused = aligned and use_triton(w) and hasattr(quantizer, "row_grid")
    if fused:
        if not aligned:
            raise ValueError(f"fused GPTQ: groups of {group} columns neither fill nor divide blocks of {blocksize}")
        blocksize = min(blocksize, group)
        from anybit.kernels import gptq_columns  # Triton: imported only where it runs
    q = torch.zeros_like(w)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(hinv1)
        # Column i's error (w - q) / d_i moves the later columns by err_i * hinv1[i, i:]: with the
        # rows of hinv1 divided by d once per block, each column costs a subtraction and one
        # rank-1 update.
        step1 = hinv1 / d[:, None]
        if fused:
            if i1 % group == 0:
                quantizer.start_group(w[:, i1 : i1 + group], i1)
            grid = quantizer.row_grid()
            codes, diff1 = gptq_columns.quantize_block(w[:, i1:i2], step1, q[:, i1:i2], values=grid.values,
                                                       midpoints=grid.midpoints, scale=grid.scale, zero=grid.zero,
                                                       maxq=grid.maxq)
            quantizer.record_codes(i1, codes)
        else:
            diff1 = _quantize_columns(w, i1, i2, step1, q, quantizer, group)
        w[:, i2:] -= (diff1 / d[:, None]).t() @ hinv[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q


def _quantize_columns(w, i1: int, i2: int, step1, q, quantizer: ColumnQuantizer, group: int):
    """Columns i1..i2 of ``w`` one at a time, from Python (the loop ``gptq_columns`` runs in one
    launch): writes ``q``'s columns and returns each column's error w - q as a row ((i2 - i1) x rows)."""
    w1 = w[:, i1:i2].clone()
    diff1 = torch.empty(i2 - i1, w.shape[0], device=w.device)
    for i in range(i2 - i1):
        col = i1 + i
        if col % group == 0:
            current = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :group]
            quantizer.start_group(current, col)
        wc = w1[:, i]
        qc = quantizer.quantize_column(wc, col)
        q[:, col] = qc
        torch.sub(wc, qc, out=diff1[i])
        w1[:, i:].addr_(diff1[i], step1[i, i:], alpha=-1)
    return diff1


class CodebookColumnQuantizer:
    """GPTQ column quantizer on fixed per-row codebooks: each entry goes to its row's nearest
    centroid. ``lut`` (rows, K) holds each row's sorted centroids; rows with fewer than K
    centroids are padded with +inf, which no value is ever nearest to."""

    group_size = 0

    def __init__(self, lut: torch.Tensor, cols: int):
        self.lut = lut.float()
        self.mid = ((self.lut[:, 1:] + self.lut[:, :-1]) * 0.5).contiguous()  # decision boundaries, once
        self.codes = torch.zeros(lut.shape[0], cols, dtype=torch.uint8, device=lut.device)

    def start_group(self, cols: torch.Tensor, first: int) -> None:
        pass

    def quantize_column(self, w: torch.Tensor, col: int) -> torch.Tensor:
        code = torch.searchsorted(self.mid, w[:, None].contiguous())
        self.codes[:, col] = code[:, 0].to(torch.uint8)
        return torch.gather(self.lut, 1, code)[:, 0]

    def row_grid(self) -> RowGrid:
        return RowGrid(values=self.lut, midpoints=self.mid)

    def record_codes(self, first: int, codes: torch.Tensor) -> None:
        self.codes[:, first : first + codes.shape[1]] = codes
