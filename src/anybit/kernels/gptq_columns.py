"""GPTQ's column loop over one block of columns in one launch (the fused path of ``anybit.quant.gptq``).

GPTQ quantizes a block's columns one after the other: each column lands on its row's grid, and its
error moves the block's later columns (a rank-1 update through the block of H^-1's Cholesky factor).
Run from Python that is a handful of small launches a column, ~35,600 columns a LLaMA-2-7B block:
launch-bound (~130 us a column on the H100 machine, benchmarks/quantize_speed.py). Rows are independent
in GPTQ -- a row's update reads only that row's errors -- so here each program holds ``BLOCK_ROWS`` rows
of the block in registers and walks its columns alone: one launch a block.

The arithmetic is the column loop's: the nearest point of a sorted per-row grid is counted against the
midpoints, as ``torch.searchsorted`` finds it; an affine grid divides exactly (``div_rn``) and rounds
half to even, as ``torch.round``. Only the rank-1 update may round differently (a fused multiply-add),
so a code can differ where a value sits within an ulp of a decision boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 16  # rows a program: 256 programs for 4096 rows, two a multiprocessor on an H100


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    frac = x - f  # exact for |x| < 2**23
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, f + odd))


@triton.jit
def _gptq_block_kernel(w_ptr, w_stride, step_ptr, step_stride, values_ptr, values_stride, mids_ptr, mids_stride, npoints,
                       scale_ptr, zero_ptr, maxq, q_ptr, q_stride, code_ptr, code_stride, err_ptr, err_stride,
                       rows, width, AFFINE: tl.constexpr, POINTS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK_COLS: tl.constexpr):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.arange(0, BLOCK_COLS)
    live = r < rows
    w = tl.load(w_ptr + r[:, None] * w_stride + c[None, :], mask=live[:, None] & (c[None, :] < width), other=0.0)
    if AFFINE:
        scale = tl.load(scale_ptr + r, mask=live, other=1.0)
        zero = tl.load(zero_ptr + r, mask=live, other=0.0)
    else:  # the row's points and midpoints stay in registers: the loop's chain touches no memory
        k = tl.arange(0, POINTS)
        on_grid = live[:, None] & (k[None, :] < npoints)
        values = tl.load(values_ptr + r[:, None] * values_stride + k[None, :], mask=on_grid, other=0.0)
        mids = tl.load(mids_ptr + r[:, None] * mids_stride + k[None, :],
                       mask=live[:, None] & (k[None, :] < npoints - 1), other=float("inf"))
    for i in range(0, width):
        wc = tl.sum(tl.where(c[None, :] == i, w, 0.0), axis=1)  # column i as the earlier columns left it
        if AFFINE:
            code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(wc, scale)) + zero, 0.0), maxq * 1.0)
            qc = scale * (code - zero)
        else:
            code = tl.sum((mids < wc[:, None]).to(tl.int32), axis=1)
            qc = tl.sum(tl.where(k[None, :] == code[:, None], values, 0.0), axis=1)
        err = wc - qc
        tl.store(q_ptr + r * q_stride + i, qc, mask=live)
        tl.store(code_ptr + r * code_stride + i, code.to(tl.uint8), mask=live)
        tl.store(err_ptr + i * err_stride + r, err, mask=live)
        step = tl.load(step_ptr + i * step_stride + c, mask=c < width, other=0.0)
        w = w - err[:, None] * step[None, :]


def quantize_block(w: torch.Tensor, step: torch.Tensor, q_out: torch.Tensor, *, values: torch.Tensor | None = None,
                   midpoints: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None, maxq: int = 0):
    """Quantize the columns of ``w`` (rows x n, fp32; read, not changed) in order, GPTQ-style, in one launch.

    ``step`` (n x n): the block of H^-1's upper Cholesky factor with each row divided by its diagonal
    element, so column i's error e moves column j > i by -e * step[i, j]. The grid: ``values`` (rows x K,
    each row's points ascending, +inf past its own count) with their ``midpoints`` (rows x K - 1, the
    decision boundaries), or an affine ``scale``, ``zero`` (rows) and ``maxq``. Writes the quantized values into ``q_out`` (rows x n, last dimension contiguous) and returns
    ``(codes, err)``: codes (rows x n, uint8) and each column's error w - q as a row (n x rows)."""
    rows, n = w.shape
    if w.stride(1) != 1 or q_out.stride(1) != 1 or q_out.shape != w.shape:
        raise ValueError("w and q_out must be (rows, n) with contiguous rows")
    step = step.contiguous()
    codes = torch.empty(rows, n, dtype=torch.uint8, device=w.device)
    err = torch.empty(n, rows, dtype=torch.float32, device=w.device)
    affine = values is None
    if affine:
        scale, zero = scale.float().contiguous(), zero.float().contiguous()
        values = midpoints = scale  # not read
        npoints = 2
    else:
        values, midpoints = values.float().contiguous(), midpoints.float().contiguous()
        npoints = values.shape[1]
        if npoints > 256:
            raise ValueError(f"at most 256 points a row (uint8 codes), got {npoints}")
        if midpoints.shape != (rows, npoints - 1):
            raise ValueError(f"midpoints must be (rows, {npoints - 1}), got {tuple(midpoints.shape)}")
        scale = zero = values  # not read
    _gptq_block_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        w, w.stride(0), step, step.stride(0), values, values.stride(0), midpoints, midpoints.stride(0), npoints,
        scale, zero, maxq,
        q_out, q_out.stride(0), codes, codes.stride(0), err, err.stride(0), rows, n,
        AFFINE=affine, POINTS=triton.next_power_of_2(npoints), BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_COLS=max(16, triton.next_power_of_2(n)), num_warps=4)
    return codes, err
