"""Triton kernels for the grids without a codebook per row: affine grids per row and column group
(rtn, gptq, slim) and codebooks per input column (cmpq, claq).

The per-row kernels (``triton_lut``, ``triton_bmma``) fold a row's codebook into the row's sum; here
the value of a code depends on its column (and group). Both grids are read as W (out_features x the
block's columns), codes packed along the columns (affine blocks are stored so; per-column codebooks are
stored as W^T and transposed once, ``formats.bitpack.transpose_packed``):

- affine: ``x . (s (q - z)) = s (x . q) - s z sum(x)`` over a step of columns within one group (a
  step never straddles a group: its columns divide the group's), so a group's scale and zero apply
  once a step and row, not per weight;
- per-column codebooks: the value of code q in block column c is ``lut[c, q]``, a gather from the
  column's ``2**bits`` entries, which stay in L1.

One or two rows of x (decoding): ``_grid_row_kernel`` takes the code words of a tile of rows and chunks and
walks the 32 columns of a chunk in a static loop, so that the codes come out of words the thread
already holds (``triton_lut._code4``: a shift and a mask a plane give the codes of four columns, one a
byte) and every product is one FMA in the words' own layout (no layout change a step). More rows:
``_grid_dot_kernel`` decodes a (rows x columns) tile and multiplies it
with x's tile on tensor cores.

Every block of a matrix adds into the same outputs, so blocks, and splits of one block's columns,
are parts of one sum: a single part stores y; several add into an fp32 workspace with atomics and
the last part of an output tile (a ticket, counted across the blocks' launches) writes y and leaves
the workspace and ticket zeroed, as ``triton_lut``'s split-K does. x is read in its original column
order through each block's ``x_index`` (permutation and block membership in one index), times the
input scale's reciprocal as it is loaded. Runs under ``TRITON_INTERPRET=1`` on CPU tensors too (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from anybit.kernels.triton_lut import _code4, _load_words, sm_count, store_or_add_part, workspace

AFFINE, COLUMNS = 0, 1
# Rows of x a launch of the dot kernel covers; larger batches run as several tiles of its grid.
BLOCK_M = 16
# Rows of x up to which the row kernel runs, by mode: each code is decoded once and costs an FMA a row.
# Offline SASS (sm_90, 3 bits), instructions a weight: affine 7.1 for one row, 9.7-10.1 for two, ~20 for
# four against the dot kernel's 19.2 for up to 16; per-column codebooks (a gather a weight and row) 11.8
# for one row, 17.7 for two against the dot kernel's 17.6.
ROW_KERNEL_MAX_ROWS = {AFFINE: 2, COLUMNS: 1}
# Rows of x above which decoding the weight once for a dense matmul beats decoding it per tile of x.
MAX_BATCH = 64
# A group of affine columns larger than this counts as a whole row (``group_steps``).
WHOLE_ROW = 1 << 30


@dataclass(frozen=True)
class GridBlock:
    """One width block of an affine or per-column-codebook linear, as the kernels read it.
    ``codes``: (out_features, ceil(columns / 32) * bits) packed along the block's columns (the stored
    affine block; ``transpose_packed`` of a stored per-column block); ``values``: its scales (affine,
    (out_features, groups)) or codebooks ((columns, 2**bits)); ``zeros``: affine zeros; ``x_index``:
    int32 original x column of each block column (None: column j is x's column j); ``group_columns``:
    affine columns a group (0: one group a row)."""

    codes: torch.Tensor
    values: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    columns: int
    x_index: torch.Tensor | None = None
    group_columns: int = 0

    @property
    def mode(self) -> int:
        """AFFINE (scales and zeros) or COLUMNS (per-column codebooks)."""
        return COLUMNS if self.zeros is None else AFFINE


@triton.jit
def _x_at(x_rows, scale_ptr, xidx_ptr, col, cmask, rmask, HAS_INDEX: tl.constexpr, HAS_SCALE: tl.constexpr):
    """fp32 x / input scale (BLOCK_M, CH) at block columns ``col`` (CH,) of the rows at ``x_rows``
    (BLOCK_M, 1), 0 past ``cmask`` (CH,) and ``rmask`` (BLOCK_M, 1); the input scale's fp32 reciprocals at
    ``scale_ptr``: a multiply, not a division, per x."""
    if HAS_INDEX:
        xi = tl.load(xidx_ptr + col, mask=cmask, other=0)
    else:
        xi = col
    xv = tl.load(x_rows + xi[None, :], mask=rmask & cmask[None, :], other=0.0).to(tl.float32)
    if HAS_SCALE:
        xv = xv * tl.load(scale_ptr + xi, mask=cmask, other=1.0)[None, :]
    return xv


@triton.jit
def _grid_row_kernel(x_ptr, scale_ptr, xidx_ptr, codes_ptr, val_ptr, zero_ptr, y_ptr, ws_ptr, sem_ptr,
                     M, N, C, SPS, GROUP_STEPS, stride_xm, stride_cr, stride_vr, stride_ym, PARTS,
                     MODE: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CH: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_SCALE: tl.constexpr):
    """y[m, n] (+)= sum over the block's columns c of x[m, idx[c]] / scale[idx[c]] * W[n, c] for the
    M <= BLOCK_M rows of x (a few: every product an FMA, each code decoded once for all of them).

    Program (n tile, split) takes steps [split * SPS, (split + 1) * SPS) of CH chunks of 32 columns."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    rows = tl.where(nmask, ns, 0).to(tl.int64)
    row_ptr = codes_ptr + rows[:, None] * stride_cr
    nchunk = stride_cr // BITS  # chunks of a row (rows are contiguous)
    acc = tl.zeros((BLOCK_M, BLOCK_N, CH), dtype=tl.float32)
    acc_zero = tl.zeros((BLOCK_M, BLOCK_N, CH), dtype=tl.float32)
    s_begin = split * SPS
    s_end = tl.minimum(tl.cdiv(nchunk, CH), s_begin + SPS)
    for s in range(s_begin, s_end):
        ch = s * CH + tl.arange(0, CH)
        w0, w1, w2, w3, w4, w5, w6, w7 = _load_words(row_ptr, ch, BITS, nchunk)  # rows past N read row 0
        part = tl.zeros((BLOCK_M, BLOCK_N, CH), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M, CH), dtype=tl.float32)
        for off in tl.static_range(8):
            # the codes of columns off, off + 8, off + 16, off + 24 of each chunk, one a byte of one word
            c4 = _code4(w0, w1, w2, w3, w4, w5, w6, w7, 0, off, BITS, 0)
            for i in tl.static_range(4):
                col = ch * 32 + off + 8 * i
                cmask = col < C
                xj = _x_at(x_ptr + ms[:, None] * stride_xm, scale_ptr, xidx_ptr, col, cmask, mmask[:, None],
                           HAS_INDEX, HAS_SCALE)  # (BLOCK_M, CH)
                q = ((c4 >> (8 * i)) & 0xFF).to(tl.int32)
                if MODE == 0:
                    part += q.to(tl.float32)[None, :, :] * xj[:, None, :]
                    x_sum += xj
                else:  # int32 offsets: a codebook table is far below 2**31 entries
                    lut_row = tl.where(cmask, col, 0) * stride_vr
                    part += tl.load(val_ptr + (lut_row[None, :] + q)).to(tl.float32)[None, :, :] * xj[:, None, :]
        if MODE == 0:
            g = s // GROUP_STEPS
            sc = tl.load(val_ptr + rows * stride_vr + g, mask=nmask, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + rows * stride_vr + g, mask=nmask, other=0.0).to(tl.float32)
            acc += part * sc[None, :, None]
            acc_zero += (sc * zero)[None, :, None] * x_sum[:, None, :]
        else:
            acc += part
    store_or_add_part(tl.sum(acc - acc_zero, axis=2), y_ptr + ms[:, None] * stride_ym + ns[None, :],
                      ws_ptr + ms[:, None] * N + ns[None, :], sem_ptr + pid_n, mmask[:, None] & nmask[None, :], PARTS)


