"""LUT linear on binary tensor cores: bit-plane codes times bit-plane activations, no decoding.

The codebook value of a b-bit code is a polynomial in the code's bits (its Moebius expansion):
``lut[r, q] = sum over T subset of bits(q) of coef[r, T]``, so with ``mask_T[r, k]`` the AND of the
bit planes ``p in T`` of row r at column k (all ones for the empty T)::

    y[m, r] = sum_k x[m, k] * lut[r, q(r, k)] = sum_T coef[r, T] * sum_k x[m, k] * mask_T[r, k]

The packed codes already are those bit planes (``anybit.formats.bitpack``: one int32 word per
row, chunk of 32 columns and bit), and a mask is one AND of plane words. With x as 24-bit fixed
point ``x = s_m * X``, ``X = sum_i w_i * bit_i(X)`` (two's complement: ``w_i = 2**i``, the sign
plane ``-2**23``), the inner sums are ``s_m * sum_i w_i * popcount(mask_T AND xplane_i)``: one
``mma.m16n8k256 .b1 .and.popc`` covers 16 rows x 256 columns x 8 planes, on the codes' words
(re-ordered once by ``tile_codes`` so that a warp's words of a tile are contiguous). No weight is
ever decoded.

Exactness: the popcounts are integers (int32 accumulators, exact); each group of 8 planes is
weighted and summed in int32, the three group sums in fp64 (exact below 2**53), then
``y = s_m * sum_T coef[r, T] * Y_T``. The only rounding
is x to 24 bits against the row's largest |x| (``_xplanes_kernel``: ``s_m`` a power of two, so
values within 2**13 of the largest keep every fp16 mantissa bit) and the fp32 coefficients.

Work per 16 rows x 256 columns: ``2**b`` masks x 3 plane groups of 8 mma (b <= 3: one warp; 4 bits:
two warps, 8 masks each). Opt-in (``triton_lut.launch_blocks(mode="bmma")``); measurements and
what limits it: benchmarks/KERNEL_NOTES.md. Widths 1..4 run here, wider blocks on ``triton_lut``'s FMA kernel.

Two launches per call: ``_xplanes_kernel`` (portable Triton, also under the interpreter) writes the
planes of x once for all blocks of a matrix, then the Gluon kernel (CUDA, sm_80+) one per block.
``emulate`` is the same arithmetic in torch, for checks without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # Gluon: explicit layouts, needed to hand the mma its operand fragments (Triton >= 3.5)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
except Exception:  # pragma: no cover - older Triton: the FMA kernels serve every width
    gluon = None

PLANES = 24  # fixed-point bits of x; 3 groups of 8 mma columns
MAX_BITS = 4  # widths served here
KTILE = 8  # chunks of 32 columns per mma (256 columns)


def available() -> bool:
    return gluon is not None


def subset_coefficients(lut: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 (rows, 2**bits): ``coef[r, T]`` with ``lut[r, q] = sum_{T subset q} coef[r, T]``
    (T and q as bit sets), the Moebius transform of each row's first 2**bits entries."""
    c = lut[:, : 2**bits].to(torch.float64).clone()
    n = 2**bits
    for p in range(bits):
        idx = torch.arange(n, device=lut.device)
        has = idx[(idx >> p) & 1 == 1]
        c[:, has] -= c[:, has ^ (1 << p)]
    return c.to(torch.float32).contiguous()


