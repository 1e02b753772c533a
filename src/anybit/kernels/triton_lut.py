"""Triton kernels for LUT (per-row codebook) linear layers on bit-plane packed codes.

Each width block computes ``y[m, row_index[r]] = sum_k xs[m, k] * lut[r, code[r, k]]``
(``reference.py`` is the exact function); at batch 1 one launch covers up to three blocks of a
matrix (``launch_blocks``), the tensor-core kernel launches once per block. Codes come from
``pack_bitplanes``: per row and chunk of 32 columns, ``BITS`` int32 words, word ``p`` holding
bit ``p`` of the 32 codes.

Decoding (what costs instructions; the bytes are few): for a column offset ``s`` in 0..7 the bits
of columns ``s, s+8, s+16, s+24`` of plane ``p`` go into the 4 bytes of one word with one shift
and one mask (``(w_p >> (s - p)) & (0x01010101 << p)``): ``BITS`` shifts and masks give 4 codes
("code4"), one per byte. Each code then becomes its codebook value in one of two ways:

- gather (portable, and on CUDA for column offsets ``s < SEL``): a load from the row's
  ``2**BITS`` entries, which stay in L1. On CUDA (``ASM``) the codes are built pre-scaled to byte
  offsets and OR-ed with the low address byte of the row's codebook, so one PRMT per value makes
  its address (the row's codebook must be aligned to its size: ``aligned_for_asm``);
- select (CUDA, ``s >= SEL``, fp16 codebooks of up to 16 entries): the row's entries sit in
  registers, two per word, and PRMT byte permutes pick a half2 of two codes' values with no
  memory access at all (``_select4_asm``).

The 32 values of a chunk are joined so that each thread holds 32 consecutive columns of one
(row, chunk); the tile then feeds fp32 FMAs (batch 1: ``_lut_fma_kernel``) or a tensor-core
``tl.dot`` (``_lut_dot_kernel``, up to 16 rows of x per launch, split-K over the columns with an
fp32 workspace that the kernel leaves zeroed). Code words are loaded a step or two ahead.

Sparse outliers (``y += x @ S^T``, CSR) are added by ``_csr_add_kernel`` after the blocks.
Every kernel here also runs under ``TRITON_INTERPRET=1`` on CPU tensors (with ``ASM`` off;
Triton >= 3.9: 3.6's interpreter fails on them).
``launch_blocks`` hands blocks of up to 4 bits to ``triton_bmma`` (binary tensor cores, no
decoding) at batches up to ``bmma_batch_limit`` (2, or 3-4 where the fragment kernel cannot serve
the call) when they carry its operands, or with ``mode="bmma"``; otherwise, from 2 to 16 rows of
fp16 or bf16 x with fp16 codebooks, to ``triton_mma`` (codes decoded straight into ``mma.sync`` fragments),
which replaces the ``tl.dot`` kernel there. Measurements, versions and what limits them: benchmarks/KERNEL_NOTES.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anybit.kernels import triton_mma
from anybit.kernels.tiling import stored_codes

# ----------------------------------------------------------------------------- decoding helpers


@triton.jit
def _shift(w, n: tl.constexpr):
    """Logical shift of uint32 ``w`` right by ``n`` (left by ``-n`` when negative)."""
    if n > 0:
        return w >> n
    elif n < 0:
        return w << (-n)
    else:
        return w


@triton.jit
def _code4(w0, w1, w2, w3, w4, w5, w6, w7, base, S: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr):
    """Codes of columns S, S+8, S+16, S+24 of each chunk, one per byte, shifted left by D
    (D = log2 of the entry size in bytes when building addresses), OR-ed with ``base``."""
    c = (_shift(w0, S - D) & (0x01010101 << D)) | base
    if BITS > 1:
        c = c | (_shift(w1, S - 1 - D) & (0x02020202 << D))
    if BITS > 2:
        c = c | (_shift(w2, S - 2 - D) & (0x04040404 << D))
    if BITS > 3:
        c = c | (_shift(w3, S - 3 - D) & (0x08080808 << D))
    if BITS > 4:
        c = c | (_shift(w4, S - 4 - D) & (0x10101010 << D))
    if BITS > 5:
        c = c | (_shift(w5, S - 5 - D) & (0x20202020 << D))
    if BITS > 6:
        c = c | (_shift(w6, S - 6 - D) & (0x40404040 << D))
    if BITS > 7:
        c = c | (_shift(w7, S - 7 - D) & (0x80808080 << D))
    return c


@triton.jit
def _gather4(lbase, c):
    """Codebook values of the 4 codes in the bytes of ``c`` (portable loads)."""
    v0 = tl.load(lbase + (c & 0xFF).to(tl.int32))
    v1 = tl.load(lbase + ((c >> 8) & 0xFF).to(tl.int32))
    v2 = tl.load(lbase + ((c >> 16) & 0xFF).to(tl.int32))
    v3 = tl.load(lbase + (c >> 24).to(tl.int32))
    return v0, v1, v2, v3


def _gather_asm(load: str) -> str:
    """PTX for 4 gathers: byte j of $4 replaces the low byte of the codebook address $5 (PRMT),
    then one non-coherent load of type ``load`` into $j."""
    lines = ["{", ".reg .b32 lo, hi, a;", ".reg .b64 p;", "mov.b64 {lo, hi}, $5;"]
    for j in range(4):
        lines += [f"prmt.b32 a, $4, lo, 0x765{j};", "mov.b64 p, {a, hi};", f"ld.global.nc.{load} ${j}, [p];"]
    return "\n".join(lines + ["}"])


_GATHER_F32: tl.constexpr = tl.constexpr(_gather_asm("f32"))
_GATHER_F16: tl.constexpr = tl.constexpr(_gather_asm("b16"))


@triton.jit
def _gather4_asm(laddr, c, LUT32: tl.constexpr):
    """``_gather4`` with one PRMT per address: byte j of ``c`` holds the low byte of the entry's
    address (row address low byte | entry size * code, no carry since the row's codebook is
    aligned to its size); the other 7 bytes are those of the row's codebook address ``laddr``."""
    if LUT32:
        return tl.inline_asm_elementwise(asm=_GATHER_F32, constraints="=r,=r,=r,=r,r,l", args=[c, laddr],
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(asm=_GATHER_F16, constraints="=h,=h,=h,=h,r,l", args=[c, laddr],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                         is_pure=True, pack=1)


@triton.jit
def _select4_asm(c, l0, l1, l2, l3, l4, l5, l6, l7, BITS: tl.constexpr):
    """Codebook values of the 4 codes in the bytes of ``c`` picked from registers, no memory:
    ``l0..`` hold the row's fp16 entries two per word (BITS <= 4). One PRMT picks a half2 of two
    codes' entries among 4 (2 words) by the codes' low 2 bits; further PRMTs pick by bits 2, 3."""
    if BITS <= 2:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, s, v;
            and.b32 t, $4, 0x03030303;
            mad.lo.u32 s, t, 0x22, 0x10101010;
            prmt.b32 v, $5, $6, s;
            mov.b32 {$0, $1}, v;
            shr.b32 s, s, 16;
            prmt.b32 v, $5, $6, s;
            mov.b32 {$2, $3}, v;
            }""",
            constraints="=h,=h,=h,=h,r,r,r",
            args=[c, l0, l1], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    elif BITS == 3:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, b, s, m, lo, hi, v;
            and.b32 t, $4, 0x03030303;
            and.b32 b, $4, 0x04040404;
            mad.lo.u32 s, t, 0x22, 0x10101010;
            mad.lo.u32 m, b, 0x11, 0x32103210;
            prmt.b32 lo, $5, $6, s;
            prmt.b32 hi, $7, $8, s;
            prmt.b32 v, lo, hi, m;
            mov.b32 {$0, $1}, v;
            shr.b32 s, s, 16;
            shr.b32 m, m, 16;
            prmt.b32 lo, $5, $6, s;
            prmt.b32 hi, $7, $8, s;
            prmt.b32 v, lo, hi, m;
            mov.b32 {$2, $3}, v;
            }""",
            constraints="=h,=h,=h,=h,r,r,r,r,r",
            args=[c, l0, l1, l2, l3], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, b, s, m, n, p0, p1, p2, p3, q0, q1, v;
            and.b32 t, $4, 0x03030303;
            and.b32 b, $4, 0x04040404;
            shr.b32 n, $4, 1;
            and.b32 n, n, 0x04040404;
            mad.lo.u32 s, t, 0x22, 0x10101010;
            mad.lo.u32 m, b, 0x11, 0x32103210;
            mad.lo.u32 n, n, 0x11, 0x32103210;
            prmt.b32 p0, $5, $6, s;
            prmt.b32 p1, $7, $8, s;
            prmt.b32 p2, $9, $10, s;
            prmt.b32 p3, $11, $12, s;
            prmt.b32 q0, p0, p1, m;
            prmt.b32 q1, p2, p3, m;
            prmt.b32 v, q0, q1, n;
            mov.b32 {$0, $1}, v;
            shr.b32 s, s, 16;
            shr.b32 m, m, 16;
            shr.b32 n, n, 16;
            prmt.b32 p0, $5, $6, s;
            prmt.b32 p1, $7, $8, s;
            prmt.b32 p2, $9, $10, s;
            prmt.b32 p3, $11, $12, s;
            prmt.b32 q0, p0, p1, m;
            prmt.b32 q1, p2, p3, m;
            prmt.b32 v, q0, q1, n;
            mov.b32 {$2, $3}, v;
            }""",
            constraints="=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
            args=[c, l0, l1, l2, l3, l4, l5, l6, l7], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=1)


@triton.jit
def _values4(lbase, base, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
             S: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr, LUT32: tl.constexpr, SEL: tl.constexpr):
    """(R, U, 2, 2) values of columns S + 8 * (2 * j1 + j0) at [.., j1, j0]. Column offsets
    S >= SEL pick from registers (``_select4_asm``), the others gather through L1."""
    if ASM and S >= SEL and BITS <= 4 and not LUT32:
        c = _code4(w0, w1, w2, w3, w4, w5, w6, w7, tl.zeros_like(base), S, BITS, 0)
        v0, v1, v2, v3 = _select4_asm(c, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, BITS)
    elif ASM:
        c = _code4(w0, w1, w2, w3, w4, w5, w6, w7, base, S, BITS, 2 if LUT32 else 1)
        v0, v1, v2, v3 = _gather4_asm(lbase.to(tl.int64), c, LUT32)
    else:
        c = _code4(w0, w1, w2, w3, w4, w5, w6, w7, base, S, BITS, 0)
        v0, v1, v2, v3 = _gather4(lbase, c)
    return tl.join(tl.join(v0, v2), tl.join(v1, v3))


@triton.jit
def _load_words(cptr, cid, BITS: tl.constexpr, NCHUNK):
    """The BITS bit-plane words (R, U) of chunks ``cid`` (zero past the last chunk)."""
    off = cid[None, :] * BITS
    m = cid[None, :] < NCHUNK
    w0 = tl.load(cptr + off, mask=m, other=0).to(tl.uint32, bitcast=True)
    w1 = w0
    w2 = w0
    w3 = w0
    w4 = w0
    w5 = w0
    w6 = w0
    w7 = w0
    if BITS > 1:
        w1 = tl.load(cptr + off + 1, mask=m, other=0).to(tl.uint32, bitcast=True)
    if BITS > 2:
        w2 = tl.load(cptr + off + 2, mask=m, other=0).to(tl.uint32, bitcast=True)
    if BITS > 3:
        w3 = tl.load(cptr + off + 3, mask=m, other=0).to(tl.uint32, bitcast=True)
    if BITS > 4:
        w4 = tl.load(cptr + off + 4, mask=m, other=0).to(tl.uint32, bitcast=True)
    if BITS > 5:
        w5 = tl.load(cptr + off + 5, mask=m, other=0).to(tl.uint32, bitcast=True)
    if BITS > 6:
        w6 = tl.load(cptr + off + 6, mask=m, other=0).to(tl.uint32, bitcast=True)
    if BITS > 7:
        w7 = tl.load(cptr + off + 7, mask=m, other=0).to(tl.uint32, bitcast=True)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _lut_words(lut_ptr, rows_c, stride_lr, BITS: tl.constexpr, SEL: tl.constexpr):
    """The rows' fp16 codebooks as (R, 1) uint32 words, two entries each (for ``_select4_asm``)."""
    base = lut_ptr.to(tl.pointer_type(tl.uint32)) + (rows_c * (stride_lr // 2))[:, None]
    z = tl.zeros([rows_c.shape[0], 1], dtype=tl.uint32)
    l0, l1, l2, l3, l4, l5, l6, l7 = z, z, z, z, z, z, z, z
    if SEL < 8:
        l0 = tl.load(base)
        l1 = l0
        if BITS > 1:
            l1 = tl.load(base + 1)
        if BITS > 2:
            l2 = tl.load(base + 2)
            l3 = tl.load(base + 3)
        if BITS > 3:
            l4 = tl.load(base + 4)
            l5 = tl.load(base + 5)
            l6 = tl.load(base + 6)
            l7 = tl.load(base + 7)
    return l0, l1, l2, l3, l4, l5, l6, l7


@triton.jit
def _decode(lbase, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
            BITS: tl.constexpr, BLOCK_R: tl.constexpr, U: tl.constexpr, ASM: tl.constexpr,
            LUT32: tl.constexpr, SEL: tl.constexpr):
    """Codebook values (BLOCK_R, U, 32) of the chunks whose words are given: [r, u, i] is column
    ``32 * chunk_u + i`` of row r (``lbase``: the rows' codebooks, (R, 1))."""
    if ASM:
        base = (lbase.to(tl.int64) & 0xFF).to(tl.uint32) * 0x01010101
    else:
        base = tl.zeros_like(w0)
    # One call per column offset S (a constexpr): written out because a jit function cannot
    # gather the eight results in a list to join them.
    q0 = _values4(lbase, base, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                   0, BITS, ASM, LUT32, SEL)
    q1 = _values4(lbase, base, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                   1, BITS, ASM, LUT32, SEL)
    q2 = _values4(lbase, base, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                   2, BITS, ASM, LUT32, SEL)
    q3 = _values4(lbase, base, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                   3, BITS, ASM, LUT32, SEL)
    q4 = _values4(lbase, base, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                   4, BITS, ASM, LUT32, SEL)
    q5 = _values4(lbase, base, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                   5, BITS, ASM, LUT32, SEL)
    q6 = _values4(lbase, base, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                   6, BITS, ASM, LUT32, SEL)
    q7 = _values4(lbase, base, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                   7, BITS, ASM, LUT32, SEL)
    # join s2, then s1, then s0: (R, U, j1, j0, s2, s1, s0) -> column 8 * j + s
    t0 = tl.join(tl.join(q0, q4), tl.join(q2, q6))  # s = 0, 4, 2, 6 -> [.., s2, s1]
    t1 = tl.join(tl.join(q1, q5), tl.join(q3, q7))  # s = 1, 5, 3, 7
    t = tl.join(t0, t1)
    return tl.reshape(t, (BLOCK_R, U, 32))


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _fma_rows(m, pid, x_ptr, codes_ptr, lut_ptr, scale_ptr, ridx_ptr, y_ptr, R, K, NCHUNK,
              stride_xm, stride_cr, stride_lr, stride_ym,
              BITS: tl.constexpr, BLOCK_R: tl.constexpr, U: tl.constexpr, PF: tl.constexpr,
              RED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RIDX: tl.constexpr, ASM: tl.constexpr,
              LUT32: tl.constexpr, SEL: tl.constexpr, XF32: tl.constexpr):
    """Row tile ``pid`` of one width block times row ``m`` of x, fp32 FMAs on CUDA cores. The
    code words of the next PF (1 or 2) steps are loaded ahead of this step's decode. RED: sum
    each step's 32 columns in-thread (a (BLOCK_R, U) accumulator instead of (BLOCK_R, U, 32),
    fewer registers, more warps per SM). XF32: x goes to fp32 before its layout change."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows_c = tl.where(rmask, rows, 0).to(tl.int64)
    cptr = codes_ptr + rows_c[:, None] * stride_cr
    lbase = lut_ptr + rows_c[:, None] * stride_lr
    lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7 = _lut_words(lut_ptr, rows_c, stride_lr, BITS, SEL)
    xrow = x_ptr + m * stride_xm
    ucid = tl.arange(0, U)
    lane = tl.arange(0, 32)
    if RED:
        acc = tl.zeros((BLOCK_R, U), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, U, 32), dtype=tl.float32)
    w0, w1, w2, w3, w4, w5, w6, w7 = _load_words(cptr, ucid, BITS, NCHUNK)
    n0, n1, n2, n3, n4, n5, n6, n7 = w0, w1, w2, w3, w4, w5, w6, w7
    if PF > 1:
        n0, n1, n2, n3, n4, n5, n6, n7 = _load_words(cptr, U + ucid, BITS, NCHUNK)
    for c0 in range(0, NCHUNK, U):
        p0, p1, p2, p3, p4, p5, p6, p7 = _load_words(cptr, c0 + PF * U + ucid, BITS, NCHUNK)
        w = _decode(lbase, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                    BITS, BLOCK_R, U, ASM, LUT32, SEL)
        cols = (c0 + ucid)[:, None] * 32 + lane[None, :]
        xv = tl.load(xrow + cols, mask=cols < K, other=0.0)
        if XF32:  # convert before the layout change (fp32 through shared memory)
            xv = xv.to(tl.float32)
        if HAS_SCALE:
            xv = xv.to(tl.float32) / tl.load(scale_ptr + cols, mask=cols < K, other=1.0).to(tl.float32)
        if RED:
            acc += tl.sum(w.to(tl.float32) * xv[None, :, :].to(tl.float32), axis=2)
        else:
            acc += w.to(tl.float32) * xv[None, :, :].to(tl.float32)
        if PF > 1:
            w0, w1, w2, w3, w4, w5, w6, w7 = n0, n1, n2, n3, n4, n5, n6, n7
            n0, n1, n2, n3, n4, n5, n6, n7 = p0, p1, p2, p3, p4, p5, p6, p7
        else:
            w0, w1, w2, w3, w4, w5, w6, w7 = p0, p1, p2, p3, p4, p5, p6, p7
    if RED:
        y = tl.sum(acc, axis=1)
    else:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_RIDX:
        dst = tl.load(ridx_ptr + rows, mask=rmask, other=0)
    else:
        dst = rows
    tl.store(y_ptr + m * stride_ym + dst, y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _lut_fma_kernel(x_ptr, scale_ptr, y_ptr, K, NCHUNK, stride_xm, stride_ym,
                    codes_a, lut_a, ridx_a, R_a, stride_ca, stride_la,
                    codes_b, lut_b, ridx_b, R_b, stride_cb, stride_lb,
                    codes_c, lut_c, ridx_c, R_c, stride_cc, stride_lc, TILES_A, TILES_AB,
                    BITS_A: tl.constexpr, BITS_B: tl.constexpr, BITS_C: tl.constexpr,
                    SEL_A: tl.constexpr, SEL_B: tl.constexpr, SEL_C: tl.constexpr,
                    BLOCK_R: tl.constexpr, U: tl.constexpr, PF: tl.constexpr, RED: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_RIDX: tl.constexpr, ASM: tl.constexpr,
                    LUT32: tl.constexpr, XF32: tl.constexpr):
    """Batch 1 (and small M): up to three width blocks of one matrix in one launch (BITS_B,
    BITS_C = 0 when absent). Grid (M, row tiles of a, then of b, then of c): the M programs of a
    row tile are neighbours, so its codes are read from DRAM once; one launch leaves no tail
    between the blocks of a mixed-width matrix."""
    m = tl.program_id(0)
    pid = tl.program_id(1)
    if BITS_B == 0:
        _fma_rows(m, pid, x_ptr, codes_a, lut_a, scale_ptr, ridx_a, y_ptr, R_a, K, NCHUNK,
                  stride_xm, stride_ca, stride_la, stride_ym, BITS_A, BLOCK_R, U, PF, RED, HAS_SCALE,
                  HAS_RIDX, ASM, LUT32, SEL_A, XF32)
    elif pid < TILES_A:
        _fma_rows(m, pid, x_ptr, codes_a, lut_a, scale_ptr, ridx_a, y_ptr, R_a, K, NCHUNK,
                  stride_xm, stride_ca, stride_la, stride_ym, BITS_A, BLOCK_R, U, PF, RED, HAS_SCALE,
                  HAS_RIDX, ASM, LUT32, SEL_A, XF32)
    elif BITS_C == 0 or pid < TILES_AB:
        _fma_rows(m, pid - TILES_A, x_ptr, codes_b, lut_b, scale_ptr, ridx_b, y_ptr, R_b, K, NCHUNK,
                  stride_xm, stride_cb, stride_lb, stride_ym, BITS_B, BLOCK_R, U, PF, RED, HAS_SCALE,
                  HAS_RIDX, ASM, LUT32, SEL_B, XF32)
    else:
        _fma_rows(m, pid - TILES_AB, x_ptr, codes_c, lut_c, scale_ptr, ridx_c, y_ptr, R_c, K, NCHUNK,
                  stride_xm, stride_cc, stride_lc, stride_ym, BITS_C, BLOCK_R, U, PF, RED, HAS_SCALE,
                  HAS_RIDX, ASM, LUT32, SEL_C, XF32)


@triton.jit
def _lut_dot_kernel(x_ptr, codes_ptr, lut_ptr, scale_ptr, ridx_ptr, y_ptr, ws_ptr, sem_ptr,
                    M, R, K, NCHUNK, CPS, stride_xm, stride_cr, stride_lr, stride_ym,
                    BITS: tl.constexpr, BLOCK_R: tl.constexpr, U: tl.constexpr, BLOCK_M: tl.constexpr,
                    SPLIT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RIDX: tl.constexpr, F16_DOT: tl.constexpr,
                    ASM: tl.constexpr, LUT32: tl.constexpr, SEL: tl.constexpr):
    """Rows m < min(M, BLOCK_M) of x: y^T tile (BLOCK_R, BLOCK_M) = W tile @ x^T on tensor cores.

    F16_DOT: fp16 operands (x fp16 and no input scale: exact products). Otherwise fp32 operands
    in tf32, exact for fp16 weights and bf16 x; x / input_scale is rounded to tf32.

    SPLIT > 1: program (tile, s) takes chunks [s * CPS, (s + 1) * CPS) and adds its partial sums
    into the fp32 workspace ``ws`` (M x R) with atomics; the last of a tile's SPLIT programs (a
    ticket in ``sem``) reads the sums back (an atomic add of 0), writes y, zeroes them and resets
    its ticket, so the workspace is all zeros again for the next launch."""
    pid = tl.program_id(0)
    ks = tl.program_id(1)
    c_begin = ks * CPS
    c_end = tl.minimum(NCHUNK, c_begin + CPS)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows_c = tl.where(rmask, rows, 0).to(tl.int64)
    cptr = codes_ptr + rows_c[:, None] * stride_cr
    lbase = lut_ptr + rows_c[:, None] * stride_lr
    lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7 = _lut_words(lut_ptr, rows_c, stride_lr, BITS, SEL)
    ms = tl.arange(0, BLOCK_M)
    ucid = tl.arange(0, U)
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    w0, w1, w2, w3, w4, w5, w6, w7 = _load_words(cptr, c_begin + ucid, BITS, c_end)
    for c0 in range(c_begin, c_end, U):
        n0, n1, n2, n3, n4, n5, n6, n7 = _load_words(cptr, c0 + U + ucid, BITS, c_end)
        w = _decode(lbase, lw0, lw1, lw2, lw3, lw4, lw5, lw6, lw7, w0, w1, w2, w3, w4, w5, w6, w7,
                    BITS, BLOCK_R, U, ASM, LUT32, SEL)
        w = tl.reshape(w, (BLOCK_R, U * 32))
        w0, w1, w2, w3, w4, w5, w6, w7 = n0, n1, n2, n3, n4, n5, n6, n7
        cols = c0 * 32 + tl.arange(0, U * 32)
        xmask = (ms[:, None] < M) & (cols[None, :] < K)
        xm = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :], mask=xmask, other=0.0)  # (BLOCK_M, U*32)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + cols, mask=cols < K, other=1.0).to(tl.float32)
            xm = xm.to(tl.float32) / sc[None, :]
        xt = tl.trans(xm)
        if F16_DOT:
            acc = tl.dot(w.to(tl.float16), xt.to(tl.float16), acc)
        else:
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
    if HAS_RIDX:
        dst = tl.load(ridx_ptr + rows, mask=rmask, other=0)
    else:
        dst = rows
    store_or_add_part(acc, y_ptr + ms[None, :] * stride_ym + dst[:, None], ws_ptr + ms[None, :] * R + rows[:, None],
                      sem_ptr + pid, rmask[:, None] & (ms[None, :] < M), SPLIT)


@triton.jit
def store_or_add_part(acc, ptrs, wptrs, ticket_ptr, omask, PARTS):
    """Split-K's end of a program: with one part, store fp32 ``acc`` at ``ptrs`` (in their dtype); else add
    it into the fp32 workspace at ``wptrs`` and take a ticket at ``ticket_ptr``: the tile's last part reads
    the sums back, stores them and zeroes its workspace and ticket, ready for the next launch."""
    if PARTS == 1:
        tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(wptrs, acc, mask=omask)
        ticket = tl.atomic_add(ticket_ptr, 1)
        if ticket == PARTS - 1:
            total = tl.atomic_add(wptrs, tl.zeros_like(acc), mask=omask)  # read through L2
            tl.store(ptrs, total.to(ptrs.dtype.element_ty), mask=omask)
            tl.store(wptrs, tl.zeros_like(acc), mask=omask)
            tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _csr_add_kernel(x_ptr, crow_ptr, col_ptr, val_ptr, y_ptr, M, stride_xm, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_NZ: tl.constexpr):
    """y[m, r] += sum_j val[j] * x[m, col[j]] over CSR row r (one program per row, m < BLOCK_M)."""
    r = tl.program_id(0)
    start = tl.load(crow_ptr + r).to(tl.int64)
    end = tl.load(crow_ptr + r + 1).to(tl.int64)
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_NZ), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_NZ):
        j = j0 + tl.arange(0, BLOCK_NZ)
        jm = j < end
        col = tl.load(col_ptr + j, mask=jm, other=0).to(tl.int64)
        v = tl.load(val_ptr + j, mask=jm, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + ms[:, None] * stride_xm + col[None, :], mask=mmask[:, None] & jm[None, :],
                     other=0.0).to(tl.float32)
        acc += xv * v[None, :]
    s = tl.sum(acc, axis=1)
    yp = y_ptr + ms * stride_ym + r
    y = tl.load(yp, mask=mmask, other=0.0).to(tl.float32)
    tl.store(yp, (y + s).to(y_ptr.dtype.element_ty), mask=mmask)


# ----------------------------------------------------------------------------- launchers

FMA_MAX_BATCH = 1  # larger batches go to the tensor-core kernel (benchmarks/KERNEL_NOTES.md)
BMMA_MAX_BATCH = 4  # blocks with binary tensor-core operands use them up to here (H100 sweep, BENCHMARKS.md)
BMMA_MAX_BATCH_WITH_FRAGMENTS = 2
MMA_MIN_BATCH = 2  # from here to 16 rows of x, fp16 x and codebooks: codes decoded into mma fragments


def bmma_batch_limit(blocks, fragments: bool = False) -> int:
    """Rows of x up to which prepared blocks run on binary tensor cores. Against the fragment kernel
    (``fragments``: ``triton_mma`` serves this call): 2 rows (from 3 rows the fragment kernel is as
    fast or faster, H100, BENCHMARKS.md). Against the dot kernel: 4 while the blocks of up to 4 bits
    average under 4 bits a row (3 and 3.25 bits: faster than the dot kernel and fp16 at 4 rows),
    else 3 (4-bit rows have twice the masks; at 4 rows the dot kernel is the faster)."""
    from anybit.kernels.triton_bmma import MAX_BITS

    if fragments:
        return BMMA_MAX_BATCH_WITH_FRAGMENTS
    rows = [(b[2], b[1].shape[0]) for b in blocks if b[2] <= MAX_BITS]
    mean = sum(bits * n for bits, n in rows) / max(1, sum(n for _, n in rows))
    return BMMA_MAX_BATCH if mean < 4 else BMMA_MAX_BATCH - 1


def aligned_for_asm(lut: torch.Tensor, bits: int) -> bool:
    """Whether every row's codebook lies in one aligned block of its size within 256 bytes."""
    span = (2**bits) * lut.element_size()
    if span > 256:
        return False
    return (lut.data_ptr() % span == 0) and ((lut.stride(0) * lut.element_size()) % span == 0)


def config_for(mode: str, rows: int, in_features: int, bits: int, batch: int) -> tuple[int, ...]:
    """(BLOCK_R, U, num_warps, PF, RED, SEL, XF32, SPLIT) for a launch (H100 sweeps in
    benchmarks/KERNEL_NOTES.md): rows per program, chunks of 32 columns per step, warps, steps of
    code words loaded ahead, per-step reduction of the 32 columns (FMA kernel), first column
    offset (of 8) whose values are picked from registers instead of gathered, x converted to fp32
    before its layout change (FMA), K-splits (dot; 0 = enough programs for ~4 per SM)."""
    if mode == "fma":
        return (4, 32, 4, 2, 1, 0, 1, 1)
    return (64, 4, 4, 2, 0, 0, 1, 0)


_WORKSPACE: dict = {}


def sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def workspace(device, n: int, tiles: int):
    """Zeroed fp32 partial sums and int32 tickets for split-K, kept per device; the kernel leaves
    them zeroed. Grown outside any CUDA graph capture by the first (warm-up) call of a size."""
    key = (device.type, device.index)
    ws, sem = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < n or sem.numel() < tiles:
        ws = torch.zeros(max(n, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        sem = torch.zeros(max(tiles, 0 if sem is None else sem.numel()), dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, sem)
    return ws, sem


def _tile_config(mode, rows, in_features, bits, M, config):
    cfg = tuple(config or config_for(mode, rows, in_features, bits, M))
    padded = cfg + (2, False, 8, True, 0)[len(cfg) - 3:] if len(cfg) < 8 else cfg
    block_r, u, warps, pf, red, sel, xf32, split = padded[:8]
    if mode == "dot":
        block_r = max(block_r, 16)
    return block_r, u, warps, pf, bool(red), sel, bool(xf32), split


def _operands(x2, codes, lut, bits, use_asm, sel):
    """Contiguous codes, an fp16 (or fp32) codebook, and whether its PTX paths apply."""
    codes = codes.contiguous()
    if lut.stride(-1) != 1:
        lut = lut.contiguous()
    lut32 = lut.dtype == torch.float32
    if not lut32 and lut.dtype != torch.float16:
        lut = lut.to(torch.float16)
    asm = x2.is_cuda and aligned_for_asm(lut, bits) if use_asm is None else use_asm
    if not (asm and not lut32 and bits <= 4 and lut.stride(0) % 2 == 0 and lut.data_ptr() % 4 == 0):
        sel = 8  # register selection: fp16 codebooks of up to 16 entries, on CUDA
    return codes, lut, lut32, asm, sel


def _with_prepared(blocks) -> list[tuple]:
    """The non-empty blocks as ``(codes, lut, bits, row_index, prepared or None)``."""
    return [tuple(b[:4]) + (b[4] if len(b) > 4 else None,) for b in blocks if b[1].shape[0]]


def _tensor_core_mode(blocks, batch: int, fragments: bool) -> str | None:
    """``launch_blocks``' choice without a ``mode``: "bmma", "mma", or None (FMA or dot by batch)."""
    if any(b[4] is not None for b in blocks) and batch <= bmma_batch_limit(blocks, fragments):
        return "bmma"
    return "mma" if fragments and batch >= MMA_MIN_BATCH else None


def tensor_core_mode(x2, blocks) -> str | None:
    """The tensor-core kernel ``launch_blocks`` runs for x2 (M, in) and these blocks when given no
    ``mode``: "bmma" (which reads x as bit planes: ``planes`` is used), "mma", or None."""
    blocks = _with_prepared(blocks)
    fragments = triton_mma.supports(x2, [b[1] for b in blocks if b[2] <= triton_mma.MAX_BITS])
    return _tensor_core_mode(blocks, x2.shape[0], fragments)


def launch_blocks(x2, blocks, in_features, y2, input_scale=None, *, mode: str | None = None,
                  config: tuple[int, ...] | None = None, use_asm: bool | None = None, planes=None):
    """Write the rows of every width block ``(codes, lut, bits, row_index[, prepared])`` of one
    matrix into y2 (M, out) from x2 (M, in); return y2. ``lut`` is fp16 (fastest) or fp32 holding
    fp16 values (rows_b, >= 2**bits); ``mode`` "fma", "dot", "mma" or "bmma" (default: "bmma" for up
    to ``bmma_batch_limit`` rows of x (2, or 3-4 where "mma" cannot serve the call) when some block
    comes with its ``prepared`` operands, else "fma" for one row of x, else "mma" (``triton_mma``:
    blocks of up to 4 bits, fp16 or bf16 x of up to 16 rows and fp16 codebooks), else "dot"); ``config`` overrides ``config_for`` (for
    "bmma" and "mma": their modules' ``launch``'s);
    ``use_asm`` (default: on CUDA when the codebook is aligned) enables the PTX paths. FMA: up to
    three blocks with codebooks of one dtype share a launch. "bmma" (``triton_bmma``, binary tensor
    cores, CUDA only) takes the blocks of up to 4 bits, ``prepared`` being their
    ``triton_bmma.prepare_block`` (made per call when absent); wider blocks go to "fma" or "dot"
    by batch as without operands. A block with ``prepared`` may come without its stored codes
    (None): the tensor-core kernels read the tiled ones, the others get them untiled per call.
    ``planes``: ``xplanes.x_planes(x2, input_scale)`` when already made (by the op that wrote x2); the
    "bmma" path reads them instead of making its own, the other kernels read x2.
    Split-K launches share one workspace per device: do not run them concurrently on several streams."""
    M = x2.shape[0]
    blocks = _with_prepared(blocks)
    if not blocks or M == 0:
        return y2
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    fragment_blocks = [b for b in blocks if b[2] <= triton_mma.MAX_BITS]
    fragments = triton_mma.supports(x2, [b[1] for b in fragment_blocks])
    if mode is None:
        mode = _tensor_core_mode(blocks, M, fragments)
    scale = input_scale.contiguous() if input_scale is not None else None
    if mode == "mma":
        if not fragments:
            raise ValueError("mode 'mma' needs fp16 or bf16 x of 1..16 rows and fp16 codebooks on CUDA")
        triton_mma.launch(x2, fragment_blocks, in_features, y2, scale, config=config)
        blocks = [b for b in blocks if b[2] > triton_mma.MAX_BITS]
        mode, config = None, None
    if mode == "bmma":
        from anybit.kernels import triton_bmma

        narrow = [b for b in blocks if b[2] <= triton_bmma.MAX_BITS]
        triton_bmma.launch(x2, narrow, in_features, y2, scale, planes=planes, config=config)
        blocks = [b for b in blocks if b[2] > triton_bmma.MAX_BITS]
        mode, config = None, None
    if mode is None:
        mode = "fma" if M <= FMA_MAX_BATCH else "dot"
    # the FMA and dot kernels read the stored order: blocks kept only tiled are untiled for the call
    blocks = [(stored_codes(b, in_features), *b[1:]) if b[0] is None else b for b in blocks]
    if mode == "dot":
        for codes, lut, bits, row_index, _ in blocks:
            _launch_dot(x2, codes, lut, bits, in_features, y2, row_index, scale, config, use_asm)
        return y2
    for lut32 in (False, True):
        same = [b[:4] for b in blocks if (b[1].dtype == torch.float32) == lut32]
        for i in range(0, len(same), 3):
            _launch_fma(x2, same[i:i + 3], in_features, y2, scale, lut32, config, use_asm)
    return y2


def _launch_fma(x2, group, in_features, y2, scale, lut32, config, use_asm):
    """One launch for the (up to three) blocks of ``group``, tiled by the first block's config."""
    M = x2.shape[0]
    block_r, u, warps, pf, red, sel, xf32, _ = _tile_config("fma", group[0][0].shape[0], in_features, group[0][2],
                                                              M, config)
    prepared = [(*_operands(x2, codes, lut, bits, use_asm, sel), bits, row_index)
                for codes, lut, bits, row_index in group]
    has_ridx = any(b[6] is not None for b in prepared)
    asm = all(b[3] for b in prepared)
    slots, tiles = [], [0]
    for codes, lut, _, _, sel, bits, row_index in prepared:
        if has_ridx and row_index is None:  # another block has indices: give this one its own
            row_index = torch.arange(codes.shape[0], device=codes.device)
        ridx = row_index.contiguous() if row_index is not None else codes
        slots.append(((codes, lut, ridx, codes.shape[0], codes.stride(0), lut.stride(0)), bits, sel if asm else 8))
        tiles.append(tiles[-1] + triton.cdiv(codes.shape[0], block_r))
    while len(slots) < 3:  # absent slots: width 0, never reached
        slots.append((slots[0][0], 0, 8))
        tiles.append(tiles[-1])
    nchunk = prepared[0][0].shape[1] // prepared[0][5]
    args = [a for slot in slots for a in slot[0]]
    _lut_fma_kernel[(M, tiles[len(group)])](
        x2, scale if scale is not None else x2, y2, in_features, nchunk, x2.stride(0), y2.stride(0), *args,
        tiles[1], tiles[2], BITS_A=slots[0][1], BITS_B=slots[1][1], BITS_C=slots[2][1], SEL_A=slots[0][2],
        SEL_B=slots[1][2], SEL_C=slots[2][2], BLOCK_R=block_r, U=u, PF=pf, RED=red, HAS_SCALE=scale is not None,
        HAS_RIDX=has_ridx, ASM=asm, LUT32=lut32, XF32=xf32, num_warps=warps)


def _launch_dot(x2, codes, lut, bits, in_features, y2, row_index, scale, config, use_asm):
    M = x2.shape[0]
    R = codes.shape[0]
    block_r, u, warps, _, _, sel, _, split = _tile_config("dot", R, in_features, bits, M, config)
    codes, lut, lut32, use_asm, sel = _operands(x2, codes, lut, bits, use_asm, sel)
    nchunk = codes.shape[1] // bits
    has_scale = scale is not None
    has_ridx = row_index is not None
    ridx = row_index.contiguous() if has_ridx else codes
    f16 = x2.dtype == torch.float16 and not has_scale
    tiles = triton.cdiv(R, block_r)
    if split <= 0:  # enough programs to fill the GPU: about 4 per multiprocessor
        split = max(1, min(8, round(4 * sm_count(x2.device) / tiles), nchunk // (2 * u)))
    cps = triton.cdiv(triton.cdiv(nchunk, split), u) * u
    split = triton.cdiv(nchunk, cps)
    ws, sem = workspace(x2.device, 16 * R, tiles) if split > 1 else (x2, codes)
    for m0 in range(0, M, 16):
        xm = x2[m0:m0 + 16]
        ym = y2[m0:m0 + 16]
        _lut_dot_kernel[(tiles, split)](
            xm, codes, lut, scale if has_scale else x2, ridx, ym, ws, sem, xm.shape[0], R, in_features, nchunk, cps,
            xm.stride(0), codes.stride(0), lut.stride(0), ym.stride(0),
            BITS=bits, BLOCK_R=block_r, U=u, BLOCK_M=16, SPLIT=split, HAS_SCALE=has_scale, HAS_RIDX=has_ridx,
            F16_DOT=f16, ASM=use_asm, LUT32=lut32, SEL=sel, num_warps=warps)


def launch_block(x2, codes, lut, bits, in_features, y2, row_index=None, input_scale=None, **options):
    """One width block: ``launch_blocks`` with a single block."""
    return launch_blocks(x2, [(codes, lut, bits, row_index)], in_features, y2, input_scale, **options)


def launch_outliers(x2, crow, col, values, y2):
    """y2 += x2 @ S^T for the CSR matrix S = (crow, col, values); returns y2."""
    M = x2.shape[0]
    rows = crow.numel() - 1
    if rows <= 0 or M == 0 or col.numel() == 0:
        return y2
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    for m0 in range(0, M, 16):
        xm = x2[m0:m0 + 16]
        ym = y2[m0:m0 + 16]
        bm = triton.next_power_of_2(xm.shape[0])
        _csr_add_kernel[(rows,)](xm, crow, col, values, ym, xm.shape[0], xm.stride(0), ym.stride(0),
                                 BLOCK_M=bm, BLOCK_NZ=32, num_warps=1)
    return y2