@triton.jit
def _plane_codes(row_ptr, chunk0, nchunk, rmask, BITS: tl.constexpr, CH: tl.constexpr):
    """Codes (R, CH * 32) of CH chunks from chunk0 on (code 0 past ``nchunk`` chunks and where ``rmask``
    (R, 1) is off), rows given by ``row_ptr`` (R, 1) (word pointers)."""
    ch = chunk0 + tl.arange(0, CH)[None, :]
    bit = tl.arange(0, 32)[None, None, :]
    words = row_ptr + ch * BITS
    rmask = rmask & (ch < nchunk)
    w = tl.load(words, mask=rmask, other=0)
    code = (w[:, :, None] >> bit) & 1
    for p in tl.static_range(1, BITS):
        w = tl.load(words + p, mask=rmask, other=0)
        code = code | (((w[:, :, None] >> bit) & 1) << p)
    return tl.reshape(code, (code.shape[0], CH * 32))


@triton.jit
def _grid_dot_kernel(x_ptr, scale_ptr, xidx_ptr, codes_ptr, val_ptr, zero_ptr, y_ptr, ws_ptr, sem_ptr,
                     M, N, C, SPS, GROUP_STEPS, stride_xm, stride_cr, stride_vr, stride_ym, PARTS,
                     MODE: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CH: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_SCALE: tl.constexpr):
    """y[m, n] (+)= sum over the block's columns c of x[m, idx[c]] / scale[idx[c]] * W[n, c] for
    BLOCK_M rows of x on tensor cores (x's dtype; tf32 for fp32 x).

    Program (n tile, split, m tile) takes steps [split * SPS, (split + 1) * SPS) of CH chunks."""
    BK: tl.constexpr = CH * 32
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = ms < M
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    rows = tl.where(nmask, ns, 0).to(tl.int64)
    row_ptr = codes_ptr + rows[:, None] * stride_cr
    nchunk = stride_cr // BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_begin = split * SPS
    s_end = tl.minimum(tl.cdiv(C, BK), s_begin + SPS)
    for s in range(s_begin, s_end):
        k = s * BK + tl.arange(0, BK)
        kmask = k < C
        if HAS_INDEX:
            xi = tl.load(xidx_ptr + k, mask=kmask, other=0)
        else:
            xi = k
        xv = tl.load(x_ptr + ms[:, None] * stride_xm + xi[None, :], mask=mmask[:, None] & kmask[None, :],
                     other=0.0).to(tl.float32)
        if HAS_SCALE:
            xv = xv * tl.load(scale_ptr + xi, mask=kmask, other=1.0)[None, :]
        q = _plane_codes(row_ptr, s * CH, nchunk, nmask[:, None], BITS, CH)  # (BLOCK_N, BK)
        if MODE == 0:
            g = s // GROUP_STEPS
            sc = tl.load(val_ptr + rows * stride_vr + g, mask=nmask, other=0.0).to(tl.float32)
            zs = sc * tl.load(zero_ptr + rows * stride_vr + g, mask=nmask, other=0.0).to(tl.float32)
            xq = tl.dot(xv.to(x_ptr.dtype.element_ty), tl.trans(q.to(x_ptr.dtype.element_ty)))
            acc += xq * sc[None, :] - tl.sum(xv, axis=1)[:, None] * zs[None, :]
        else:
            ks = tl.where(kmask, k, 0).to(tl.int64)
            w = tl.load(val_ptr + ks[None, :] * stride_vr + q)  # (BLOCK_N, BK): the columns' codebooks
            acc = tl.dot(xv.to(x_ptr.dtype.element_ty), tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
    store_or_add_part(acc, y_ptr + ms[:, None] * stride_ym + ns[None, :], ws_ptr + ms[:, None] * N + ns[None, :],
                      sem_ptr + pid_m * tl.num_programs(0) + pid_n, mmask[:, None] & nmask[None, :], PARTS)


# (BLOCK_N outputs a tile, columns a step, warps, software-pipeline stages) by (mode, more rows of x than
# ROW_KERNEL_MAX_ROWS: the dot kernel); an affine step shrinks to divide its group.
TILES = {(AFFINE, False): (512, 32, 4, 3), (AFFINE, True): (64, 128, 4, 3),
         (COLUMNS, False): (512, 32, 4, 3), (COLUMNS, True): (64, 64, 4, 3)}
# Programs a multiprocessor the column splits aim at (over all blocks of a call), and the most splits of a
# block's columns (each split adds its partial sums into the workspace with atomics).
PROGRAMS_PER_SM = 4
MAX_SPLIT = 64


def launch_shape(mode: int, rows_of_x: int) -> tuple[bool, int, int, int, int]:
    """(dot kernel?, BLOCK_M, BLOCK_N, warps, stages) of a call with this many rows of x."""
    dot = rows_of_x > ROW_KERNEL_MAX_ROWS[mode]
    block_n, _, warps, stages = TILES[mode, dot]
    return dot, BLOCK_M if dot else triton.next_power_of_2(rows_of_x), block_n, warps, stages


def step_columns(mode: int, group_columns: int, dot: bool = False) -> int | None:
    """Columns a step; None where an affine group's columns are not a multiple of 32 (no kernel: a
    step must not straddle groups)."""
    bk = TILES[mode, dot][1]
    if mode == COLUMNS or group_columns == 0:
        return bk
    while bk >= 32 and group_columns % bk:
        bk //= 2
    return bk if bk >= 32 else None


def supports(mode: int, group_columns: int) -> bool:
    return step_columns(mode, group_columns) is not None


def launch(x2: torch.Tensor, blocks: list[GridBlock], y2: torch.Tensor,
           inv_input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y2 (M, out_features) = x2 (M, in_features, original column order) * inv_input_scale @ W^T for W's width
    blocks (``inv_input_scale``: fp32 reciprocals of the input scale, original order)."""
    M, N = x2.shape[0], y2.shape[1]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if y2.stride(-1) != 1:
        raise ValueError("the output must be contiguous in its last dimension")
    modes = {block.mode for block in blocks}
    if len(modes) != 1:
        raise ValueError("the blocks of one linear share their grid: affine or per-column codebooks")
    (mode,) = modes
    dot, block_m, block_n, warps, stages = launch_shape(mode, M)
    n_tiles, m_tiles = triton.cdiv(N, block_n), triton.cdiv(M, block_m)
    launches = []
    all_columns = sum(b.columns for b in blocks)
    for block in blocks:
        bk = step_columns(mode, block.group_columns, dot)
        steps = triton.cdiv(block.columns, bk)
        # Enough programs over all blocks to fill the GPU, 2+ steps each.
        programs = PROGRAMS_PER_SM * sm_count(x2.device) * block.columns / all_columns
        split = max(1, min(MAX_SPLIT, round(programs / (n_tiles * m_tiles)), steps // 2))
        per_split = triton.cdiv(steps, split)
        launches.append((block, bk, per_split, triton.cdiv(steps, per_split)))
    parts = sum(launch[-1] for launch in launches)
    ws, sem = workspace(x2.device, m_tiles * block_m * N, m_tiles * n_tiles) if parts > 1 else (x2, x2)
    has_scale = inv_input_scale is not None
    for block, bk, per_split, splits in launches:
        # Affine: a step's columns lie in one group (``step_columns``), group = step // group_steps.
        group_steps = WHOLE_ROW if mode == COLUMNS or block.group_columns == 0 else block.group_columns // bk
        kernel = _grid_dot_kernel if dot else _grid_row_kernel
        kernel[(n_tiles, splits, m_tiles)](
            x2, inv_input_scale if has_scale else x2, block.x_index if block.x_index is not None else x2,
            block.codes, block.values, block.zeros if block.zeros is not None else block.values, y2, ws, sem,
            M, N, block.columns, per_split, group_steps, x2.stride(0), block.codes.stride(0),
            block.values.stride(0), y2.stride(0), parts,
            MODE=mode, BITS=block.bits, BLOCK_M=block_m, BLOCK_N=block_n, CH=bk // 32,
            HAS_INDEX=block.x_index is not None, HAS_SCALE=has_scale, num_warps=warps, num_stages=stages)
    return y2