def tile_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes' words as the kernel reads them: flat int32 over (16-row tile, mma tile of 8
    chunks, plane, 16 rows x 8 chunks row-major), rows padded to 64 and chunks to 8 with zeros,
    so that a warp's words of one mma tile and plane are 512 contiguous bytes."""
    rows, words = codes.shape
    nchunk = words // bits
    kt = -(-nchunk // KTILE)
    r64 = -(-rows // 64) * 64
    t = torch.zeros(r64, kt * KTILE, bits, dtype=torch.int32, device=codes.device)
    t[:rows, :nchunk] = codes.view(rows, nchunk, bits)
    return t.view(r64 // 16, 16, kt, KTILE, bits).permute(0, 2, 4, 1, 3).contiguous().view(-1)


def prepare_block(codes: torch.Tensor, lut: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel reads of a width block besides x: (subset coefficients, tiled codes). A
    caller that runs a block repeatedly makes it once and passes it with the block; the tiled
    codes are a second copy of the codes."""
    return subset_coefficients(lut, bits), tile_codes(codes, bits)


def plane_chunks(in_features: int) -> int:
    """Chunks of 32 columns per plane of x, padded to whole mma tiles (zeros past in_features)."""
    return -(-in_features // (32 * KTILE)) * KTILE


# ----------------------------------------------------------------------------- x -> bit planes


@triton.jit
def _xplanes_kernel(x_ptr, scale_ptr, xpl_ptr, xs_ptr, K, NCP, stride_xm, stride_pm,
                    HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, CB: tl.constexpr):
    """Planes of x row m for chunks [pid * CB, (pid + 1) * CB): ``xpl[m, i, c]`` bit i of
    ``X = round(x / s_m)`` at columns 32c..32c+31, ``s_m = 2**(e - 23)`` with ``max|x| < 2**e``
    (every program finds the row's max; it reads the row from L2)."""
    m = tl.program_id(0)
    pid = tl.program_id(1)
    xrow = x_ptr + m * stride_xm
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(xrow + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v / tl.load(scale_ptr + k0 + offs, mask=k0 + offs < K, other=1.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    a = tl.max(amax, axis=0)
    # e = floor(log2 a) + 1 from the fp32 exponent field (exact); a == 0 or tiny: e = -100
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
    e = tl.maximum(e, -100)
    up = ((150 - e) << 23).to(tl.float32, bitcast=True)  # 2**(23 - e)
    if pid == 0:
        tl.store(xs_ptr + m, ((104 + e) << 23).to(tl.float32, bitcast=True))  # 2**(e - 23)
    ch = pid * CB + tl.arange(0, CB)
    lane = tl.arange(0, 32)
    cols = ch[:, None] * 32 + lane[None, :]
    v = tl.load(xrow + cols, mask=cols < K, other=0.0).to(tl.float32)
    if HAS_SCALE:
        v = v / tl.load(scale_ptr + cols, mask=cols < K, other=1.0).to(tl.float32)
    q = tl.floor(v * up + 0.5)
    q = tl.minimum(tl.maximum(q, -8388608.0), 8388607.0).to(tl.int32)
    plane = tl.arange(0, 32)
    bit = (q[None, :, :] >> plane[:, None, None]) & 1  # (32 planes, CB, 32 columns)
    words = tl.sum((bit << lane[None, None, :]).to(tl.uint32), axis=2)  # disjoint bits: sum = OR
    dst = xpl_ptr + m * stride_pm + plane[:, None] * NCP + ch[None, :]
    tl.store(dst, words.to(tl.int32, bitcast=True), mask=(plane[:, None] < 24) & (ch[None, :] < NCP))


def x_planes(x2: torch.Tensor, input_scale: torch.Tensor | None = None):
    """(planes int32 (M, 24, plane_chunks(K)), scales fp32 (M,)) of x2 (M, K) (divided by
    ``input_scale`` per column when given): ``x2 / input_scale ~= scales[:, None] * X``."""
    M, K = x2.shape
    ncp = plane_chunks(K)
    xpl = torch.empty(M, PLANES, ncp, dtype=torch.int32, device=x2.device)
    xs = torch.empty(M, dtype=torch.float32, device=x2.device)
    if M == 0:
        return xpl, xs
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    cb = 4
    scale = input_scale.contiguous() if input_scale is not None else None
    _xplanes_kernel[(M, ncp // cb)](x2, scale if scale is not None else x2, xpl, xs, K, ncp, x2.stride(0),
                                    xpl.stride(0), HAS_SCALE=scale is not None,
                                    BLOCK_K=min(triton.next_power_of_2(K), 8192), CB=cb, num_warps=4)
    return xpl, xs


def plane_weights(device) -> torch.Tensor:
    """fp64 (24,): the value of each plane bit, two's complement."""
    w = 2.0 ** torch.arange(PLANES, dtype=torch.float64, device=device)
    w[-1] = -w[-1]
    return w


# ----------------------------------------------------------------------------- reference arithmetic


def emulate(xpl, xs, codes, coef, bits: int, in_features: int) -> torch.Tensor:
    """fp32 (M, rows) that the Gluon kernel computes, in torch (any device): masks of the code
    planes times the integer x planes, exact sums, then the coefficients."""
    from anybit.formats.bitpack import unpack_bitplanes

    q = unpack_bitplanes(codes, bits, in_features).long()  # (rows, K)
    cols = torch.arange(in_features, device=xpl.device)
    xbits = (xpl.long()[:, :, cols // 32] >> (cols % 32)) & 1  # (M, 24, K)
    X = (xbits.double() * plane_weights(xpl.device)[None, :, None]).sum(1)  # (M, K), exact
    y = torch.zeros(xpl.shape[0], codes.shape[0], dtype=torch.float64, device=xpl.device)
    for t in range(2**bits):
        mask = ((q & t) == t).double()  # all bits of T set in the code
        y += (X @ mask.t()) * coef[:, t].double()[None, :]
    return (y * xs.double()[:, None]).float()


# ----------------------------------------------------------------------------- Gluon kernel

if gluon is not None:
    # Each thread holds a 2 x 2 block of a (rows, chunks) tile: rows 2g, 2g + 1, chunks 2t, 2t + 1
    # (lane 4g + t). The mma's row g is our row 2g, its row g + 8 our row 2g + 1, its 32-column
    # segments t and t + 4 our chunks 2t and 2t + 1 (any order of rows and segments works if A and
    # B agree): registers (2g, 2t), (2g, 2t+1), (2g+1, 2t), (2g+1, 2t+1) are a0, a2, a1, a3. B holds
    # plane g of chunks 2t, 2t + 1 in the same places, and D (row, plane 2t + j) at chunk column
    # 2t + j: an accumulator element (r, c) counts row r against plane c of its group of 8.
    _BMMA_ASM = gl.constexpr("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
                             "{$0,$1,$2,$3}, {$4,$6,$5,$7}, {$8,$9}, {$12,$13,$14,$15};")

    @gluon.jit
    def _bmma(masks, xw, acc):
        return gl.inline_asm_elementwise(_BMMA_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [masks, xw, acc],
                                         dtype=gl.int32, is_pure=True, pack=4)

    @gluon.jit
    def _masks(w0, w1, w2, w3, tt, BITS: gl.constexpr):
        """(T, R, 8) mask words: AND of the planes p in T (tt: the T index, (T, 1, 1))."""
        m = w0[None, :, :] | (((tt >> 0) & 1) - 1)
        if BITS > 1:
            m = m & (w1[None, :, :] | (((tt >> 1) & 1) - 1))
        if BITS > 2:
            m = m & (w2[None, :, :] | (((tt >> 2) & 1) - 1))
        if BITS > 3:
            m = m & (w3[None, :, :] | (((tt >> 3) & 1) - 1))
        return m

    @gluon.jit
    def _issue_words(smem, stage, tptr, kt, BITS: gl.constexpr):
        """Start copying the BITS plane words (rows, 8 chunks) of mma tile ``kt`` into ``stage``."""
        for p in gl.static_range(BITS):
            async_copy.async_copy_global_to_shared(smem.index(stage * BITS + p), tptr + (kt * BITS + p) * 128)
        async_copy.commit_group()

    @gluon.jit
    def _stage_words(smem, stage, LW: gl.constexpr, BITS: gl.constexpr):
        w0 = smem.index(stage * BITS).load(LW)
        w1 = w0
        w2 = w0
        w3 = w0
        if BITS > 1:
            w1 = smem.index(stage * BITS + 1).load(LW)
        if BITS > 2:
            w2 = smem.index(stage * BITS + 2).load(LW)
        if BITS > 3:
            w3 = smem.index(stage * BITS + 3).load(LW)
        return w0, w1, w2, w3

    @gluon.jit
    def _bmma_kernel(xpl_ptr, xs_ptr, codes_ptr, coef_ptr, ridx_ptr, y_ptr, ws_ptr, sem_ptr,
                     R, KT, NCP, TPS, stride_pm, stride_ym, WS_STRIDE,
                     BITS: gl.constexpr, WR: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr,
                     HAS_RIDX: gl.constexpr):
        """Program (m, tile, s): rows [tile * 16 * WR, +16 * WR) of one width block, mma tiles
        [s * TPS, (s + 1) * TPS) of the KT, row m of x; codes tiled by ``tile_codes``. Warps: WR
        along rows, 2**BITS / 8 along the masks (4 bits). SPLIT > 1: partial sums go to the fp32 workspace; the last
        program of (m, tile) (ticket in ``sem``) writes y and zeroes them again."""
        T: gl.constexpr = 2**BITS
        WT: gl.constexpr = T // 8 if T > 8 else 1
        L3: gl.constexpr = gl.BlockedLayout([1, 2, 2], [1, 8, 4], [WT, WR, 1], [2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(0, L3)  # (rows, chunks): code and plane words
        LT: gl.constexpr = gl.SliceLayout(2, L3)  # (T, rows): sums per mask
        m = gl.program_id(0)
        tile = gl.program_id(1)
        s = gl.program_id(2)
        rl = gl.arange(0, 16 * WR, layout=gl.SliceLayout(1, LW))
        ch = gl.arange(0, 8, layout=gl.SliceLayout(0, LW))
        # tiled codes (``tile_codes``): (16-row tile, mma tile, plane, 16 x 8 words row-major)
        tg = tile * WR + rl // 16
        toff = gl.multiple_of(tg.to(gl.int64) * KT * BITS * 128 + (rl % 16) * 8, 8)
        tptr = codes_ptr + toff[:, None] + ch[None, :]
        tt = gl.arange(0, T, layout=gl.SliceLayout(1, LT))[:, None, None]  # the mask index
        xrow = xpl_ptr + m * stride_pm + ((rl % 16) // 2)[:, None] * NCP + ch[None, :]
        acc0 = gl.zeros([T, 16 * WR, 8], gl.int32, L3)
        acc1 = gl.zeros([T, 16 * WR, 8], gl.int32, L3)
        acc2 = gl.zeros([T, 16 * WR, 8], gl.int32, L3)
        kb = s * TPS
        ke = gl.minimum(kb + TPS, KT)
        # code words of the next STAGES - 1 tiles are in flight while a tile is multiplied (latency x
        # bandwidth), copied to shared memory without holding registers.
        smem = gl.allocate_shared_memory(gl.int32, [STAGES * BITS, 16 * WR, 8],
                                         gl.SwizzledSharedLayout(2, 1, 1, [1, 0]))
        for i in gl.static_range(STAGES - 1):
            _issue_words(smem, i, tptr, gl.minimum(kb + i, KT - 1), BITS)
        stage = 0
        for kt in range(kb, ke):
            nxt = (stage + STAGES - 1) % STAGES
            _issue_words(smem, nxt, tptr, gl.minimum(kt + STAGES - 1, KT - 1), BITS)
            async_copy.wait_group(STAGES - 1)
            w0, w1, w2, w3 = _stage_words(smem, stage, LW, BITS)
            x0 = gl.load(xrow + kt * 8)
            x1 = gl.load(xrow + 8 * NCP + kt * 8)
            x2 = gl.load(xrow + 16 * NCP + kt * 8)
            mk = _masks(w0, w1, w2, w3, tt, BITS)
            acc0 = _bmma(mk, x0[None, :, :], acc0)
            acc1 = _bmma(mk, x1[None, :, :], acc1)
            acc2 = _bmma(mk, x2[None, :, :], acc2)
            stage = (stage + 1) % STAGES
        # accumulator column c of group j counts plane 8j + c (weight 2**(8j + c), the sign plane
        # -2**23): each group sums exactly in int32 (counts <= K < 2**16, times < 2**8), the three
        # group sums in fp64 (exact below 2**53).
        c = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        wc = (1 << c)[None, None, :]
        wsign = gl.where(c == 7, -128, 1 << c)[None, None, :]
        ysum = gl.sum(acc0 * wc, axis=2).to(gl.float64)
        ysum += gl.sum(acc1 * wc, axis=2).to(gl.float64) * 256.0
        ysum += gl.sum(acc2 * wsign, axis=2).to(gl.float64) * 65536.0  # (T, rows)
        rt = tile * (16 * WR) + gl.arange(0, 16 * WR, layout=gl.SliceLayout(0, LT))
        rtm = rt < R
        tc = gl.arange(0, T, layout=gl.SliceLayout(1, LT))
        coef = gl.load(coef_ptr + gl.where(rtm, rt, 0).to(gl.int64)[None, :] * T + tc[:, None])
        y = gl.sum(coef.to(gl.float64) * ysum, axis=0) * gl.load(xs_ptr + m).to(gl.float64)
        if HAS_RIDX:
            dst = gl.load(ridx_ptr + rt, mask=rtm, other=0)
        else:
            dst = rt
        if SPLIT == 1:
            gl.store(y_ptr + m * stride_ym + dst, y.to(y_ptr.dtype.element_ty), mask=rtm)
        else:
            wp = ws_ptr + m * WS_STRIDE + rt
            gl.atomic_add(wp, y.to(gl.float32), mask=rtm)
            sem = sem_ptr + m * gl.num_programs(1) + tile
            ticket = gl.atomic_add(sem, 1)
            if ticket == SPLIT - 1:
                zero = y.to(gl.float32) * 0.0
                tot = gl.atomic_add(wp, zero, mask=rtm)  # read through L2
                gl.store(y_ptr + m * stride_ym + dst, tot.to(y_ptr.dtype.element_ty), mask=rtm)
                gl.store(wp, zero, mask=rtm)
                gl.atomic_xchg(sem, 0)


# ----------------------------------------------------------------------------- launcher


def config_for(bits: int, rows: int) -> tuple[int, int, int]:
    """(WR, STAGES, SPLIT): warps along rows per program (times 2 for 4 bits), shared-memory stages
    of code words (STAGES - 1 mma tiles in flight), column splits (0: enough programs for about 4
    per multiprocessor). From H100 sweeps (benchmarks/KERNEL_NOTES.md): one warp per program for
    tall matrices and 4-bit blocks, two for up to 4096 rows."""
    return (2 if bits <= 3 and rows <= 4096 else 1), 4, 0


def launch(x2, blocks, in_features, y2, input_scale=None, *, planes=None, config=None):
    """Write every width block ``(codes, lut, bits, row_index[, prepared])`` (bits <= 4) of one
    matrix into y2 (M, out) from x2 (M, in); return y2. ``prepared``: ``prepare_block(codes, lut,
    bits)``, worked out here when absent or None. ``planes``: ``x_planes(x2, input_scale)`` when
    already made for this x. Split-K launches share ``triton_lut``'s workspace per device."""
    from anybit.kernels.triton_lut import _sm_count, _workspace

    M = x2.shape[0]
    if M == 0 or not blocks:
        return y2
    xpl, xs = planes if planes is not None else x_planes(x2, input_scale)
    ncp = xpl.shape[2]
    sms = _sm_count(x2.device)
    for block in blocks:
        codes, lut, bits, row_index = block[:4]
        R = codes.shape[0]
        if R == 0:
            continue
        prepared = block[4] if len(block) > 4 and block[4] is not None else prepare_block(codes, lut, bits)
        coef, tiled = prepared
        wr, stages, split = config or config_for(bits, R)
        tiles = triton.cdiv(R, 16 * wr)
        ktiles = ncp // KTILE
        if split <= 0:
            split = max(1, min(ktiles // 2, round(4 * sms / (M * tiles))))
        tps = triton.cdiv(ktiles, split)
        split = triton.cdiv(ktiles, tps)
        ws, sem = _workspace(x2.device, M * R, M * tiles) if split > 1 else (xs, xs)
        has_ridx = row_index is not None
        _bmma_kernel[(M, tiles, split)](
            xpl, xs, tiled, coef, row_index.contiguous() if has_ridx else tiled, y2, ws, sem,
            R, ktiles, ncp, tps, xpl.stride(0), y2.stride(0), R,
            BITS=bits, WR=wr, STAGES=stages, SPLIT=split, HAS_RIDX=has_ridx,
            num_warps=wr * (2 if bits == 4 else 1))
    return y2
